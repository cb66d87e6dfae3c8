"""T5's bucketed relative position bias on CPU: the Numba dense kernel with
the bias read per distance.

The T5 bias ``table[bucket(p_j − p_i), h]`` depends only on the head and the
distance ``d = p_j − p_i``, so the buckets are computed once per distance
that occurs (Nq + Nk − 1 of them for contiguous positions), the table is
gathered into one row per head over those distances, and that is handed to
the dense kernel's distance-bias hook
(:func:`refattn.dense.numba.attention_with_distance_bias`), which reads it
inside each tile: memory stays O(N). For the same reason the (Nq, Nk)
``aux["buckets"]`` of the reference is not returned.

Step numbers (T1)-(T4) match the reference's and spec/position.md (T5);
the kernel then runs dense attention's steps (1)-(7), adding the user's bias
(``x.dense.bias``) at step (3). Positions spread over more distances than
:func:`refattn.dense.numba.distance_range` allows raise :class:`SpecError`.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...dense.numba import attention_with_distance_bias, attention_with_distance_bias_vjp, distance_range
from .reference import T5Inputs, relative_position_bucket


def forward(x: T5Inputs) -> Result:
    """``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype: float32 for
    float32/float16/bfloat16 ``q``, float64 otherwise. ``aux`` is empty (the reference's
    (Nq, Nk) buckets are not formed)."""
    hook, _ = _distance_bias(x)
    return attention_with_distance_bias(x.dense, **hook)


def vjp(x: T5Inputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """``q``, ``k``, ``v``, ``table`` (num_buckets, Hq) and (with a bias) ``bias`` in its own
    shape, in the compute dtype. ``saved`` is not used: the hook's VJP recomputes the forward."""
    hook, bucket_of_distance = _distance_bias(x)
    grads, d_distance_table = attention_with_distance_bias_vjp(x.dense, cotangents, **hook)
    # (T3') The adjoint of the gather is a scatter-add: each distance's gradient (already summed
    #      over the batch and its (query, key) pairs by the kernel) goes to its bucket's row.
    d_table = np.zeros((x.bucketing.num_buckets, x.dense.shape.q_heads))  # float64
    np.add.at(d_table, bucket_of_distance, d_distance_table.T)
    grads["table"] = d_table.astype(grads["q"].dtype)
    return grads


def _distance_bias(x: T5Inputs) -> tuple[dict, np.ndarray]:
    """Steps (T1)-(T3) per distance: the hook's arguments, ``distance_table[h, n] = table[bucket(d_min + n), h]``,
    and the bucket of each distance (Nd,)."""
    d_min, n_distances = distance_range(x.q_positions, x.k_positions)
    # (T1) Every relative position (key minus query) that occurs lies in d_min .. d_min + Nd - 1.
    relative_position = d_min + np.arange(n_distances)  # (Nd,) int64
    # (T2) Its bucket, (B1)-(B4).
    b = x.bucketing
    bucket_of_distance = relative_position_bucket(relative_position, b.bidirectional, b.num_buckets, b.max_distance)
    # (T3) Each head's learned scalar for that bucket.
    distance_table = x.table[bucket_of_distance].T  # (Hq, Nd)
    hook = dict(distance_table=distance_table, d_min=d_min, q_positions=x.q_positions, k_positions=x.k_positions)
    return hook, bucket_of_distance
