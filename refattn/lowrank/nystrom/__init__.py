"""Nyströmformer (spec/low_rank.md)."""

from ...core import registry
from .presets import PRESETS
from .reference import check_inputs, nystrom_attention, nystrom_attention_vjp

MECHANISM = registry.register(
    "nystrom", __name__, nystrom_attention, nystrom_attention_vjp, check_inputs, "spec/low_rank.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["nystrom_attention", "nystrom_attention_vjp", "PRESETS"]
