"""RoPE attention on CPU: a Numba rotation kernel, then the tiled dense kernels.

The same function as :mod:`refattn.position.rope.reference`, with the same
names and parameters. Steps (R1)-(R2), the angle table ``θ`` (N, r/2), are
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

import numpy as np
from numba import njit, prange

from ...core.checks import cotangent
from ...core.results import Grads, Result
from ...dense import numba as dense_numba
from .reference import check_rope_inputs, pair_indices, rope_angles


def rope_attention(
    q,
    k,
    v,
    *,
    q_positions,
    k_positions,
    rotary_dim=None,
    base=10000.0,
    position_scale=1.0,
    layout="half",
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    dropout_keep=None,
    dropout_p=0.0,
) -> Result:
    """RoPE attention, O(N) memory; see :func:`refattn.position.rope.reference.rope_attention`.

    Returns
    -------
    Result
        ``out`` and ``lse`` in the compute dtype: float32 for float32, float16
        and bfloat16 ``q``, float64 otherwise.
    """
    dense_params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    x = check_rope_inputs(q, k, v, q_positions=q_positions, k_positions=k_positions, rotary_dim=rotary_dim,
                          base=base, position_scale=position_scale, layout=layout, **dense_params)  # fmt: skip
    q_rotated, k_rotated = _rotated_queries_and_keys(x, transpose=False, q=q, k=k)
    return dense_numba.dense_attention(q_rotated, k_rotated, v, **dense_params)


def rope_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    q_positions,
    k_positions,
    rotary_dim=None,
    base=10000.0,
    position_scale=1.0,
    layout="half",
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    dropout_keep=None,
    dropout_p=0.0,
) -> Grads:
    """Gradients of :func:`rope_attention`; see :func:`refattn.position.rope.reference.rope_attention_vjp`.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v`` and (with a bias) ``bias``, in the compute dtype.
    """
    dense_params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    x = check_rope_inputs(q, k, v, q_positions=q_positions, k_positions=k_positions, rotary_dim=rotary_dim,
                          base=base, position_scale=position_scale, layout=layout, **dense_params)  # fmt: skip
    s = x.dense.shape
    dout = cotangent(dout, "dout", (s.batch, s.q_heads, s.q_len, s.value_dim))
    dlse = None if dlse is None else cotangent(dlse, "dlse", (s.batch, s.q_heads, s.q_len))
    q_rotated, k_rotated = _rotated_queries_and_keys(x, transpose=False, q=q, k=k)
    grads = dense_numba.dense_attention_vjp(dout, q_rotated, k_rotated, v, dlse=dlse, **dense_params)
    # (R3') dq = R(θ)ᵀ dq~, dk = R(θ)ᵀ dk~.
    grads["q"], grads["k"] = _rotated_queries_and_keys(x, transpose=True, q=grads["q"], k=grads["k"])
    return grads


def _rotated_queries_and_keys(x, *, transpose: bool, q, k) -> tuple[np.ndarray, np.ndarray]:
    """``q`` rotated by the query positions' angles and ``k`` by the key positions', in the
    compute dtype; by the transposed rotations when ``transpose``."""
    dtype = dense_numba._compute_dtype(x.dense.q)
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
