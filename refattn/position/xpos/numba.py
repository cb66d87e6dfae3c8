"""xPos attention on CPU: RoPE's Numba rotation kernel with the scales folded in, then the tiled dense kernels.

The same function as :mod:`refattn.position.xpos.reference`, with the same
names and parameters. Scaling pair ``t`` after rotating it is the same as
rotating it with ``cos θ`` and ``sin θ`` both multiplied by the pair's factor
``ζ_t^(±n / scale_base)`` (torchscale folds them the same way), so one call
of :func:`refattn.position.rope.numba.rotate_pairs` does (R3) and (X3). The
tables (N, r/2) are computed in float64 and rounded once to the compute
dtype; steps (1)-(7) are :mod:`refattn.dense.numba`'s, O(N) memory.

The VJP runs dense's VJP on the transformed q and k and applies the
transposed transform ``(S R)ᵀ = Rᵀ S = S R(−θ)`` (a per-pair factor commutes
with the pair's rotation): the same kernel with the sines negated.
"""

from __future__ import annotations

import numpy as np

from ...core.checks import cotangent
from ...core.results import Grads, Result
from ...dense import numba as dense_numba
from ..rope.numba import rotate
from ..rope.reference import angles
from .reference import check_xpos_inputs, scales


def xpos_attention(
    q,
    k,
    v,
    *,
    q_positions,
    k_positions,
    rotary_dim=None,
    base=10000.0,
    scale_base=512.0,
    gamma=0.4,
    layout="interleaved",
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
    """xPos attention, O(N) memory; see :func:`refattn.position.xpos.reference.xpos_attention`.

    Returns
    -------
    Result
        ``out`` and ``lse`` in the compute dtype (float32 for float32, float16
        and bfloat16 ``q``, float64 otherwise).
    """
    dense_params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    x = check_xpos_inputs(q, k, v, q_positions=q_positions, k_positions=k_positions, rotary_dim=rotary_dim,
                          base=base, scale_base=scale_base, gamma=gamma, layout=layout, **dense_params)  # fmt: skip
    q_transformed, k_transformed = _transformed_queries_and_keys(x, transpose=False, q=q, k=k)
    return dense_numba.dense_attention(q_transformed, k_transformed, v, **dense_params)


def xpos_attention_vjp(
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
    scale_base=512.0,
    gamma=0.4,
    layout="interleaved",
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
    """Gradients of :func:`xpos_attention`; see :func:`refattn.position.xpos.reference.xpos_attention_vjp`.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v`` and (with a bias) ``bias``, in the compute dtype.
    """
    dense_params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    x = check_xpos_inputs(q, k, v, q_positions=q_positions, k_positions=k_positions, rotary_dim=rotary_dim,
                          base=base, scale_base=scale_base, gamma=gamma, layout=layout, **dense_params)  # fmt: skip
    s = x.dense.shape
    dout = cotangent(dout, "dout", (s.batch, s.q_heads, s.q_len, s.value_dim))
    dlse = None if dlse is None else cotangent(dlse, "dlse", (s.batch, s.q_heads, s.q_len))
    q_transformed, k_transformed = _transformed_queries_and_keys(x, transpose=False, q=q, k=k)
    grads = dense_numba.dense_attention_vjp(dout, q_transformed, k_transformed, v, dlse=dlse, **dense_params)
    # (X3'), (R3') dq = Rᵀ S dq~, dk likewise.
    grads["q"], grads["k"] = _transformed_queries_and_keys(x, transpose=True, q=grads["q"], k=grads["k"])
    return grads


def _transformed_queries_and_keys(x, *, transpose: bool, q, k) -> tuple[np.ndarray, np.ndarray]:
    """``q`` upscaled and rotated at the query positions, ``k`` downscaled and rotated at the
    key positions, in the compute dtype; by the transposed transforms when ``transpose``."""
    dtype = dense_numba._compute_dtype(x.dense.q)
    rope = x.xpos.rope
    transformed = []
    for vectors, positions, downscale in ((q, x.q_positions, False), (k, x.k_positions, True)):
        theta = angles(positions, rope)  # (N, r/2), float64
        factors = scales(positions, x.xpos, downscale)  # (N, r/2), float64
        sin = factors * (-np.sin(theta) if transpose else np.sin(theta))
        transformed.append(rotate(vectors, factors * np.cos(theta), sin, rope.rotary_dim, rope.layout, dtype))
    return transformed[0], transformed[1]
