"""Sliding-window attention as each library counts its window (spec/segmented.md)."""

from ...core import registry
from .reference import CONVENTIONS, check_sliding_window_inputs, sliding_window_attention, sliding_window_attention_vjp, window_of

MECHANISM = registry.register(
    "sliding_window", __name__, sliding_window_attention, sliding_window_attention_vjp, check_sliding_window_inputs,
    "spec/segmented.md", backends=("reference", "numba", "cupy"),
)

__all__ = ["sliding_window_attention", "sliding_window_attention_vjp", "window_of", "CONVENTIONS"]
