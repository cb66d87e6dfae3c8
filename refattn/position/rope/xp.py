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


def forward(x: RopeInputs, xp) -> Result:
    tables = _tables(x, x.q_positions, xp), _tables(x, x.k_positions, xp)
    return rotated_attention(x.dense, *tables, x, xp, (BLOCK_Q, BLOCK_K))


def vjp(x: RopeInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    tables = _tables(x, x.q_positions, xp), _tables(x, x.k_positions, xp)
    return rotated_attention_vjp(x.dense, *tables, x, cotangents, xp, (BLOCK_Q, BLOCK_K), saved)


def rotated_attention(dense, q_tables, k_tables, rotation, xp, blocks) -> Result:
    """(R3) q and k rotated by their (cos, sin) tables, then dense attention's tiled algorithm. ``rotation``:
    anything with ``.rope`` (:func:`rotate`); xPos passes its scaled tables."""
    out, lse = dense_xp.attend(_rotated(dense, q_tables, k_tables, rotation, xp), xp, blocks)
    return Result(out=out, lse=lse, aux={})


def rotated_attention_vjp(dense, q_tables, k_tables, rotation, cotangents: Cotangents, xp, blocks, saved) -> Grads:
    """The VJP of :func:`rotated_attention`: dense attention's, then (R3') dq = R(θ)ᵀ dq~ = R(−θ) dq~ (with
    xPos's tables, Rᵀ S dq~), likewise dk."""
    grads = dense_xp.attend_vjp(_rotated(dense, q_tables, k_tables, rotation, xp), cotangents, xp, blocks, saved)
    (q_cos, q_sin), (k_cos, k_sin) = q_tables, k_tables
    grads["q"] = rotate(grads["q"], q_cos, -q_sin, rotation, xp)
    grads["k"] = rotate(grads["k"], k_cos, -k_sin, rotation, xp)
    return grads


def _rotated(dense, q_tables, k_tables, rotation, xp):
    """Dense inputs with ``q~ = R q`` and ``k~ = R k``."""
    return replace(dense, q=rotate(dense.q, *q_tables, rotation, xp), k=rotate(dense.k, *k_tables, rotation, xp))
