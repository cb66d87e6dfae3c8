"""Longformer over an array namespace ``xp`` (NumPy or CuPy): every row's band and global keys through the
shared block-sparse algorithm (refattn/segmented/blocksparse_xp.py) over the Numba backend's key lists, then
the global rows again through dense attention's tiled algorithm over every key with the global projections
(spec/segmented.md, steps (1)-(3)). Like the Numba backend, it does not pad for the hf preset (padding
changes no real token's output)."""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .. import blocksparse_xp
from .numba import _kernel_options, _keys
from .reference import LongformerInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # query rows and listed keys (or keys) of a tile


def _pattern(x: LongformerInputs) -> blocksparse_xp.Pattern:
    return blocksparse_xp.Pattern(*_keys(x), **_kernel_options(x))


def _arrays(x: LongformerInputs, xp) -> dict:
    """q, k, v and their global projections (the same arrays when not given), on the device."""
    dtype = compute_dtype(x.q.dtype)
    local = {name: xp.asarray(getattr(x, name), dtype=dtype) for name in ("q", "k", "v")}
    return {**local, **{f"{name}_global": xp.asarray(x.projections[f"{name}_global"], dtype=dtype)
                        if f"{name}_global" in x.projections else local[name] for name in ("q", "k", "v")}}  # fmt: skip


def _global_problems(x: LongformerInputs, a: dict, xp):
    """(3) Per sequence with global tokens: b, its global rows (on the device) and their dense problem over
    every key with the global projections."""
    for b in range(x.shape.batch):
        rows = np.flatnonzero(x.global_tokens[b])
        if rows.size:
            rows = xp.asarray(rows)
            yield b, rows, dense_xp.inputs_over(a["q_global"][b:b + 1][:, :, rows], a["k_global"][b:b + 1],
                                                a["v_global"][b:b + 1], x.scale)  # fmt: skip


def forward(x: LongformerInputs, xp) -> Result:
    a = _arrays(x, xp)
    out, lse = blocksparse_xp.attend(a["q"], a["k"], a["v"], _pattern(x), xp, (BLOCK_Q, BLOCK_K))
    for b, rows, problem in _global_problems(x, a, xp):
        global_out, global_lse = dense_xp.attend(problem, xp, (BLOCK_Q, BLOCK_K))
        out[b][:, rows], lse[b][:, rows] = global_out[0], global_lse[0]
    return Result(out=out, lse=lse, aux={})


def vjp(x: LongformerInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    a = _arrays(x, xp)
    dtype = a["q"].dtype
    result = forward(x, xp) if saved is None else saved
    out, lse = xp.asarray(result.out, dtype=dtype), xp.asarray(result.lse, dtype=dtype)
    dout = xp.asarray(cotangents.dout, dtype=dtype)
    dlse = xp.zeros(lse.shape, dtype) if cotangents.dlse is None else xp.asarray(cotangents.dlse, dtype=dtype)
    # Global rows hold the global softmax's lse; +inf gives them no weight in the local backward.
    is_global = xp.asarray(x.global_tokens)[:, None, :]  # (B, 1, N)
    dq, dk, dv = blocksparse_xp.attend_vjp(a["q"], a["k"], a["v"], _pattern(x), xp, (BLOCK_Q, BLOCK_K), out,
                                           xp.where(is_global, np.inf, lse), xp.where(is_global[..., None], 0.0, dout),
                                           xp.where(is_global, 0.0, dlse))  # fmt: skip
    d_global = {name: xp.zeros(a[f"{name}_global"].shape, dtype) for name in ("q", "k", "v")}
    for b, rows, problem in _global_problems(x, a, xp):
        grads = dense_xp.attend_vjp(problem, Cotangents(dout[b:b + 1][:, :, rows], dlse[b:b + 1][:, :, rows]), xp,
                                    (BLOCK_Q, BLOCK_K))  # fmt: skip
        d_global["q"][b][:, rows] = grads["q"][0]
        d_global["k"][b], d_global["v"][b] = grads["k"][0], grads["v"][0]
    if x.projections:
        return Grads(q=dq, k=dk, v=dv, q_global=d_global["q"], k_global=d_global["k"], v_global=d_global["v"])
    return Grads(q=dq + d_global["q"], k=dk + d_global["k"], v=dv + d_global["v"])
