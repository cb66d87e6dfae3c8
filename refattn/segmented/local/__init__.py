"""lucidrains' local-attention: blocked local attention with look-around (spec/segmented.md)."""

from ...core import registry
from .reference import check_local_inputs, local_attention, local_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="local",
        package="refattn.segmented.local",
        forward=local_attention,
        vjp=local_attention_vjp,
        check_inputs=check_local_inputs,
        backends=("reference", "numba"),
        spec="spec/segmented.md",
    )
)

__all__ = ["local_attention", "local_attention_vjp"]
