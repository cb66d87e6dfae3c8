"""Linformer over an array namespace ``xp`` (NumPy or CuPy): the GPU path.

Steps (1)-(2) of spec/low_rank.md, "Linformer", project the keys and values
along the sequence, ``E K`` (P, D) and ``F V`` (P, Dv), summed over key blocks
of :data:`BLOCK_K` positions; step (3) is dense attention's tiled algorithm
(refattn/dense/xp.py) of the queries over the P projected keys. Nothing
(Nq, Nk) exists. float32 for float32 or narrower inputs, float64 otherwise.

Shape letters: b batch, h kv head, p projected position, n key position,
d head dim, e value dim.
"""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import blocks, compute_dtype
from ...dense import xp as dense_xp
from ...dense.inputs import DenseInputs
from .reference import LinformerInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # dense's tile; BLOCK_K also blocks the projection


class _Projection:
    """The inputs on the device in the compute dtype: padded keys and values zeroed (step (1)), E and F."""

    def __init__(self, x: LinformerInputs, xp):
        self.xp, self.dtype = xp, compute_dtype(x.q.dtype)
        k = xp.asarray(x.k, dtype=self.dtype)  # (B, Hkv, Nk, D)
        v = xp.asarray(x.v, dtype=self.dtype)  # (B, Hkv, Nk, Dv)
        self.keep = None if x.key_padding_mask is None else xp.asarray(x.key_padding_mask)[:, None, :, None]
        # (1) Padded keys and values are zeroed before projecting.
        self.k, self.v = (a if self.keep is None else xp.where(self.keep, a, 0.0) for a in (k, v))
        self.e = xp.asarray(x.used_columns(x.e), dtype=self.dtype)  # (Hkv or 1, P, Nk)
        self.f = self.e if x.f is None else xp.asarray(x.used_columns(x.f), dtype=self.dtype)

    def project(self):
        """(2) E K (B, Hkv, P, D) and F V (B, Hkv, P, Dv), summed over key blocks."""
        xp, n = self.xp, self.k.shape[2]
        k_proj = xp.zeros(self.k.shape[:2] + self.e.shape[1:2] + self.k.shape[3:], dtype=self.dtype)
        v_proj = xp.zeros(self.v.shape[:2] + self.f.shape[1:2] + self.v.shape[3:], dtype=self.dtype)
        for j0, j1 in blocks(n, BLOCK_K):
            k_proj += xp.matmul(self.e[None, ..., j0:j1], self.k[..., j0:j1, :])
            v_proj += xp.matmul(self.f[None, ..., j0:j1], self.v[..., j0:j1, :])
        return k_proj, v_proj

    def dense_inputs(self, x: LinformerInputs) -> DenseInputs:
        """Step (3)'s dense problem: the queries over the P projected keys and values, nothing masked."""
        return dense_xp.inputs_over(x.q, *self.project(), x.scale)


def forward(x: LinformerInputs, xp) -> Result:
    """Steps (1)-(3)."""
    out, lse = dense_xp.attend(_Projection(x, xp).dense_inputs(x), xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={})


def vjp(x: LinformerInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (3')-(1'): dense's VJP over the projected keys, then back through E and F block by block."""
    p = _Projection(x, xp)
    dense = dense_xp.attend_vjp(p.dense_inputs(x), cotangents, xp, (BLOCK_Q, BLOCK_K), saved)
    d_kp, d_vp = dense["k"], dense["v"]  # (B, Hkv, P, D), (B, Hkv, P, Dv)
    dk, dv = xp.empty_like(p.k), xp.empty_like(p.v)
    de = xp.zeros(p.k.shape[1:2] + p.e.shape[1:], dtype=p.dtype)  # (Hkv, P, Nk)
    df = xp.zeros_like(de)
    for j0, j1 in blocks(p.k.shape[2], BLOCK_K):
        # (2') k̃ = E k: dk = Eᵀ dk̃ and dE = Σ_b dk̃ kᵀ; likewise F and v.
        dk[..., j0:j1, :] = xp.matmul(xp.swapaxes(p.e[None, ..., j0:j1], -1, -2), d_kp)
        dv[..., j0:j1, :] = xp.matmul(xp.swapaxes(p.f[None, ..., j0:j1], -1, -2), d_vp)
        de[..., j0:j1] = xp.matmul(d_kp, xp.swapaxes(p.k[..., j0:j1, :], -1, -2)).sum(axis=0)
        df[..., j0:j1] = xp.matmul(d_vp, xp.swapaxes(p.v[..., j0:j1, :], -1, -2)).sum(axis=0)
    # (1') Padded positions got 0, a constant.
    if p.keep is not None:
        dk, dv = xp.where(p.keep, dk, 0.0), xp.where(p.keep, dv, 0.0)
    grads = Grads(q=dense["q"], k=dk, v=dv)
    grads["e"] = _to_projection_shape(de + df if x.f is None else de, x.e, xp)
    if x.f is not None:
        grads["f"] = _to_projection_shape(df, x.f, xp)
    return grads


def _to_projection_shape(grad, projection, xp):
    """(Hkv, P, Nk) -> the projection's own shape: heads summed when shared, unused columns 0."""
    grad = grad if projection.ndim == 3 else grad.sum(axis=0)
    full = xp.zeros(projection.shape, dtype=grad.dtype)
    full[..., : grad.shape[-1]] = grad
    return full
