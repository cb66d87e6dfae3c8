"""Transformer-XL relative attention scores (spec/position.md, Transformer-XL)."""

from ...core import registry
from .inputs import check_transformer_xl_inputs
from .reference import (
    rel_shift,
    relative_position_scores,
    sinusoid_relative_embeddings,
    transformer_xl_attention,
    transformer_xl_attention_vjp,
)

MECHANISM = registry.register(
    "transformer_xl", __name__, transformer_xl_attention, transformer_xl_attention_vjp, check_transformer_xl_inputs, "spec/position.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = [
    "sinusoid_relative_embeddings",
    "rel_shift",
    "relative_position_scores",
    "transformer_xl_attention",
    "transformer_xl_attention_vjp",
]
