"""Invariants of Transformer-XL segment recurrence (spec/memory.md, "Streaming equals the full pass")."""

from __future__ import annotations

import numpy as np

from ...core.invariants import close
from ...dense import dense_attention
from ..invariants import segment_memory_mask, state_carries_over  # noqa: F401  (re-exported)
from .reference import STATE  # noqa: F401


def streaming_equals_masked_pass(forward, q, k, v, segment_len: int, mem_len: int, rtol: float = 1e-10):
    """From an empty memory, the stream equals one dense pass with ``j <= i and j >= L floor(i/L) - M``."""
    got = forward(q, k, v, segment_len=segment_len, mem_len=mem_len)
    want = dense_attention(q, k, v, mask=segment_memory_mask(q.shape[2], segment_len, mem_len))
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)


def zero_memory_is_segment_local(forward, q, k, v, segment_len: int, rtol: float = 1e-10):
    """``mem_len = 0``: each segment attends causally to itself alone."""
    got = forward(q, k, v, segment_len=segment_len, mem_len=0)
    i, j = np.arange(q.shape[2])[:, None], np.arange(q.shape[2])[None, :]
    want = dense_attention(q, k, v, mask=(j <= i) & (i // segment_len == j // segment_len))
    close("out", got.out, want.out, rtol)


def covering_memory_is_causal(forward, q, k, v, segment_len: int, rtol: float = 1e-10):
    """A memory holding the whole past (``mem_len >= N``) gives full causal attention, whatever the segments."""
    got = forward(q, k, v, segment_len=segment_len, mem_len=q.shape[2])
    close("out", got.out, dense_attention(q, k, v, causal=True).out, rtol)


def same_length_is_window(forward, q, k, v, segment_len: int, mem_len: int, rtol: float = 1e-10):
    """``same_length``: every query sees its last ``mem_len`` tokens, itself included (a causal window)."""
    got = forward(q, k, v, segment_len=segment_len, mem_len=mem_len, same_length=True)
    close("out", got.out, dense_attention(q, k, v, causal=True, window=(mem_len - 1, 0)).out, rtol)
