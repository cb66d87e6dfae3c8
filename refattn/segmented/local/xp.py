"""lucidrains' local-attention over an array namespace ``xp`` (NumPy or CuPy): steps (1)-(2) elementwise on
the device (keys l2-normalised, q and k rotated by :func:`refattn.position.apply_rope`'s defaults), then
(3)-(5) the shared block-sparse algorithm (refattn/segmented/blocksparse_xp.py) over the Numba backend's
look-around key lists (spec/segmented.md)."""

from __future__ import annotations

import numpy as np

from ...core.precision import numerics
from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from ...position.rope.reference import check_rope_params, cos_sin
from .. import blocksparse_xp
from .numba import _kernel_options, _keys
from .reference import L2NORM_EPS, LocalInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # query rows and listed keys of a tile


def _pattern(x: LocalInputs, dtype) -> blocksparse_xp.Pattern:
    return blocksparse_xp.Pattern(*_keys(x), **_kernel_options(x, dtype))


def _rotate(vectors, positions: np.ndarray, xp, inverse: bool = False):
    """(2) RoPE with apply_rope's defaults (every dim, base 10000, pairs (t, t + D/2)); ``inverse``: R(−θ)."""
    rope = check_rope_params(None, 10000.0, 1.0, "half", vectors.shape[-1])
    cos, sin = (xp.asarray(table, dtype=vectors.dtype) for table in cos_sin(positions, rope, numerics(None)))
    sin = -sin if inverse else sin
    half = vectors.shape[-1] // 2
    first, second = vectors[..., :half], vectors[..., half:]  # (B, H, N, D/2) each
    return xp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def _queries_and_keys(x: LocalInputs, xp):
    """(1)-(2) q, k (normalised, rotated) and v on the device in the compute dtype, and the key norms (or None)."""
    dtype = compute_dtype(x.q.dtype)
    q, k, v = (xp.asarray(a, dtype=dtype) for a in (x.q, x.k, x.v))
    norm = None
    if x.shared_qk:
        norm = xp.maximum(xp.sqrt((k * k).sum(axis=-1, keepdims=True)), L2NORM_EPS)  # (B, Hkv, N, 1)
        k = k / norm
    if x.rotary:
        positions = np.arange(x.shape.q_len)
        q, k = _rotate(q, positions + x.query_shift, xp), _rotate(k, positions, xp)
    return q, k, v, norm


def forward(x: LocalInputs, xp) -> Result:
    q, k, v, _ = _queries_and_keys(x, xp)
    out, lse = blocksparse_xp.attend(q, k, v, _pattern(x, q.dtype), xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={})


def vjp(x: LocalInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    q, k, v, norm = _queries_and_keys(x, xp)
    result = forward(x, xp) if saved is None else saved
    dq, dk, dv = blocksparse_xp.attend_vjp(q, k, v, _pattern(x, q.dtype), xp, (BLOCK_Q, BLOCK_K), result.out,
                                           result.lse, cotangents.dout, cotangents.dlse)  # fmt: skip
    if x.rotary:  # (2') the rotation back
        positions = np.arange(x.shape.q_len)
        dq, dk = _rotate(dq, positions + x.query_shift, xp, inverse=True), _rotate(dk, positions, xp, inverse=True)
    if x.shared_qk:  # (1') through k / |k|
        k_hat = xp.asarray(x.k, dtype=q.dtype) / norm
        radial = xp.where(norm > L2NORM_EPS, (k_hat * dk).sum(axis=-1, keepdims=True), 0.0)
        dk = (dk - k_hat * radial) / norm
    return Grads(q=dq, k=dk, v=dv)
