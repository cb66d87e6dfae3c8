"""Transformer-XL segment-level recurrence (spec/memory.md, Transformer-XL)."""

from ...core import registry
from .reference import (
    check_xl_recurrence_inputs,
    xl_recurrence_attention,
    xl_recurrence_attention_vjp,
    xl_recurrence_step,
)

MECHANISM = registry.register(
    "xl_recurrence", __name__, xl_recurrence_attention, xl_recurrence_attention_vjp, check_xl_recurrence_inputs, "spec/memory.md",
    state_held_fixed=True, backends=("reference", "numba", "cupy"),
)

__all__ = ["xl_recurrence_attention", "xl_recurrence_attention_vjp", "xl_recurrence_step"]
