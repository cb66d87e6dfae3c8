"""Multi-level attention with an aggregation G (spec/hierarchical.md)."""

from ...core import registry
from .inputs import check_multilevel_inputs
from .reference import multilevel_attention, multilevel_attention_vjp

MECHANISM = registry.register(
    "multilevel", __name__, multilevel_attention, multilevel_attention_vjp, check_multilevel_inputs, "spec/hierarchical.md",
    positional=("x",), backends=("reference", "numba", "cupy"),
)

__all__ = ["multilevel_attention", "multilevel_attention_vjp"]
