"""xPos, the length-extrapolatable rotary embedding (spec/position.md)."""

from ...core import registry
from .reference import apply_xpos, check_xpos_inputs, xpos_attention, xpos_attention_vjp, xpos_scales

MECHANISM = registry.register(
    "xpos", __name__, xpos_attention, xpos_attention_vjp, check_xpos_inputs, "spec/position.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["xpos_scales", "apply_xpos", "xpos_attention", "xpos_attention_vjp"]
