"""T5's bucketed bias over an array namespace ``xp`` (NumPy or CuPy): dense attention's tiled algorithm
with ``table[bucket(p_j − p_i), h]`` read tile by tile (spec/position.md, (T1)-(T4)).

Every distance ``|p_j − p_i| >= max_distance`` shares its side's last bucket ((B4)), so the buckets of
the distances clipped to ``[−max_distance, max_distance]`` (and to the span the positions reach) are
all there is: the reference's own bucket function computes them once on the host, and each head's
bias per clipped distance is a small table on the device. A tile reads it at its clipped distances.
The table's gradient is the tile's ``∂L/∂z`` summed over the batch and scattered by clipped distance
(:func:`refattn.core.xp.scatter_add`), then by bucket.

``aux["buckets"]`` is the reference's (Nq, Nk) bucket matrix, computed on the host by its
:func:`bucket_matrix`: O(N²) memory, unlike everything else here.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype, scatter_add
from ...dense import xp as dense_xp
from .reference import T5Inputs, bucket_matrix, relative_position_bucket

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


class _DistanceBias:
    """(T1)-(T3) per clipped distance: ``bias[h, n] = table[bucket(d_lo + n), h]`` on the device."""

    def __init__(self, x: T5Inputs, xp):
        s = x.dense.shape
        self.xp, self.heads = xp, s.q_heads
        far = x.bucketing.max_distance  # (B4): every farther distance is in the same bucket as this one
        self.low = max(-far, int(x.k_positions.min() - x.q_positions.max()))
        self.high = min(far, int(x.k_positions.max() - x.q_positions.min()))
        # (T2) The bucket of each clipped distance d_lo .. d_hi, by the reference's (B1)-(B4).
        b = x.bucketing
        relative = np.arange(self.low, self.high + 1, dtype=np.int64)
        self.bucket = relative_position_bucket(relative, b.bidirectional, b.num_buckets, b.max_distance)  # (Nd,)
        dtype = compute_dtype(x.dense.q.dtype)
        self.bias = xp.asarray(x.table[self.bucket].T, dtype=dtype)  # (Hq, Nd)
        self.q_positions, self.k_positions = xp.asarray(x.q_positions), xp.asarray(x.k_positions)
        self.shape = (1, s.kv_heads, s.q_heads // s.kv_heads)

    def distances(self, i0: int, i1: int, j0: int, j1: int):
        """(T1) ``clip(p_j − p_i) − d_lo``, the column of :attr:`bias` each pair reads, (bq, bk)."""
        relative = self.k_positions[None, j0:j1] - self.q_positions[i0:i1, None]
        return self.xp.clip(relative, self.low, self.high) - self.low

    def term(self, i0: int, i1: int, j0: int, j1: int):
        """(T3) The tile's bias, (1, Hkv, G, bq, bk)."""
        return self.bias[:, self.distances(i0, i1, j0, j1)].reshape(self.shape + (i1 - i0, j1 - j0))


def forward(x: T5Inputs, xp) -> Result:
    """(T1)-(T4) per tile inside dense (1)-(7); ``aux["buckets"]`` (Nq, Nk) from the host."""
    out, lse = dense_xp.attend(x.dense, xp, (BLOCK_Q, BLOCK_K), _DistanceBias(x, xp).term)
    return Result(out=out, lse=lse, aux={"buckets": bucket_matrix(x.q_positions, x.k_positions, x.bucketing)})


def vjp(x: T5Inputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Dense (7')-(1') with the same term, then (T3'): the table's gradient by scatter-adds."""
    bias = _DistanceBias(x, xp)
    d_bias = xp.zeros(bias.bias.shape, dtype=bias.bias.dtype)  # (Hq, Nd)

    def add_tile(i0: int, i1: int, j0: int, j1: int, dz) -> None:
        # Summed over the batch, each pair's gradient goes to its clipped distance's column.
        per_head = dz.sum(axis=0).reshape(bias.heads, -1)  # (Hq, bq·bk)
        scatter_add(xp, d_bias, (slice(None), bias.distances(i0, i1, j0, j1).ravel()), per_head)

    grads = dense_xp.attend_vjp(x.dense, cotangents, xp, (BLOCK_Q, BLOCK_K), saved, bias.term, add_tile)
    # (T3') Each distance's gradient goes to its bucket's row.
    d_table = xp.zeros((x.bucketing.num_buckets, bias.heads), dtype=d_bias.dtype)
    scatter_add(xp, d_table, xp.asarray(bias.bucket), d_bias.T)
    grads["table"] = d_table
    return grads
