"""Linformer on CPU: project keys and values (O(N·P)), then the tiled dense kernel.

Steps (1)-(2) of refattn/lowrank/linformer/reference.py in the compute dtype
(float32 for float32/float16/bfloat16 inputs, float64 otherwise: the
reference's functions with that precision's Numerics, so no float64 copy of
E, K or V exists for float32 inputs), step (3) over the P projected keys by
:func:`refattn.lowrank.kernels.tiled_attention` (by refattn/dense/numba.py
with grouped heads, and for the VJP): memory O(N·P + N·D). BLAS runs single-threaded
(refattn/lowrank/kernels.py).
"""

from __future__ import annotations

import numpy as np

from ...core.precision import FLOAT64, numerics
from ...core.results import Cotangents, Grads, Result
from ...dense import dense_attention, dense_attention_vjp
from ..kernels import as_compute, compute_dtype, returned, single_threaded_blas, tiled_attention
from .reference import LinformerInputs, chain_projection, projected_keys_values


def _numerics(x: LinformerInputs):
    """The reference's Numerics for the compute dtype: float32 (no rounding beyond it) or float64."""
    return numerics("float32") if compute_dtype(x.q) == np.float32 else FLOAT64


def _projected(x: LinformerInputs):
    dtype = compute_dtype(x.q)
    k_proj, v_proj = projected_keys_values(x, _numerics(x))
    return as_compute(x.q, dtype), as_compute(k_proj, dtype), as_compute(v_proj, dtype)


def forward(x: LinformerInputs) -> Result:
    """Steps (1)-(3): ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq)."""
    with single_threaded_blas():
        return _forward(x)


def _forward(x: LinformerInputs) -> Result:
    q, k_proj, v_proj = _projected(x)
    if q.shape[1] == k_proj.shape[1]:  # (3) on BLAS-sized tiles: the P projected keys are few
        out, lse = tiled_attention(q, k_proj, v_proj, q.dtype.type(x.scale))
    else:
        result = dense_attention(q, k_proj, v_proj, scale=x.scale, backend="numba")
        out, lse = result.out, result.lse
    return Result(out=out.astype(x.q.dtype, copy=False), lse=lse.astype(x.q.dtype, copy=False), aux={})


def vjp(x: LinformerInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (3')-(1'): ``q``, ``k``, ``v``, ``e`` (and ``f``)."""
    with single_threaded_blas():
        return _vjp(x, cotangents)


def _vjp(x: LinformerInputs, cotangents: Cotangents) -> Grads:
    q, k_proj, v_proj = _projected(x)
    dlse = None if cotangents.dlse is None else as_compute(cotangents.dlse, q.dtype)
    dense = dense_attention_vjp(as_compute(cotangents.dout, q.dtype), q, k_proj, v_proj, dlse=dlse, scale=x.scale,
                                backend="numba")  # fmt: skip
    grads = chain_projection(x, dense, _numerics(x))
    return Grads(returned(grads, x.q))
