"""ALiBi, attention with linear biases (spec/position.md)."""

from ...core import registry
from .reference import alibi_attention, alibi_attention_vjp, alibi_bias, alibi_slopes, check_alibi_inputs

MECHANISM = registry.register(
    "alibi", __name__, alibi_attention, alibi_attention_vjp, check_alibi_inputs, "spec/position.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["alibi_slopes", "alibi_bias", "alibi_attention", "alibi_attention_vjp"]
