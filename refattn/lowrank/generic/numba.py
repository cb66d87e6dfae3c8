"""Generic low-rank attention on CPU: the factored products in O(N·r).

Steps (1)-(3) of refattn/lowrank/generic/reference.py with the same names:
``S = W V`` and ``s = W 1`` (r-sized summaries), then ``U S`` and ``U s``,
one BLAS product per (batch, head) in parallel (refattn.lowrank.kernels).
Nothing (Nq, Nk)-sized exists. float32 for float32/float16/bfloat16 inputs,
float64 otherwise.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ..kernels import as_compute, compute_dtype, matmul, returned
from .reference import LowRankInputs


def _load(x: LowRankInputs):
    dtype = compute_dtype(x.u)
    return (as_compute(a, dtype) for a in (x.u, x.w, x.v))


def forward(x: LowRankInputs) -> Result:
    """Steps (1)-(3): ``out`` (B, H, Nq, Dv) in the compute dtype."""
    u, w, v = _load(x)
    out = matmul(u, matmul(w, v))  # (1)-(2)
    if x.normalized:
        out = out / matmul(u, w.sum(axis=-1)[..., None])  # (3)
    return Result(out=out.astype(x.u.dtype), lse=None, aux={})


def vjp(x: LowRankInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (3')-(1'): ``u``, ``w``, ``v`` in the compute dtype; ``saved`` spares the forward."""
    u, w, v = _load(x)
    dout = as_compute(cotangents.dout, u.dtype)
    t = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731
    summary = matmul(w, v)  # (B, H, r, Dv)
    d_numerator = dout
    if x.normalized:
        key_mass = w.sum(axis=-1)[..., None]  # (B, H, r, 1)
        denominator = matmul(u, key_mass)  # (B, H, Nq, 1)
        out = saved.out if saved is not None else matmul(u, summary) / denominator
        d_numerator = dout / denominator
        d_denominator = -np.sum(d_numerator * out, axis=-1, keepdims=True)  # (B, H, Nq, 1)
    du = matmul(d_numerator, t(summary))
    d_summary = matmul(t(u), d_numerator)  # (B, H, r, Dv)
    dw = matmul(d_summary, t(v))
    dv = matmul(t(w), d_summary)
    if x.normalized:
        du = du + d_denominator * t(key_mass)
        dw = dw + matmul(t(u), d_denominator)
    return Grads(returned(dict(u=du, w=dw, v=dv), x.u))
