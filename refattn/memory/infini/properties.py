"""Invariants of Infini-attention (spec/memory.md, Infini-attention)."""

from __future__ import annotations

import numpy as np

from ...core.invariants import close
from ...dense import dense_attention
from ..invariants import state_carries_over  # noqa: F401  (re-exported)
from .reference import STATE  # noqa: F401


def closed_gate_is_local_attention(forward, q, k, v, segment_len: int, rtol: float = 1e-10):
    """``β → −∞`` (here −60, sigmoid below 1e-26): the output is causal attention within each segment."""
    got = forward(q, k, v, segment_len=segment_len, beta=np.full(q.shape[1], -60.0))
    i, j = np.arange(q.shape[2])[:, None], np.arange(q.shape[2])[None, :]
    close("out", got.out, dense_attention(q, k, v, mask=(j <= i) & (i // segment_len == j // segment_len)).out, rtol)
