"""BigBird over an array namespace ``xp`` (NumPy or CuPy): the non-global query blocks through the shared
block-sparse algorithm (refattn/segmented/blocksparse_xp.py) over the Numba backend's per-head key-block
lists, the global rows (ITC: query blocks 0 and nb - 1; ETC: the g extra global tokens; every row under the
short-sequence rule) through dense attention's tiled algorithm over every key (spec/segmented.md)."""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .. import blocksparse_xp
from .numba import _global_rows, _keys
from .reference import BigBirdInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # query rows and listed keys (or keys) of a tile


def _pattern(x: BigBirdInputs) -> blocksparse_xp.Pattern:
    return blocksparse_xp.Pattern(*_keys(x), block=x.block_size, scale=x.scale)


def _problem(x: BigBirdInputs, xp):
    """q, k, v on the device, the global rows (on the device), whether any row is not global, and the global
    rows' dense problem over every key."""
    dtype = compute_dtype(x.q.dtype)
    q, k, v = (xp.asarray(a, dtype=dtype) for a in (x.q, x.k, x.v))
    rows = _global_rows(x)
    has_sparse_rows = rows.size < x.shape.q_len
    rows = xp.asarray(rows)
    return (q, k, v), rows, has_sparse_rows, dense_xp.inputs_over(q[:, :, rows], k, v, x.scale)


def forward(x: BigBirdInputs, xp) -> Result:
    (q, k, v), rows, has_sparse_rows, every_key = _problem(x, xp)
    g = x.extra_global_tokens
    out = xp.zeros(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
    lse = xp.full(q.shape[:3], -np.inf, dtype=q.dtype)
    if has_sparse_rows:
        out[:, :, g:], lse[:, :, g:] = blocksparse_xp.attend(q[:, :, g:], k, v, _pattern(x), xp, (BLOCK_Q, BLOCK_K))
    out[:, :, rows], lse[:, :, rows] = dense_xp.attend(every_key, xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={})


def vjp(x: BigBirdInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    (q, k, v), rows, has_sparse_rows, every_key = _problem(x, xp)
    g, dtype = x.extra_global_tokens, q.dtype
    result = forward(x, xp) if saved is None else saved
    dout = xp.asarray(cotangents.dout, dtype=dtype)
    dlse = xp.zeros(q.shape[:3], dtype) if cotangents.dlse is None else xp.asarray(cotangents.dlse, dtype=dtype)
    global_cotangents = Cotangents(dout[:, :, rows], dlse[:, :, rows])
    global_grads = dense_xp.attend_vjp(every_key, global_cotangents, xp, (BLOCK_Q, BLOCK_K))
    dq, dk, dv = xp.zeros_like(q), global_grads["k"], global_grads["v"]
    if has_sparse_rows:
        # The global rows' cotangents went to the dense step; the sparse step sees the others only.
        dout_sparse, dlse_sparse = dout.copy(), dlse.copy()
        dout_sparse[:, :, rows], dlse_sparse[:, :, rows] = 0.0, 0.0
        out, lse = xp.asarray(result.out, dtype=dtype), xp.asarray(result.lse, dtype=dtype)
        dq[:, :, g:], dk_sparse, dv_sparse = blocksparse_xp.attend_vjp(
            q[:, :, g:], k, v, _pattern(x), xp, (BLOCK_Q, BLOCK_K), out[:, :, g:], lse[:, :, g:],
            dout_sparse[:, :, g:], dlse_sparse[:, :, g:])  # fmt: skip
        dk, dv = dk + dk_sparse, dv + dv_sparse
    dq[:, :, rows] = global_grads["q"]
    return Grads(q=dq, k=dk, v=dv)
