"""Generic low-rank attention over an array namespace ``xp`` (NumPy or CuPy): the GPU path.

Steps (1)-(3) of spec/low_rank.md, "Generic low-rank attention", as products of
tall-skinny matrices: the key summaries ``S = W V`` (r, Dv) and ``s = W 1`` (r)
are summed over key blocks of :data:`BLOCK_K` columns, then each block of
:data:`BLOCK_Q` query rows takes ``U S`` and ``U s``. Nothing (Nq, Nk) exists;
the products are batched ``xp.matmul`` calls (cuBLAS under CuPy). float32 for
float32 or narrower inputs, float64 otherwise.

Einsum letters (in the shape comments): b batch, h head, q query, k key,
r rank, e value dim.
"""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import blocks, compute_dtype
from .reference import LowRankInputs

BLOCK_Q = 1024  # query rows per block
BLOCK_K = 1024  # key columns per block


def _t(a, xp):
    """The last two axes swapped."""
    return xp.swapaxes(a, -1, -2)


class _Factors:
    """The checked factors on the device in the compute dtype, and their key summaries (step (1))."""

    def __init__(self, x: LowRankInputs, xp):
        dtype = compute_dtype(x.u.dtype)
        self.u = xp.asarray(x.u, dtype=dtype)  # (B, H, Nq, r)
        self.w = xp.asarray(x.w, dtype=dtype)  # (B, H, r, Nk)
        self.v = xp.asarray(x.v, dtype=dtype)  # (B, H, Nk, Dv)
        # (1) S = W V and s = W 1, block by block of keys.
        self.summary = xp.zeros(self.w.shape[:3] + self.v.shape[-1:], dtype=dtype)  # (B, H, r, Dv)
        for j0, j1 in blocks(self.w.shape[-1], BLOCK_K):
            self.summary += xp.matmul(self.w[..., j0:j1], self.v[..., j0:j1, :])
        self.key_mass = self.w.sum(axis=-1)[..., None]  # (B, H, r, 1)

    def rows(self, i0: int, i1: int, normalized: bool):
        """Steps (2)-(3) for rows i0:i1: ``out`` (B, H, bq, Dv) and the denominator (B, H, bq, 1) or None."""
        numerator = self.u[..., i0:i1, :] @ self.summary  # (2) U S
        if not normalized:
            return numerator, None
        denominator = self.u[..., i0:i1, :] @ self.key_mass  # (3) U s
        return numerator / denominator, denominator


def forward(x: LowRankInputs, xp) -> Result:
    """Steps (1)-(3), query block by query block."""
    f = _Factors(x, xp)
    out = xp.empty(f.u.shape[:3] + f.v.shape[-1:], dtype=f.u.dtype)  # (B, H, Nq, Dv)
    for i0, i1 in blocks(f.u.shape[2], BLOCK_Q):
        out[..., i0:i1, :] = f.rows(i0, i1, x.normalized)[0]
    return Result(out=out, lse=None, aux={})


def vjp(x: LowRankInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (3')-(1'): the query blocks give ``du`` and the summaries' gradients, the key blocks ``dw``, ``dv``."""
    f = _Factors(x, xp)
    dtype = f.u.dtype
    dout = xp.asarray(cotangents.dout, dtype=dtype)  # (B, H, Nq, Dv)
    du = xp.empty_like(f.u)
    d_summary = xp.zeros_like(f.summary)  # (B, H, r, Dv)
    d_key_mass = xp.zeros_like(f.key_mass)  # (B, H, r, 1)
    for i0, i1 in blocks(f.u.shape[2], BLOCK_Q):
        u = f.u[..., i0:i1, :]
        d_numerator = dout[..., i0:i1, :]
        if x.normalized:
            # (3') out = n / δ: dn = dout / δ, dδ = −Σ_e dout · out / δ.
            out, denominator = f.rows(i0, i1, True)
            d_numerator = d_numerator / denominator
            d_denominator = -(d_numerator * out).sum(axis=-1, keepdims=True)  # (B, H, bq, 1)
        # (2') n = U S: dU = dn Sᵀ, dS += Uᵀ dn.
        du[..., i0:i1, :] = d_numerator @ _t(f.summary, xp)
        d_summary += _t(u, xp) @ d_numerator
        if x.normalized:
            # (3') δ = U s: dU += dδ sᵀ, ds += Uᵀ dδ.
            du[..., i0:i1, :] += d_denominator * _t(f.key_mass, xp)
            d_key_mass += _t(u, xp) @ d_denominator
    dw = xp.empty_like(f.w)
    dv = xp.empty_like(f.v)
    for j0, j1 in blocks(f.w.shape[-1], BLOCK_K):
        # (1') S = W V, s = W 1: dW = dS Vᵀ + ds 1ᵀ, dV = Wᵀ dS.
        dw[..., j0:j1] = d_summary @ _t(f.v[..., j0:j1, :], xp) + d_key_mass
        dv[..., j0:j1, :] = _t(f.w[..., j0:j1], xp) @ d_summary
    return Grads(u=du, w=dw, v=dv)
