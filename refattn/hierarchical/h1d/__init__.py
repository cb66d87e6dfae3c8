"""H-Transformer-1D hierarchical attention (spec/hierarchical.md)."""

from ...core import registry
from .inputs import check_h1d_inputs
from .reference import h1d_attention, h1d_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="h1d",
        package="refattn.hierarchical.h1d",
        forward=h1d_attention,
        vjp=h1d_attention_vjp,
        check_inputs=check_h1d_inputs,
        backends=("reference", "numba"),
        spec="spec/hierarchical.md",
    )
)

__all__ = ["h1d_attention", "h1d_attention_vjp"]
