"""Scalable-Softmax attention on CPU: the factor folded into q, then the Numba dense kernel.

The same function as :mod:`refattn.dilution.ssmax.reference`, with the same
names and parameters (less ``precision`` and ``backend``). Steps (S1)-(S3)
are done here in O(N) memory, then :func:`refattn.dense.numba.dense_attention`
runs dense steps (1)-(7) on ``q' = f q`` tile by tile; no (Nq, Nk) array is
ever made by this module.

(S1) without a score-sized mask: causality and a window keep, for query ``i``
with aligned position ``i' = i + offset`` (refattn/core/masks.py), the keys
of one interval ``[lo_i, hi_i)``, so ``n_i = hi_i − lo_i`` in closed form.
A user mask is the caller's own array: it is reduced over its last axis
inside each row's interval, a block of rows at a time (:data:`MASK_BLOCK`
mask entries at most), so nothing larger than the mask is allocated. A mask
of one column (``(..., Nq, 1)``) counts the whole interval where it is True.

Precision: the factor and ``q'`` are formed in the kernel's compute dtype
(float32 for float32, float16 and bfloat16 inputs, float64 otherwise), the
gradients of ``s`` and ``b`` are summed in float64 and returned in the
compute dtype, like every other output.
"""

from __future__ import annotations

import numpy as np

from ...core.masks import query_offset
from ...core.results import Grads, Result
from ...dense import numba as dense_numba
from ...dense.inputs import DenseInputs, check_dense_inputs
from .reference import SSMaxInputs, check_ssmax_inputs, log_counts

#: Largest number of mask entries (rows x keys x broadcast batch and heads) reduced at once in (S1).
MASK_BLOCK = 1 << 22


def attended_counts(q, k, *, mask=None, causal=False, causal_alignment="bottom_right", window=None) -> np.ndarray:
    """``n_i`` in O(N) memory; see :func:`refattn.dilution.ssmax.reference.attended_counts`."""
    x = check_dense_inputs(
        q, k, k, mask=mask, bias=None, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0,
    )  # fmt: skip
    return counts_of(x)


def ssmax_attention(
    q,
    k,
    v,
    *,
    s,
    b=0.0,
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    dropout_keep=None,
    dropout_p=0.0,
) -> Result:
    """SSMax attention, tiled; see :func:`refattn.dilution.ssmax.reference.ssmax_attention`.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype,
        ``aux["counts"]`` (B, Hq, Nq) int64.
    """
    dense_params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    x = check_ssmax_inputs(q, k, v, s=s, b=b, **dense_params)
    counts, _, q_scaled = _folded(x, q)
    result = dense_numba.dense_attention(q_scaled, k, v, **dense_params)
    return Result(out=result.out, lse=result.lse, aux={"counts": counts})


def ssmax_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    s,
    b=0.0,
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    dropout_keep=None,
    dropout_p=0.0,
) -> Grads:
    """Gradients of :func:`ssmax_attention`; see :func:`refattn.dilution.ssmax.reference.ssmax_attention_vjp`.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v``, ``s`` and ``b`` (when given as arrays) and ``bias``
        (when given), in the compute dtype.
    """
    dense_params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    x = check_ssmax_inputs(q, k, v, s=s, b=b, **dense_params)
    counts, factor, q_scaled = _folded(x, q)
    dense_grads = dense_numba.dense_attention_vjp(dout, q_scaled, k, v, dlse=dlse, **dense_params)
    d_q_scaled = dense_grads["q"]  # (B, Hq, Nq, D), compute dtype
    dtype = d_q_scaled.dtype
    grads = Grads(q=factor[..., None] * d_q_scaled, k=dense_grads["k"], v=dense_grads["v"])
    # (S3') df_i = <q_i, dq'_i>; (S2') ds_h, db_h summed over the batch and the rows, in float64.
    d_factor = np.einsum("bhqd,bhqd->bhq", np.asarray(x.dense.q, dtype=dtype), d_q_scaled).astype(np.float64)
    if isinstance(x.s, np.ndarray):
        grads["s"] = np.einsum("bhq,bhq->h", log_counts(counts, np.float64), d_factor).astype(dtype)
    if isinstance(x.b, np.ndarray):
        grads["b"] = d_factor.sum(axis=(0, 2)).astype(dtype)
    if x.dense.bias is not None:
        grads["bias"] = dense_grads["bias"]
    return grads


def _folded(x: SSMaxInputs, q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps (S1)-(S3): counts (B, Hq, Nq), factor (B, Hq, Nq) and ``q'`` (B, Hq, Nq, D), in the compute dtype."""
    dtype = dense_numba._compute_dtype(q)
    # (S1) Keys each row attends to, from intervals and the user's mask.
    counts = counts_of(x.dense)  # (B, Hq, Nq) int64
    # (S2) f_i = s_h log n_i + b_h, 0 on fully masked rows.
    s, b = (np.asarray(p, dtype=dtype) for p in (x.s, x.b))
    s, b = (p[:, None] if p.ndim == 1 else p for p in (s, b))  # (Hq, 1) or ()
    factor = np.where(counts > 0, s * log_counts(counts, dtype) + b, dtype.type(0))  # (B, Hq, Nq)
    # (S3) q'_i = f_i q_i.
    q_scaled = factor[..., None] * np.asarray(x.dense.q, dtype=dtype)  # (B, Hq, Nq, D)
    return counts, factor, q_scaled


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
