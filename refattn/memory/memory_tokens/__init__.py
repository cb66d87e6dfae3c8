"""Memory tokens, the Recurrent Memory Transformer (spec/memory.md, Memory tokens)."""

from ...core import registry
from .reference import check_memory_token_inputs, memory_token_attention, memory_token_attention_vjp, memory_token_step

MECHANISM = registry.register(
    "memory_tokens", __name__, memory_token_attention, memory_token_attention_vjp, check_memory_token_inputs, "spec/memory.md",
    state_held_fixed=True, backends=("reference", "numba", "cupy"),
)

__all__ = ["memory_token_attention", "memory_token_attention_vjp", "memory_token_step"]
