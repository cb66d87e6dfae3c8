"""Rotary position embedding, RoPE (spec/position.md)."""

from ...core import registry
from .reference import apply_rope, rope_angles, rope_attention, rope_attention_vjp


def _cases():
    from .cases import cases

    return cases()


MECHANISM = registry.register(
    registry.Mechanism(
        name="rope",
        package="refattn.position.rope",
        forward=rope_attention,
        vjp=rope_attention_vjp,
        backends=("reference", "numba"),
        cases=_cases,
        properties="refattn.position.rope.properties",
        spec="spec/position.md",
    )
)

__all__ = ["rope_angles", "apply_rope", "rope_attention", "rope_attention_vjp"]
