"""H-Transformer-1D hierarchical attention (spec/hierarchical.md)."""

from ...core import registry
from .inputs import check_h1d_inputs
from .reference import h1d_attention, h1d_attention_vjp

MECHANISM = registry.register(
    "h1d", __name__, h1d_attention, h1d_attention_vjp, check_h1d_inputs, "spec/hierarchical.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["h1d_attention", "h1d_attention_vjp"]
