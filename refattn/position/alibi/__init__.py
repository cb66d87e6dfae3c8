"""ALiBi, attention with linear biases (spec/position.md)."""

from ...core import registry
from .reference import alibi_attention, alibi_attention_vjp, alibi_bias, alibi_slopes, check_alibi_inputs

MECHANISM = registry.register(
    registry.Mechanism(
        name="alibi",
        package="refattn.position.alibi",
        forward=alibi_attention,
        vjp=alibi_attention_vjp,
        check_inputs=check_alibi_inputs,
        backends=("reference", "numba"),
        spec="spec/position.md",
    )
)

__all__ = ["alibi_slopes", "alibi_bias", "alibi_attention", "alibi_attention_vjp"]
