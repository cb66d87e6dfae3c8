"""Segmented attention with an explicit inter-segment step (spec/segmented.md)."""

from ...core import registry
from .reference import check_segmented_inputs, segmented_attention, segmented_attention_vjp

MECHANISM = registry.register(
    "segmented", __name__, segmented_attention, segmented_attention_vjp, check_segmented_inputs, "spec/segmented.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["segmented_attention", "segmented_attention_vjp"]
