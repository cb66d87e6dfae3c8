"""Multi-level attention with an aggregation G (spec/hierarchical.md)."""

from ...core import registry
from .inputs import check_multilevel_inputs
from .reference import multilevel_attention, multilevel_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="multilevel",
        package="refattn.hierarchical.multilevel",
        forward=multilevel_attention,
        vjp=multilevel_attention_vjp,
        check_inputs=check_multilevel_inputs,
        backends=("reference", "numba"),
        spec="spec/hierarchical.md",
        positional=("x",),
    )
)

__all__ = ["multilevel_attention", "multilevel_attention_vjp"]
