"""Scalable-Softmax attention on CPU: the factor folded into q, then the Numba dense kernel.

The backend of :mod:`refattn.dilution.ssmax.reference` (refattn/core/registry.py):
:func:`forward` and :func:`vjp` over its checked inputs. Steps (S1)-(S3) are
done here in O(N) memory, then :func:`refattn.dense.numba.forward` runs dense
steps (1)-(7) on ``q' = f q`` tile by tile; no (Nq, Nk) array is ever made
by this module.

(S1) without a score-sized mask: causality and a window keep, for query ``i``
with aligned position ``i' = i + offset`` (refattn/core/masks.py), the keys
of one interval ``[lo_i, hi_i)``, so ``n_i = hi_i − lo_i`` in closed form.
A user mask is the caller's own array: it is reduced over its last axis
inside each row's interval, a block of rows at a time (:data:`MASK_BLOCK`
mask entries at most), so nothing larger than the mask is allocated. A mask
of one column (``(..., Nq, 1)``) counts the whole interval where it is True.

Precision: the factor and ``q'`` are formed in the kernel's compute dtype
(float32 for float32, float16 and bfloat16 inputs, float64 otherwise), the
gradients of ``s`` and ``s_bias`` are summed in float64 and returned in the
compute dtype, like every other output.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...core.masks import query_offset
from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from ...dense import numba as dense_numba
from ...dense.inputs import DenseInputs
from .reference import SSMaxInputs, log_counts

#: Largest number of mask entries (rows x keys x broadcast batch and heads) reduced at once in (S1).
MASK_BLOCK = 1 << 22


def forward(x: SSMaxInputs) -> Result:
    """``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype, ``aux["counts"]`` (B, Hq, Nq) int64."""
    counts, _, dense = _folded(x)
    result = dense_numba.forward(dense)
    return Result(out=result.out, lse=result.lse, aux={"counts": counts})


def vjp(x: SSMaxInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """``q``, ``k``, ``v``, ``s`` and ``s_bias`` (when given as arrays) and ``bias`` (when given), in the
    compute dtype.

    ``saved``, this backend's forward of the same inputs, holds the dense kernel's ``out`` and ``lse`` on ``q'``.
    """
    counts, factor, dense = _folded(x)
    dense_grads = dense_numba.vjp(dense, cotangents, saved)
    d_q_scaled = dense_grads["q"]  # (B, Hq, Nq, D), compute dtype
    dtype = d_q_scaled.dtype
    grads = Grads(q=factor[..., None] * d_q_scaled, k=dense_grads["k"], v=dense_grads["v"])
    # (S3') df_i = <q_i, dq'_i>; (S2') ds_h, ds_bias_h summed over the batch and the rows, in float64.
    d_factor = np.einsum("bhqd,bhqd->bhq", np.asarray(x.dense.q, dtype=dtype), d_q_scaled).astype(np.float64)
    if isinstance(x.s, np.ndarray):
        grads["s"] = np.einsum("bhq,bhq->h", log_counts(counts, np.float64), d_factor).astype(dtype)
    if isinstance(x.s_bias, np.ndarray):
        grads["s_bias"] = d_factor.sum(axis=(0, 2)).astype(dtype)
    if x.dense.bias is not None:
        grads["bias"] = dense_grads["bias"]
    return grads


def _folded(x: SSMaxInputs) -> tuple[np.ndarray, np.ndarray, DenseInputs]:
    """Steps (S1)-(S3): counts (B, Hq, Nq), factor (B, Hq, Nq) and the dense inputs with ``q'`` (B, Hq, Nq, D),
    in the compute dtype."""
    dtype = compute_dtype(x.dense.q)
    # (S1) Keys each row attends to, from intervals and the user's mask.
    counts = counts_of(x.dense) if x.n_rule == "attended" else np.full(x.dense.shape.scores[:3], x.dense.shape.kv_len)
    # (S2) f_i = s_h log n_i + s_bias_h, 0 on fully masked rows.
    s, s_bias = (np.asarray(p, dtype=dtype) for p in (x.s, x.s_bias))
    s, s_bias = (p[:, None] if p.ndim == 1 else p for p in (s, s_bias))  # (Hq, 1) or ()
    factor = np.where(counts > 0, s * log_counts(counts, dtype) + s_bias, dtype.type(0))  # (B, Hq, Nq)
    # (S3) q'_i = f_i q_i.
    q_scaled = factor[..., None] * np.asarray(x.dense.q, dtype=dtype)  # (B, Hq, Nq, D)
    return counts, factor, replace(x.dense, q=q_scaled)


def key_intervals(q_len: int, kv_len: int, *, causal: bool, window, alignment: str) -> tuple[np.ndarray, np.ndarray]:
    """``[lo_i, hi_i)``, the keys causality and the window leave to each query, (Nq,) int64 each.

    Query ``i`` at aligned position ``i' = i + offset`` keeps ``i' − left <= j <=
    i' + right`` (``right`` at most 0 when causal), clipped to ``[0, Nk)``; an
    empty interval has ``lo_i = hi_i``.
    """
    aligned = np.arange(q_len, dtype=np.int64) + query_offset(q_len, kv_len, alignment)  # (Nq,)
    lo = np.zeros(q_len, dtype=np.int64)
    hi = np.full(q_len, kv_len, dtype=np.int64)
    left, right = window if window is not None else (None, None)
    if left is not None:
        lo = np.maximum(lo, aligned - left)
    if right is not None:
        hi = np.minimum(hi, aligned + right + 1)
    if causal:
        hi = np.minimum(hi, aligned + 1)
    lo = np.clip(lo, 0, kv_len)
    return lo, np.clip(hi, lo, kv_len)


def counts_of(x: DenseInputs) -> np.ndarray:
    """Step (S1) in O(N) memory beyond the user's mask: ``n_i`` (B, Hq, Nq) int64."""
    shape = x.shape
    lo, hi = key_intervals(shape.q_len, shape.kv_len, causal=x.causal, window=x.window, alignment=x.causal_alignment)
    if x.mask is None:
        return np.broadcast_to(hi - lo, shape.scores[:3]).copy()
    mask = x.mask.reshape((1,) * (4 - x.mask.ndim) + x.mask.shape)  # (Bm, Hm, Qm, Km), each 1 or full
    rows = np.arange(shape.q_len) if mask.shape[2] > 1 else np.zeros(shape.q_len, dtype=np.int64)
    if mask.shape[3] == 1:  # one column: the whole interval, where it is True
        counts = mask[:, :, rows, 0] * (hi - lo)  # (Bm, Hm, Nq)
    else:
        counts = np.empty(mask.shape[:2] + (shape.q_len,), dtype=np.int64)
        keys = np.arange(shape.kv_len)  # (Nk,)
        step = max(1, MASK_BLOCK // (mask.shape[0] * mask.shape[1] * shape.kv_len))
        for start in range(0, shape.q_len, step):
            block = slice(start, min(start + step, shape.q_len))
            inside = (keys >= lo[block, None]) & (keys < hi[block, None])  # (rows, Nk)
            counts[:, :, block] = np.sum(mask[:, :, rows[block], :] & inside, axis=-1)
    return np.broadcast_to(counts, shape.scores[:3]).astype(np.int64)
