"""RoPE attention over an array namespace ``xp`` (NumPy or CuPy): (R1)-(R3) rotate q and k on the device,
then dense attention's tiled algorithm (spec/position.md). The angle tables (N, r/2) are formed on the host
by the reference's own (R1)-(R2), in the compute dtype, and moved once."""

from __future__ import annotations

from dataclasses import replace

from ...core.precision import numerics
from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .reference import RopeInputs, cos_sin, pair_indices

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


def _tables(x: RopeInputs, positions, xp):
    """(R1)-(R2) cos θ and sin θ, (N, r/2) each, on the device."""
    dtype = compute_dtype(x.dense.q.dtype)
    cos, sin = cos_sin(positions, x.rope, numerics("float32" if dtype.itemsize == 4 else None))
    return xp.asarray(cos, dtype=dtype), xp.asarray(sin, dtype=dtype)


def rotate(vectors, cos, sin, x: RopeInputs, xp):
    """(R3) Rotate pair t of every vector at position n by θ[n, t]; dims from ``rotary_dim`` on pass through.
    With ``-sin``, the inverse rotation R(θ)ᵀ = R(−θ)."""
    first, second = (xp.asarray(index) for index in pair_indices(x.rope.rotary_dim, x.rope.layout))
    vectors = xp.asarray(vectors, dtype=cos.dtype)
    x_first, x_second = vectors[..., first], vectors[..., second]  # (B, H, N, r/2) each
    rotated = vectors.copy()
    rotated[..., first] = x_first * cos - x_second * sin
    rotated[..., second] = x_second * cos + x_first * sin
    return rotated


def _rotated(x: RopeInputs, xp):
    q_tables, k_tables = _tables(x, x.q_positions, xp), _tables(x, x.k_positions, xp)
    dense = replace(x.dense, q=rotate(x.dense.q, *q_tables, x, xp), k=rotate(x.dense.k, *k_tables, x, xp))
    return dense, q_tables, k_tables


def forward(x: RopeInputs, xp) -> Result:
    dense, _, _ = _rotated(x, xp)
    out, lse = dense_xp.attend(dense, xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={})


def vjp(x: RopeInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    dense, (q_cos, q_sin), (k_cos, k_sin) = _rotated(x, xp)
    grads = dense_xp.attend_vjp(dense, cotangents, xp, (BLOCK_Q, BLOCK_K), saved)
    # (R3') dq = R(θ)ᵀ dq~ = R(−θ) dq~, likewise dk.
    grads["q"] = rotate(grads["q"], q_cos, -q_sin, x, xp)
    grads["k"] = rotate(grads["k"], k_cos, -k_sin, x, xp)
    return grads
