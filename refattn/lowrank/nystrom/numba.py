"""Nyströmformer on CPU in O(N·m) memory: kernels 1 and 3 as tiled dense attention.

``k₃ V`` is dense attention of the m landmark queries over the N keys, and
``k₁ (Z k₃ V)`` dense attention of the N queries over the m landmark keys with
values ``Z k₃ V`` (m × Dv), so refattn/dense/numba.py computes both (and their
VJPs) without forming the (N, m) kernels; the (m, m) kernel 2, the iteration
(3) and the landmarks (1) are small dense NumPy in the compute dtype (float32
for float32/float16/bfloat16 inputs, float64 otherwise), by the same functions
as the reference. Steps match refattn/lowrank/nystrom/reference.py.
"""

from __future__ import annotations

import numpy as np

from ...core.precision import FLOAT64
from ...core.results import Cotangents, Grads, Result
from ...dense import dense_attention, dense_attention_vjp
from ..kernels import as_compute, compute_dtype, returned
from .reference import (
    NystromInputs,
    conv_values,
    depthwise_conv,
    depthwise_conv_vjp,
    landmark_weights,
    padded,
    pinv_iterates,
    pinv_vjp,
    softmax_vjp,
)
from ...core.softmax import masked_softmax


def _steps(x: NystromInputs) -> dict:
    """Steps (0)-(4) with kernels 1 and 3 left to the dense kernel."""
    dtype = compute_dtype(x.q)
    q, k, v, real = (a if a is None or a.dtype == np.bool_ else as_compute(a, dtype) for a in padded(x, FLOAT64))
    s = dict(q=q, k=k, v=v, real=real, dtype=dtype)
    if x.shortcut:
        return s
    r, has_token = landmark_weights(x, real, q.shape[2])
    r = as_compute(np.broadcast_to(r, (q.shape[0],) + r.shape[1:]), dtype)
    q_land = np.einsum("bsn,bhnd->bhsd", r, q, optimize=True)  # (B, H, m, D)
    k_land = np.einsum("bsn,bhnd->bhsd", r, k, optimize=True)
    mask1 = mask2 = None
    mask3 = None if real is None else real[:, None, None, :]
    if has_token is not None:
        mask1 = has_token[:, None, None, :]
        mask2 = has_token[:, None, :, None] & has_token[:, None, None, :]
        mask3 = mask3 & has_token[:, None, :, None]
    k2, _ = masked_softmax(x.scale * np.einsum("bhsd,bhtd->bhst", q_land, k_land), mask2)
    k2 = k2.astype(dtype)
    iterates = pinv_iterates(k2, x, FLOAT64)
    z = as_compute(iterates[-1], dtype)
    summary = dense_attention(q_land, k, v, mask=mask3, scale=x.scale, backend="numba").out  # k₃ V (B, H, m, Dv)
    mixed = as_compute(z @ summary, dtype)  # Z k₃ V
    s.update(r=r, q_land=q_land, k_land=k_land, k2=k2, iterates=iterates, z=z, summary=summary, mixed=mixed,
             mask1=mask1, mask3=mask3)  # fmt: skip
    return s


def forward(x: NystromInputs) -> Result:
    """Steps (0)-(6): ``out`` (B, H, N, Dv) in the compute dtype."""
    s = _steps(x)
    if x.shortcut:
        mask = None if s["real"] is None else s["real"][:, None, None, :]
        out = dense_attention(s["q"], s["k"], s["v"], mask=mask, scale=x.scale, backend="numba").out
    else:
        out = dense_attention(s["q"], s["k_land"], s["mixed"], mask=s["mask1"], scale=x.scale, backend="numba").out
    if x.conv_kernel is not None:
        out = out + depthwise_conv(conv_values(x, s["v"], s["real"]), as_compute(x.conv_kernel, s["dtype"]))
    return Result(out=out[:, :, x.front :].astype(x.q.dtype), lse=None, aux={})


def vjp(x: NystromInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (6')-(0'): ``q``, ``k``, ``v`` (and ``conv_kernel``) in the compute dtype."""
    s = _steps(x)
    dtype, q, k, v, real = s["dtype"], s["q"], s["k"], s["v"], s["real"]
    dout = as_compute(np.pad(cotangents.dout, ((0, 0), (0, 0), (x.front, 0), (0, 0))), dtype)
    grads = Grads()
    dv = np.zeros_like(v)
    if x.conv_kernel is not None:
        dv_conv, d_kernel = depthwise_conv_vjp(conv_values(x, v, real), as_compute(x.conv_kernel, dtype), dout)
        dv += conv_values(x, dv_conv, real)
        grads["conv_kernel"] = d_kernel
    if x.shortcut:
        mask = None if real is None else real[:, None, None, :]
        dense = dense_attention_vjp(dout, q, k, v, mask=mask, scale=x.scale, backend="numba")
        dq, dk, dv = dense["q"], dense["k"], dv + dense["v"]
    else:
        # (4') out = k₁ M through the dense VJP (dq, dK̃, dM), then M = Z X, X = k₃ V.
        outer = dense_attention_vjp(dout, q, s["k_land"], s["mixed"], mask=s["mask1"], scale=x.scale, backend="numba")
        d_mixed = outer["v"]
        dz = d_mixed @ np.swapaxes(s["summary"], -1, -2)
        d_summary = as_compute(np.swapaxes(s["z"], -1, -2) @ d_mixed, dtype)
        inner = dense_attention_vjp(d_summary, s["q_land"], k, v, mask=s["mask3"], scale=x.scale, backend="numba")
        # (3')-(2') The iteration and kernel 2.
        dk2 = pinv_vjp(s["k2"].astype(np.float64), s["iterates"], dz.astype(np.float64), x)
        ds2 = x.scale * softmax_vjp(s["k2"], dk2)
        dq_land = inner["q"] + np.einsum("bhst,bhtd->bhsd", ds2, s["k_land"])
        dk_land = outer["k"] + np.einsum("bhst,bhsd->bhtd", ds2, s["q_land"])
        # (1') Landmarks are R x.
        dq = outer["q"] + np.einsum("bsn,bhsd->bhnd", s["r"], dq_land)
        dk = inner["k"] + np.einsum("bsn,bhsd->bhnd", s["r"], dk_land)
        dv = dv + inner["v"]
    grads.update(q=dq[:, :, x.front :], k=dk[:, :, x.front :], v=dv[:, :, x.front :])
    return Grads(returned(grads, x.q))
