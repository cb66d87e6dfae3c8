"""Memory tokens, the Recurrent Memory Transformer (spec/memory.md, Memory tokens)."""

from ...core import registry
from .reference import check_memory_token_inputs, memory_token_attention, memory_token_attention_vjp, memory_token_step

MECHANISM = registry.register(
    registry.Mechanism(
        name="memory_tokens",
        package="refattn.memory.memory_tokens",
        forward=memory_token_attention,
        vjp=memory_token_attention_vjp,
        check_inputs=check_memory_token_inputs,
        backends=("reference", "numba"),
        spec="spec/memory.md",
        state_held_fixed=True,
    )
)

__all__ = ["memory_token_attention", "memory_token_attention_vjp", "memory_token_step"]
