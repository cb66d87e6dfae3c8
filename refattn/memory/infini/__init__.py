"""Infini-attention (spec/memory.md, Infini-attention)."""

from ...core import registry
from .reference import check_infini_inputs, infini_attention, infini_attention_vjp, infini_step

MECHANISM = registry.register(
    registry.Mechanism(
        name="infini",
        package="refattn.memory.infini",
        forward=infini_attention,
        vjp=infini_attention_vjp,
        check_inputs=check_infini_inputs,
        backends=("reference", "numba"),
        spec="spec/memory.md",
        state_held_fixed=True,
    )
)

__all__ = ["infini_attention", "infini_attention_vjp", "infini_step"]
