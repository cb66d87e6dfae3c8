"""Linformer on CPU: project keys and values (O(N·P)), then the tiled dense kernel.

Steps (1)-(2) of refattn/lowrank/linformer/reference.py in the compute dtype
(float32 for float32/float16/bfloat16 inputs, float64 otherwise), step (3)
by refattn/dense/numba.py over the P projected keys: memory O(N·P + N·D).
"""

from __future__ import annotations

from ...core.precision import FLOAT64
from ...core.results import Cotangents, Grads, Result
from ...dense import dense_attention, dense_attention_vjp
from ..kernels import as_compute, compute_dtype, returned
from .reference import LinformerInputs, chain_projection, projected_keys_values


def _projected(x: LinformerInputs):
    dtype = compute_dtype(x.q)
    k_proj, v_proj = projected_keys_values(x, FLOAT64)
    return as_compute(x.q, dtype), as_compute(k_proj, dtype), as_compute(v_proj, dtype)


def forward(x: LinformerInputs) -> Result:
    """Steps (1)-(3): ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq)."""
    q, k_proj, v_proj = _projected(x)
    result = dense_attention(q, k_proj, v_proj, scale=x.scale, backend="numba")
    return Result(out=result.out.astype(x.q.dtype), lse=result.lse.astype(x.q.dtype), aux={})


def vjp(x: LinformerInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (3')-(1'): ``q``, ``k``, ``v``, ``e`` (and ``f``)."""
    q, k_proj, v_proj = _projected(x)
    dlse = None if cotangents.dlse is None else as_compute(cotangents.dlse, q.dtype)
    dense = dense_attention_vjp(as_compute(cotangents.dout, q.dtype), q, k_proj, v_proj, dlse=dlse, scale=x.scale,
                                backend="numba")  # fmt: skip
    grads = chain_projection(x, dense, FLOAT64)
    return Grads(returned(grads, x.q))
