"""Invariants of H-Transformer-1D (spec/hierarchical.md), reusable on any implementation.

``attend(q, k, v, **params) -> Result`` is the implementation under test.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require
from ...dense import dense_attention


def one_block_is_dense(attend, q, k, v, params, rtol=1e-12):
    """With one block of N tokens (one level) the hierarchy is dense (causal) attention."""
    require(params.get("block_size") == q.shape[2], "block_size = N")
    got = attend(q, k, v, **params)
    want = dense_attention(q, k, v, causal=params.get("causal", False), scale=params.get("scale"))
    close("out", got.out, want.out, rtol)
    if got.lse is not None:
        close("lse", got.lse, want.lse, rtol)


def rows_sum_to_one(attend, q, k, params, rtol=1e-12):
    """The implied (N × N) matrix, read as the output for identity values, has rows summing to 1 (to eps)."""
    n = q.shape[2]
    identity = np.broadcast_to(np.eye(n), (k.shape[0], k.shape[1], n, n))
    implied = attend(q, k, identity, **params).out  # (B, Hq, N, N)
    require(not params.get("padding"), "no padding")
    close("row sums", implied.sum(axis=-1), np.ones(implied.shape[:-1]), rtol)
    if not (np.all(implied >= 0.0)):
        raise AssertionError("implied matrix: negative weights")


def ignores_later_keys(attend, q, k, v, params, i, rtol=0.0):
    """Causal: outputs 0..i do not change when keys and values after i do."""
    require(params.get("causal", False), "causal=True")
    require(i + 1 < q.shape[2], "a position with later keys")
    rng = np.random.default_rng(i)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, i + 1:] += rng.standard_normal(k2[:, :, i + 1:].shape)
    v2[:, :, i + 1:] += rng.standard_normal(v2[:, :, i + 1:].shape)
    before = attend(q, k, v, **params)
    after = attend(q, k2, v2, **params)
    close(f"out[..:{i + 1}]", after.out[:, :, : i + 1], before.out[:, :, : i + 1], rtol)
