"""Rotary position embedding, RoPE (spec/position.md)."""

from ...core import registry
from .reference import apply_rope, check_rope_inputs, rope_angles, rope_attention, rope_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="rope",
        package="refattn.position.rope",
        forward=rope_attention,
        vjp=rope_attention_vjp,
        check_inputs=check_rope_inputs,
        backends=("reference", "numba"),
        spec="spec/position.md",
    )
)

__all__ = ["rope_angles", "apply_rope", "rope_attention", "rope_attention_vjp"]
