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
    registry.Mechanism(
        name="transformer_xl",
        package="refattn.position.transformer_xl",
        forward=transformer_xl_attention,
        vjp=transformer_xl_attention_vjp,
        check_inputs=check_transformer_xl_inputs,
        backends=("reference", "numba"),
        spec="spec/position.md",
    )
)

__all__ = [
    "sinusoid_relative_embeddings",
    "rel_shift",
    "relative_position_scores",
    "transformer_xl_attention",
    "transformer_xl_attention_vjp",
]
