"""Nyströmformer on CPU in O(N·m) memory: kernels 1 and 3 as tiled dense attention.

``k₃ V`` is dense attention of the m landmark queries over the N keys, and
``k₁ (Z k₃ V)`` dense attention of the N queries over the m landmark keys with
values ``Z k₃ V`` (m × Dv): without a mask
:func:`refattn.lowrank.kernels.tiled_attention` computes both (BLAS products
on (512 × 512) tiles, the online softmax), with one refattn/dense/numba.py,
whose VJPs give the gradients; the (N, m) kernels are never formed. Everything is in the compute dtype
(float32 for float32/float16/bfloat16 inputs, float64 otherwise): the padding
(0), the landmarks (1) as weighted means within each segment (O(N·D), the
averaging matrix's diagonal blocks only), the (m, m) kernel 2 and the
iteration (3) by the reference's functions, and the depthwise convolution
(5) by a Numba kernel over (batch, head) in parallel. BLAS runs
single-threaded under Numba's threads (refattn/lowrank/kernels.py). Steps
match refattn/lowrank/nystrom/reference.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...core.precision import FLOAT64, numerics
from ...core.results import Cotangents, Grads, Result
from ...core.softmax import masked_softmax
from ...dense import dense_attention, dense_attention_vjp
from ..kernels import as_compute, compute_dtype, returned, single_threaded_blas, tiled_attention
from .reference import NystromInputs, conv_values, landmark_weights, pinv_iterates, pinv_vjp, softmax_vjp


def _padded(x: NystromInputs, dtype: np.dtype) -> tuple:
    """Step (0) in the compute dtype: q, k, v with ``front`` zero tokens prepended, and the mask (False on them), or None."""
    p = x.front
    q, k, v = (np.pad(as_compute(a, dtype), ((0, 0), (0, 0), (p, 0), (0, 0))) if p else as_compute(a, dtype) for a in (x.q, x.k, x.v))
    real = None if x.key_padding_mask is None else np.pad(x.key_padding_mask, ((0, 0), (p, 0)))  # (B, Np)
    return q, k, v, real


def _segment_weights(r: np.ndarray, batch: int, m: int, dtype: np.dtype) -> np.ndarray:
    """The averaging matrix R (B or 1, m, Np)'s diagonal blocks (B, m, L): R is 0 outside landmark s's own segment."""
    blocks = r.reshape(r.shape[0], m, m, r.shape[2] // m)  # (B, s, t, l): segment t of landmark s's weights
    return as_compute(np.broadcast_to(np.einsum("bssl->bsl", blocks), (batch, m, blocks.shape[3])), dtype)


def _landmarks(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(1) ``R x`` (B, H, m, D): each landmark the weighted sum of its segment's rows."""
    b, h, n, d = x.shape
    m = weights.shape[1]
    return np.einsum("bsl,bhsld->bhsd", weights, x.reshape(b, h, m, n // m, d), optimize=True)


def _landmarks_vjp(weights: np.ndarray, d_land: np.ndarray) -> np.ndarray:
    """(1') ``Rᵀ dx̃`` (B, H, Np, D)."""
    b, h, m, d = d_land.shape
    return np.einsum("bsl,bhsd->bhsld", weights, d_land).reshape(b, h, -1, d)


@njit(parallel=True, cache=True)
def _depthwise_conv(v, kernel):
    """(5) ``out[b, h, n] = Σ_t kernel[h, t] v[b, h, n + t − K//2]``, zeros outside (B, H, N, Dv)."""
    batch, heads, n = v.shape[:3]
    half = kernel.shape[1] // 2
    out = np.zeros_like(v)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        for t in range(kernel.shape[1]):
            shift, tap = t - half, kernel[h, t]
            for i in range(max(0, -shift), min(n, n - shift)):
                out[b, h, i] += tap * v[b, h, i + shift]
    return out


@njit(parallel=True, cache=True)
def _depthwise_conv_vjp(v, kernel, dout):
    """(5') dv (B, H, N, Dv) and dkernel (H, K) of :func:`_depthwise_conv`."""
    batch, heads, n = v.shape[:3]
    half = kernel.shape[1] // 2
    dv = np.zeros_like(v)
    d_kernel = np.zeros((batch, heads, kernel.shape[1]), v.dtype)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        for t in range(kernel.shape[1]):
            shift, tap = t - half, kernel[h, t]
            total = 0.0
            for i in range(max(0, -shift), min(n, n - shift)):
                dv[b, h, i + shift] += tap * dout[b, h, i]
                total += np.dot(dout[b, h, i], v[b, h, i + shift])
            d_kernel[b, h, t] = total
    return dv, d_kernel.sum(axis=0)


def _attention(q, k, v, mask, scale) -> np.ndarray:
    """Kernels 1 and 3 times their values: :func:`~refattn.lowrank.kernels.tiled_attention` without a mask, refattn/dense/numba.py with one."""
    if mask is None:
        return tiled_attention(*(np.ascontiguousarray(a) for a in (q, k, v)), q.dtype.type(scale))[0]
    return dense_attention(q, k, v, mask=mask, scale=scale, backend="numba").out


def _steps(x: NystromInputs) -> dict:
    """Steps (0)-(4), kernel 3 times V by :func:`_attention`."""
    dtype = compute_dtype(x.q)
    q, k, v, real = _padded(x, dtype)
    s = dict(q=q, k=k, v=v, real=real, dtype=dtype)
    if x.shortcut:
        return s
    r, has_token = landmark_weights(x, real, q.shape[2])
    r = _segment_weights(r, q.shape[0], x.num_landmarks, dtype)  # (B, m, L)
    q_land = _landmarks(r, q)  # (B, H, m, D)
    k_land = _landmarks(r, k)
    mask1 = mask2 = None
    mask3 = None if real is None else real[:, None, None, :]
    if has_token is not None:
        mask1 = has_token[:, None, None, :]
        mask2 = has_token[:, None, :, None] & has_token[:, None, None, :]
        mask3 = mask3 & has_token[:, None, :, None]
    k2, _ = masked_softmax(x.scale * np.einsum("bhsd,bhtd->bhst", q_land, k_land), mask2)
    k2 = k2.astype(dtype)
    iterates = pinv_iterates(k2, x, numerics("float32") if dtype == np.float32 else FLOAT64)
    z = as_compute(iterates[-1], dtype)
    summary = _attention(q_land, k, v, mask3, x.scale)  # k₃ V (B, H, m, Dv)
    mixed = as_compute(z @ summary, dtype)  # Z k₃ V
    s.update(r=r, q_land=q_land, k_land=k_land, k2=k2, iterates=iterates, z=z, summary=summary, mixed=mixed,
             mask1=mask1, mask3=mask3)  # fmt: skip
    return s


def forward(x: NystromInputs) -> Result:
    """Steps (0)-(6): ``out`` (B, H, N, Dv) in the inputs' dtype."""
    with single_threaded_blas():
        return _forward(x)


def _forward(x: NystromInputs) -> Result:
    s = _steps(x)
    if x.shortcut:
        mask = None if s["real"] is None else s["real"][:, None, None, :]
        out = _attention(s["q"], s["k"], s["v"], mask, x.scale)
    else:
        out = _attention(s["q"], s["k_land"], s["mixed"], s["mask1"], x.scale)
    if x.conv_kernel is not None:
        out = out + _depthwise_conv(conv_values(x, s["v"], s["real"]), as_compute(x.conv_kernel, s["dtype"]))
    return Result(out=out[:, :, x.front :].astype(x.q.dtype, copy=False), lse=None, aux={})


def vjp(x: NystromInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (6')-(0'): ``q``, ``k``, ``v`` (and ``conv_kernel``) in the inputs' dtype."""
    with single_threaded_blas():
        return _vjp(x, cotangents)


def _vjp(x: NystromInputs, cotangents: Cotangents) -> Grads:
    s = _steps(x)
    dtype, q, k, v, real = s["dtype"], s["q"], s["k"], s["v"], s["real"]
    dout = as_compute(np.pad(cotangents.dout, ((0, 0), (0, 0), (x.front, 0), (0, 0))), dtype)
    grads = Grads()
    dv = np.zeros_like(v)
    if x.conv_kernel is not None:
        dv_conv, d_kernel = _depthwise_conv_vjp(conv_values(x, v, real), as_compute(x.conv_kernel, dtype), dout)
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
        dq = outer["q"] + _landmarks_vjp(s["r"], dq_land)
        dk = inner["k"] + _landmarks_vjp(s["r"], dk_land)
        dv = dv + inner["v"]
    grads.update(q=dq[:, :, x.front :], k=dk[:, :, x.front :], v=dv[:, :, x.front :])
    return Grads(returned(grads, x.q))
