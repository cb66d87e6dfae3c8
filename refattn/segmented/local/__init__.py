"""lucidrains' local-attention: blocked local attention with look-around (spec/segmented.md)."""

from ...core import registry
from .reference import check_local_inputs, local_attention, local_attention_vjp

MECHANISM = registry.register(
    "local", __name__, local_attention, local_attention_vjp, check_local_inputs, "spec/segmented.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["local_attention", "local_attention_vjp"]
