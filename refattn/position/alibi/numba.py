"""ALiBi on CPU: the Numba dense kernel with the bias read per distance.

The ALiBi bias ``m_h · δ_ij`` depends only on the head and the distance
``d = p_j − p_i``, so it is handed to the dense kernel's distance-bias hook
(:func:`refattn.dense.numba.attention_with_distance_bias`) as one row per
head over the distances that occur (Nq + Nk − 1 for contiguous positions),
and read inside each tile: memory stays O(N).

Step numbers (A1)-(A3) match the reference's and spec/position.md (ALiBi);
the kernel then runs dense attention's steps (1)-(7), adding the user's bias
(``x.dense.bias``) to the table's at step (3). Positions spread over more
distances than :func:`refattn.dense.numba.distance_range` allows raise
:class:`SpecError`.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...dense.numba import attention_with_distance_bias, attention_with_distance_bias_vjp, distance_range
from .reference import AlibiInputs


def forward(x: AlibiInputs) -> Result:
    """``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype:
    float32 for float32/float16/bfloat16 ``q``, float64 otherwise."""
    return attention_with_distance_bias(x.dense, **_distance_bias(x))


def vjp(x: AlibiInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """``q``, ``k``, ``v`` and (with a bias) ``bias`` in its own shape, in the compute dtype.

    ``saved`` is not used: the hook's VJP recomputes the forward.
    """
    grads, _ = attention_with_distance_bias_vjp(x.dense, cotangents, **_distance_bias(x))
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
