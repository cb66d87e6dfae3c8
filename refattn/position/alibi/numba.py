"""ALiBi on CPU: the Numba dense kernel with the bias read per distance.

The same function as :mod:`refattn.position.alibi.reference`, with the same
names and parameters (less ``precision`` and ``backend``). The ALiBi bias
``m_h · δ_ij`` depends only on the head and the distance ``d = p_j − p_i``,
so it is handed to the dense kernel's distance-bias hook
(:func:`refattn.dense.numba.attention_with_distance_bias`) as one row per
head over the distances that occur (Nq + Nk − 1 for contiguous positions),
and read inside each tile: memory stays O(N).

Step numbers (A1)-(A3) match the reference's and spec/position.md (ALiBi);
the kernel then runs dense attention's steps (1)-(7). Inputs are checked by the
reference's own checks, so bad input is rejected identically whichever
backend runs; in addition, positions spread over more distances than
:func:`refattn.dense.numba.distance_range` allows raise :class:`SpecError`.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Grads, Result
from ...dense.numba import attention_with_distance_bias, attention_with_distance_bias_vjp, distance_range
from .reference import AlibiInputs, check_alibi_inputs


def alibi_attention(
    q,
    k,
    v,
    *,
    q_positions,
    k_positions,
    slopes=None,
    form="causal",
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
    """Attention with linear biases, tiled; see :func:`refattn.position.alibi.reference.alibi_attention`.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype:
        float32 for float32/float16/bfloat16 ``q``, float64 otherwise.
    """
    x = check_alibi_inputs(q, k, v, q_positions=q_positions, k_positions=k_positions, slopes=slopes, form=form, bias=bias)
    return attention_with_distance_bias(
        q, k, v, **_distance_bias(x), mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment,
        window=window, scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip


def alibi_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    q_positions,
    k_positions,
    slopes=None,
    form="causal",
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
    """Gradients of :func:`alibi_attention`; see :func:`refattn.position.alibi.reference.alibi_attention_vjp`.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v`` and (when a bias was given) ``bias`` in its own
        shape, in the compute dtype. Slopes and positions are constants.
    """
    x = check_alibi_inputs(q, k, v, q_positions=q_positions, k_positions=k_positions, slopes=slopes, form=form, bias=bias)
    grads, _ = attention_with_distance_bias_vjp(
        dout, q, k, v, dlse=dlse, **_distance_bias(x), mask=mask, bias=bias, causal=causal,
        causal_alignment=causal_alignment, window=window, scale=scale, softcap=softcap,
        dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    # (A2')-(A1') Slopes and positions are constants: the distance table's gradient is not needed.
    return grads


def _distance_bias(x: AlibiInputs) -> dict:
    """Steps (A1)-(A2) per distance: the hook's arguments, ``distance_table[h, n] = m_h · δ(d_min + n)``."""
    d_min, n_distances = distance_range(x.q_positions, x.k_positions)
    # (A1) Signed distance of every distance that occurs: d (causal form) or -|d| (symmetric).
    distance = d_min + np.arange(n_distances)  # (Nd,) int64
    signed = distance if x.form == "causal" else -np.abs(distance)
    # (A2) Per-head linear bias m_h · δ.
    table = x.slopes.astype(np.float64)[:, None] * signed.astype(np.float64)  # (Hq, Nd)
    return dict(distance_table=table, d_min=d_min, q_positions=x.q_positions, k_positions=x.k_positions)
