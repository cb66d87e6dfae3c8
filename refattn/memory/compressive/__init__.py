"""The Compressive Transformer (spec/memory.md, Compressive Transformer)."""

from ...core import registry
from .reference import (
    attention_reconstruction_loss,
    attention_reconstruction_loss_vjp,
    check_compressive_inputs,
    compressive_attention,
    compressive_attention_vjp,
    compressive_step,
)

MECHANISM = registry.register(
    "compressive", __name__, compressive_attention, compressive_attention_vjp, check_compressive_inputs, "spec/memory.md",
    state_held_fixed=True, backends=("reference", "numba", "cupy"),
)

__all__ = [
    "compressive_attention",
    "compressive_attention_vjp",
    "compressive_step",
    "attention_reconstruction_loss",
    "attention_reconstruction_loss_vjp",
]
