"""Invariants of segmented attention (spec/segmented.md, "Invariants"), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)`` returning an object with
``.out`` and ``.lse`` (a refattn Result, or your kernel wrapped to look like
one), raises ``AssertionError`` describing a violation, or returns None.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require


def one_segment_is_dense(attend, dense, q, k, v, params, rtol=1e-10):
    """Segments of length N, no inter-segment step: dense attention (causal or not)."""
    require(params.get("integration", "none") == "none", "integration='none'")
    got = attend(q, k, v, segment_len=q.shape[2], **params)
    want = dense(q, k, v, causal=bool(params.get("causal", False)))
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)


def one_segment_merge_is_one_extra_key(attend, dense, q, k, v, params, rtol=1e-10):
    """One segment, ``"lse_merge"``, mean pooling, not causal: dense attention over the N keys
    plus one extra key, the mean of the keys, with the mean of the values."""
    require(not params.get("causal", False), "no causal mask")
    got = attend(q, k, v, segment_len=q.shape[2], integration="lse_merge", pooling="mean", **params)
    extra_k, extra_v = k.mean(axis=2, keepdims=True), v.mean(axis=2, keepdims=True)
    want = dense(q, np.concatenate([k, extra_k], 2), np.concatenate([v, extra_v], 2))
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)
