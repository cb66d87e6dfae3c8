"""Infini-attention (spec/memory.md, Infini-attention)."""

from ...core import registry
from .reference import check_infini_inputs, infini_attention, infini_attention_vjp, infini_step

MECHANISM = registry.register(
    "infini", __name__, infini_attention, infini_attention_vjp, check_infini_inputs, "spec/memory.md",
    state_held_fixed=True, backends=("reference", "numba", "cupy"),
)

__all__ = ["infini_attention", "infini_attention_vjp", "infini_step"]
