"""Rotary position embedding, RoPE (spec/position.md)."""

from ...core import registry
from .reference import apply_rope, check_rope_inputs, rope_angles, rope_attention, rope_attention_vjp

MECHANISM = registry.register(
    "rope", __name__, rope_attention, rope_attention_vjp, check_rope_inputs, "spec/position.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["rope_angles", "apply_rope", "rope_attention", "rope_attention_vjp"]
