"""Nyströmformer over an array namespace ``xp`` (NumPy or CuPy): the GPU path, in O(N·m) memory.

As refattn/lowrank/nystrom/numba.py: kernel 3 times V, ``k₃ V``, is dense
attention of the m landmark queries over the N keys, and ``k₁ (Z k₃ V)`` dense
attention of the N queries over the m landmark keys with values ``Z k₃ V``
(m, Dv); refattn/dense/xp.py computes both and their VJPs tile by tile, so no
(N, m) kernel exists (only, with a key padding mask under ``mask_scope="all"``,
kernel 3's (m, N) bool mask, as in the Numba backend). The padding (0), the landmarks (1) as segment means and
the depthwise convolution (5) run over ``xp``. Kernel 2 and the iteration (3)
are (m, m): they run on the host in float64 by the reference's functions
(whose VJP holds each matrix's argmax norm fixed), as in the Numba backend;
only (B, H, m, m) and (B, H, m, D) arrays cross. Everything else is in the
compute dtype (float32 for float32 or narrower inputs, float64 otherwise).

Shape letters: b batch, h head, n token, s landmark, l position in a segment,
d head dim, e value dim.
"""

from __future__ import annotations

import numpy as np

from ...core.precision import FLOAT64
from ...core.results import Cotangents, Grads, Result
from ...core.softmax import masked_softmax
from ...core.xp import compute_dtype, to_host
from ...dense import xp as dense_xp
from .reference import NystromInputs, pinv_iterates, pinv_vjp, softmax_vjp

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # dense's tile


class _Steps:
    """Steps (0)-(3) on the device: padded inputs, landmarks, Z, and the masks of kernels 1 and 3."""

    def __init__(self, x: NystromInputs, xp):
        self.x, self.xp, self.dtype = x, xp, compute_dtype(x.q.dtype)
        front = ((0, 0), (0, 0), (x.front, 0), (0, 0))
        # (0) Front padding to a multiple of m.
        self.q, self.k, self.v = (xp.pad(xp.asarray(a, dtype=self.dtype), front) for a in (x.q, x.k, x.v))
        self.real = None if x.key_padding_mask is None else xp.pad(xp.asarray(x.key_padding_mask), ((0, 0), (x.front, 0)))
        self.mask = None if self.real is None else self.real[:, None, None, :]  # (B, 1, 1, Np)
        if not x.shortcut:
            self._landmarks()

    def _landmarks(self):
        x, xp, m = self.x, self.xp, self.x.num_landmarks
        b, n = self.q.shape[0], self.q.shape[2]
        # (1) Each landmark the mean of its segment's L = Np / m tokens (of its real ones under mask_scope "all").
        if self.real is None or x.mask_scope == "kernel3":
            self.segment = xp.full((1, m, n // m), 1.0 / (n // m), dtype=self.dtype)  # (1, m, L)
            has_token = None
        else:
            member = self.real.reshape(b, m, n // m).astype(self.dtype)  # (B, m, L)
            count = member.sum(axis=-1, keepdims=True)  # (B, m, 1)
            self.segment = member / xp.where(count > 0, count + x.landmark_eps, 1.0)
            has_token = count[..., 0] > 0  # (B, m)
        self.q_land, self.k_land = self.landmarks(self.q), self.landmarks(self.k)  # (B, H, m, D)
        # Kernel masks: landmarks with no real token are left out of kernels 1 and 2.
        self.mask1, self.mask3 = None, self.mask
        mask2 = None
        if has_token is not None:
            self.mask1 = has_token[:, None, None, :]  # (B, 1, 1, m)
            self.mask3 = self.mask & has_token[:, None, :, None]  # (B, 1, m, Np)
            host = to_host(has_token)
            mask2 = host[:, None, :, None] & host[:, None, None, :]  # (B, 1, m, m)
        # (2)-(3) Kernel 2 and Z ≈ k₂⁺ on the host in float64.
        q_land, k_land = (to_host(a).astype(np.float64) for a in (self.q_land, self.k_land))
        self.k2, _ = masked_softmax(x.scale * q_land @ np.swapaxes(k_land, -1, -2), mask2)
        self.iterates = pinv_iterates(self.k2, x, FLOAT64)
        self.z = xp.asarray(self.iterates[-1], dtype=self.dtype)  # (B, H, m, m)

    def landmarks(self, a):
        """(1) ``R a`` (B, H, m, D): the segment-weighted sums of a's rows (B, H, Np, D)."""
        b, h, n, d = a.shape
        m = self.x.num_landmarks
        segments = a.reshape(b, h, m, n // m, d)  # (B, H, m, L, D)
        return (self.segment[:, None, :, :, None] * segments).sum(axis=3)

    def landmarks_vjp(self, d_land):
        """(1') ``Rᵀ dã`` (B, H, Np, D)."""
        b, h, m, d = d_land.shape
        return (self.segment[:, None, :, :, None] * d_land[:, :, :, None, :]).reshape(b, h, -1, d)

    def conv_values(self, v):
        """The values the convolution sees: padded tokens zeroed under mask_scope "all"."""
        if self.real is None or self.x.mask_scope == "kernel3":
            return v
        return self.xp.where(self.real[:, None, :, None], v, 0.0)

    def kernel3(self):
        """Dense attention of the landmark queries over the keys: ``k₃ V`` is its output."""
        return dense_xp.inputs_over(self.q_land, self.k, self.v, self.x.scale, self.mask3)

    def kernel1(self, mixed):
        """Dense attention of the queries over the landmark keys with values ``mixed = Z k₃ V``."""
        return dense_xp.inputs_over(self.q, self.k_land, mixed, self.x.scale, self.mask1)

    def full(self):
        """The full-rank shortcut: plain attention over the padded tokens."""
        return dense_xp.inputs_over(self.q, self.k, self.v, self.x.scale, self.mask)


def _conv(v, kernel, xp):
    """(5) ``out[b, h, n] = Σ_t kernel[h, t] v[b, h, n + t − K//2]``, zeros outside (B, H, N, Dv)."""
    n, half = v.shape[2], kernel.shape[1] // 2
    out = xp.zeros_like(v)
    for t in range(kernel.shape[1]):
        shift = t - half
        lo, hi = max(0, -shift), min(n, n - shift)  # rows whose tap lands inside
        out[:, :, lo:hi] += kernel[None, :, t, None, None] * v[:, :, lo + shift : hi + shift]
    return out


def _conv_vjp(v, kernel, dout, xp):
    """(5') dv (B, H, N, Dv) and dkernel (H, K) of :func:`_conv`."""
    n, half = v.shape[2], kernel.shape[1] // 2
    dv = xp.zeros_like(v)
    d_kernel = xp.zeros(kernel.shape, dtype=v.dtype)
    for t in range(kernel.shape[1]):
        shift = t - half
        lo, hi = max(0, -shift), min(n, n - shift)
        dv[:, :, lo + shift : hi + shift] += kernel[None, :, t, None, None] * dout[:, :, lo:hi]
        d_kernel[:, t] = (dout[:, :, lo:hi] * v[:, :, lo + shift : hi + shift]).sum(axis=(0, 2, 3))
    return dv, d_kernel


def _attend(inputs, xp):
    return dense_xp.attend(inputs, xp, (BLOCK_Q, BLOCK_K))[0]


def forward(x: NystromInputs, xp) -> Result:
    """Steps (0)-(6)."""
    s = _Steps(x, xp)
    if x.shortcut:
        out = _attend(s.full(), xp)
    else:
        # (4) out = k₁ (Z (k₃ V)).
        out = _attend(s.kernel1(s.z @ _attend(s.kernel3(), xp)), xp)
    if x.conv_kernel is not None:
        out = out + _conv(s.conv_values(s.v), xp.asarray(x.conv_kernel, dtype=s.dtype), xp)  # (5)
    return Result(out=out[:, :, x.front :], lse=None, aux={})  # (6) padded rows dropped


def vjp(x: NystromInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (6')-(0')."""
    s = _Steps(x, xp)
    blocks = (BLOCK_Q, BLOCK_K)
    # (6') Padded rows get no cotangent.
    dout = xp.pad(xp.asarray(cotangents.dout, dtype=s.dtype), ((0, 0), (0, 0), (x.front, 0), (0, 0)))
    grads = Grads()
    dv = xp.zeros_like(s.v)
    if x.conv_kernel is not None:
        # (5') The convolution.
        dv_conv, grads["conv_kernel"] = _conv_vjp(s.conv_values(s.v), xp.asarray(x.conv_kernel, dtype=s.dtype), dout, xp)
        dv += s.conv_values(dv_conv)
    if x.shortcut:
        dense = dense_xp.attend_vjp(s.full(), Cotangents(dout, None), xp, blocks)
        dq, dk, dv = dense["q"], dense["k"], dv + dense["v"]
    else:
        # (4') out = k₁ M through the dense VJP (dq, dK̃, dM), then M = Z X, X = k₃ V.
        summary = _attend(s.kernel3(), xp)  # (B, H, m, Dv)
        outer = dense_xp.attend_vjp(s.kernel1(s.z @ summary), Cotangents(dout, None), xp, blocks)
        d_mixed = outer["v"]
        dz = d_mixed @ xp.swapaxes(summary, -1, -2)  # (B, H, m, m)
        d_summary = xp.swapaxes(s.z, -1, -2) @ d_mixed
        inner = dense_xp.attend_vjp(s.kernel3(), Cotangents(d_summary, None), xp, blocks)
        # (3')-(2') The iteration and kernel 2, on the host in float64.
        dk2 = pinv_vjp(s.k2, s.iterates, to_host(dz).astype(np.float64), x)
        ds2 = xp.asarray(x.scale * softmax_vjp(s.k2, dk2), dtype=s.dtype)  # (B, H, m, m)
        dq_land = inner["q"] + ds2 @ s.k_land
        dk_land = outer["k"] + xp.swapaxes(ds2, -1, -2) @ s.q_land
        # (1') Landmarks are R x.
        dq = outer["q"] + s.landmarks_vjp(dq_land)
        dk = inner["k"] + s.landmarks_vjp(dk_land)
        dv = dv + inner["v"]
    # (0') Padded tokens are constants.
    grads.update(q=dq[:, :, x.front :], k=dk[:, :, x.front :], v=dv[:, :, x.front :])
    return grads
