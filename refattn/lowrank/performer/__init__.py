"""Performer, FAVOR+ (spec/low_rank.md)."""

from ...core import registry
from .presets import PRESETS
from .reference import check_inputs, implied_attention, orthogonal_features, performer_attention, performer_attention_vjp

MECHANISM = registry.register(
    "performer", __name__, performer_attention, performer_attention_vjp, check_inputs, "spec/low_rank.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["performer_attention", "performer_attention_vjp", "orthogonal_features", "implied_attention", "PRESETS"]
