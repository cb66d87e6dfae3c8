"""RoPE attention on CPU: a Numba rotation kernel, then the tiled dense kernels.

The same function as :mod:`refattn.position.rope.reference`, over the same
checked inputs. Steps (R1)-(R2), the angle table ``θ`` (N, r/2), are
computed in float64 and their cosines and sines rounded once to the compute
dtype, so the angles of large positions lose nothing; step (R3) is
:func:`rotate_pairs`, an O(N·D) kernel parallel over (batch, head); steps
(1)-(7) are :mod:`refattn.dense.numba`'s tiled kernels, O(N) memory. Nothing
of size Nq × Nk exists.

The VJP runs dense's VJP on the rotated q and k and rotates dq and dk back by
the transposed rotation ``R(θ)ᵀ = R(−θ)``: the same kernel given ``−sin``.

Precision: float64 inputs run in float64; float32, float16 and bfloat16
inputs in float32, as the dense kernels do.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from numba import njit, prange

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from ...dense import numba as dense_numba
from .reference import RopeInputs, pair_indices, rope_angles


def forward(x: RopeInputs) -> Result:
    """``out`` and ``lse`` in the compute dtype: float32 for float32, float16 and bfloat16 ``q``,
    float64 otherwise."""
    return transformed_forward(x, _rotated_queries_and_keys)


def vjp(x: RopeInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """``q``, ``k``, ``v`` and (with a bias) ``bias``, in the compute dtype."""
    return transformed_vjp(x, cotangents, saved, _rotated_queries_and_keys)


def transformed_forward(x, transform) -> Result:
    """Dense's tiled forward on ``x.dense`` with q and k replaced by ``transform(x, transpose=False,
    q=..., k=...)`` (RoPE's rotation here, xPos's scaled rotation in refattn/position/xpos/numba.py)."""
    q_transformed, k_transformed = transform(x, transpose=False, q=x.dense.q, k=x.dense.k)
    return dense_numba.forward(replace(x.dense, q=q_transformed, k=k_transformed))


def transformed_vjp(x, cotangents: Cotangents, saved: Result | None, transform) -> Grads:
    """Dense's tiled VJP on the transformed q and k, whose dq and dk go back through the transposed
    transform. ``saved``, the backend's forward of the same inputs, is dense's forward of the
    transformed ones: passed on."""
    q_transformed, k_transformed = transform(x, transpose=False, q=x.dense.q, k=x.dense.k)
    grads = dense_numba.vjp(replace(x.dense, q=q_transformed, k=k_transformed), cotangents, saved)
    # (R3') dq = R(θ)ᵀ dq~, dk = R(θ)ᵀ dk~ (xPos: (X3'), (R3') dq = Rᵀ S dq~).
    grads["q"], grads["k"] = transform(x, transpose=True, q=grads["q"], k=grads["k"])
    return grads


def _rotated_queries_and_keys(x: RopeInputs, *, transpose: bool, q, k) -> tuple[np.ndarray, np.ndarray]:
    """``q`` rotated by the query positions' angles and ``k`` by the key positions', in the
    compute dtype; by the transposed rotations when ``transpose``."""
    dtype = compute_dtype(x.dense.q)
    r, layout = x.rope.rotary_dim, x.rope.layout
    rotated = []
    for vectors, positions in ((q, x.q_positions), (k, x.k_positions)):
        theta = rope_angles(positions, r, base=x.rope.base, position_scale=x.rope.position_scale)  # (N, r/2)
        sin = -np.sin(theta) if transpose else np.sin(theta)
        rotated.append(rotate(vectors, np.cos(theta), sin, r, layout, dtype))
    return rotated[0], rotated[1]


def rotate(x, cos, sin, rotary_dim: int, layout: str, dtype: np.dtype) -> np.ndarray:
    """(R3) in ``dtype``: :func:`rotate_pairs` on ``x`` (B, H, N, D) with float64 tables
    ``cos``, ``sin`` (N, r/2) rounded once to ``dtype``. Returns a new (B, H, N, D) array."""
    vectors = np.ascontiguousarray(x, dtype=dtype)
    first, second = pair_indices(rotary_dim, layout)
    out = np.empty_like(vectors)
    rotate_pairs(vectors, np.ascontiguousarray(cos, dtype), np.ascontiguousarray(sin, dtype), first, second, out)
    return out


@njit(parallel=True, cache=True)
def rotate_pairs(x, cos, sin, first, second, out):
    """``out[b, h, n] = R_n x[b, h, n]``: pair ``t`` = dims ``(first[t], second[t])`` turned by
    the angle with cosine ``cos[n, t]`` and sine ``sin[n, t]``; every other dim copied.

    x, out (B, H, N, D); cos, sin (N, r/2); first, second (r/2,) int. Parallel
    over (batch, head); each vector is read once and written once.
    """
    batch, heads, length, dim = x.shape
    pairs = first.shape[0]
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        for n in range(length):
            for d in range(dim):
                out[b, h, n, d] = x[b, h, n, d]
            for t in range(pairs):
                a, c = x[b, h, n, first[t]], x[b, h, n, second[t]]
                out[b, h, n, first[t]] = a * cos[n, t] - c * sin[n, t]
                out[b, h, n, second[t]] = c * cos[n, t] + a * sin[n, t]
