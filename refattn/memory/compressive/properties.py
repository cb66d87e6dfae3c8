"""Invariants of the Compressive Transformer (spec/memory.md, Compressive Transformer)."""

from __future__ import annotations

from ...core.invariants import close
from ..invariants import state_carries_over  # noqa: F401  (re-exported)
from ..xl_recurrence import xl_recurrence_attention


def rate_one_mean_is_plain_memory(forward, q, k, v, segment_len: int, mem_len: int, compressed_len: int,
                                  rtol: float = 1e-10):  # fmt: skip
    """``c = 1`` with mean pooling compresses nothing: the two memories are one of ``mem_len + compressed_len``."""
    got = forward(q, k, v, segment_len=segment_len, mem_len=mem_len, compressed_len=compressed_len, rate=1,
                  compression="mean_pool")  # fmt: skip
    want = xl_recurrence_attention(q, k, v, segment_len=segment_len, mem_len=mem_len + compressed_len)
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)
