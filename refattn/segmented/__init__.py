"""Segmented, local and sparse-global attention (spec/segmented.md)."""

from .segments import segmented_attention, segmented_attention_vjp
from .bigbird import bigbird_attention, bigbird_attention_vjp
from .local import local_attention, local_attention_vjp
from .longformer import longformer_attention, longformer_attention_vjp
from .sliding import sliding_window_attention, sliding_window_attention_vjp, window_of

__all__ = [
    "segmented_attention",
    "segmented_attention_vjp",
    "sliding_window_attention",
    "sliding_window_attention_vjp",
    "window_of",
    "longformer_attention",
    "longformer_attention_vjp",
    "bigbird_attention",
    "bigbird_attention_vjp",
    "local_attention",
    "local_attention_vjp",
]
