"""Invariants of attention sinks (spec/memory.md, Attention sinks)."""

from __future__ import annotations

import numpy as np

from ...core.invariants import close
from ...position.rope import rope_attention
from ..invariants import state_carries_over  # noqa: F401  (re-exported)
from .reference import STATE  # noqa: F401


def sink_mask(n: int, segment_len: int, sink_count: int, recent_size: int) -> np.ndarray:
    """The (N, N) mask of the equivalent full pass: ``j <= i and (j < s or j >= L floor(i/L) - w)``."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (j <= i) & ((j < sink_count) | (j >= segment_len * (i // segment_len) - recent_size))


def original_positions_equal_masked_pass(forward, q, k, v, segment_len: int, sink_count: int, recent_size: int,
                                         rtol: float = 1e-10):  # fmt: skip
    """With stream positions, the stream equals one RoPE pass under :func:`sink_mask`."""
    got = forward(q, k, v, sink_count=sink_count, recent_size=recent_size, segment_len=segment_len,
                  positions="original")  # fmt: skip
    n = q.shape[2]
    want = rope_attention(q, k, v, q_positions=np.arange(n), k_positions=np.arange(n),
                          mask=sink_mask(n, segment_len, sink_count, recent_size))  # fmt: skip
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)
