"""Sliding-window attention as each library counts its window (spec/segmented.md)."""

from ...core import registry
from .reference import CONVENTIONS, check_sliding_window_inputs, sliding_window_attention, sliding_window_attention_vjp, window_of

MECHANISM = registry.register(
    registry.Mechanism(
        name="sliding_window",
        package="refattn.segmented.sliding",
        forward=sliding_window_attention,
        vjp=sliding_window_attention_vjp,
        check_inputs=check_sliding_window_inputs,
        backends=("reference", "numba"),
        spec="spec/segmented.md",
    )
)

__all__ = ["sliding_window_attention", "sliding_window_attention_vjp", "window_of", "CONVENTIONS"]
