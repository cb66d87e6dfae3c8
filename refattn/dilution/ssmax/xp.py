"""Scalable-Softmax attention over an array namespace ``xp`` (NumPy or CuPy): (S1)-(S3) on the device,
then dense attention's tiled algorithm on ``q' = f q`` (spec/dilution.md).

(S1) counts each row's kept keys tile by tile (:func:`refattn.dense.xp.attended_counts`, the same mask,
causality and window attention applies), so no (Nq, Nk) array is formed. The gradients of ``s`` and
``s_bias`` are summed in float64 and returned in the compute dtype, as the Numba backend's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype, device_array
from ...dense import xp as dense_xp
from .reference import SSMaxInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


def _per_head(parameter, xp, dtype):
    """A number, or an (Hq,) array as (Hq, 1), on the device: broadcasts over (B, Hq, Nq)."""
    value = device_array(parameter, xp, dtype)
    return value[:, None] if value.ndim == 1 else value


def _folded(x: SSMaxInputs, xp):
    """(S1)-(S3): counts (B, Hq, Nq) int64, ``log n`` and the factor (B, Hq, Nq), and dense inputs with ``q'``."""
    dtype = compute_dtype(x.dense.q.dtype)
    # (S1) n_i, the keys row i attends to (or Nk on every row for "axis_length").
    if x.n_rule == "attended":
        counts = dense_xp.attended_counts(x.dense, xp, (BLOCK_Q, BLOCK_K))
    else:
        counts = xp.full(x.dense.shape.scores[:3], x.dense.shape.kv_len, dtype=np.int64)
    # (S2) f_i = s_h log n_i + s_bias_h, 0 on fully masked rows (log 0 never formed).
    log_n = xp.log(xp.maximum(counts, 1).astype(dtype))
    factor = xp.where(counts > 0, _per_head(x.s, xp, dtype) * log_n + _per_head(x.s_bias, xp, dtype), 0.0)
    factor = factor.astype(dtype)
    # (S3) q'_i = f_i q_i.
    q_scaled = factor[..., None] * xp.asarray(x.dense.q, dtype=dtype)  # (B, Hq, Nq, D)
    return counts, log_n, factor, replace(x.dense, q=q_scaled)


def forward(x: SSMaxInputs, xp) -> Result:
    counts, _, _, dense = _folded(x, xp)
    out, lse = dense_xp.attend(dense, xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={"counts": counts})


def vjp(x: SSMaxInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    _, log_n, factor, dense = _folded(x, xp)
    grads = dense_xp.attend_vjp(dense, cotangents, xp, (BLOCK_Q, BLOCK_K), saved)
    d_q_scaled = grads["q"]  # (B, Hq, Nq, D)
    grads["q"] = factor[..., None] * d_q_scaled
    # (S3') df_i = <q_i, dq'_i>; (S2') ds_h and ds_bias_h sum over the batch and the rows, in float64.
    q = xp.asarray(x.dense.q, dtype=d_q_scaled.dtype)
    d_factor = (q * d_q_scaled).sum(axis=-1).astype(np.float64)  # (B, Hq, Nq)
    if isinstance(x.s, np.ndarray):
        grads["s"] = (log_n.astype(np.float64) * d_factor).sum(axis=(0, 2)).astype(d_q_scaled.dtype)
    if isinstance(x.s_bias, np.ndarray):
        grads["s_bias"] = d_factor.sum(axis=(0, 2)).astype(d_q_scaled.dtype)
    return grads
