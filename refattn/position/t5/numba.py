"""T5's bucketed relative position bias on CPU: the Numba dense kernel with
the bias read per distance.

The same function as :mod:`refattn.position.t5.reference`, with the same
names and parameters (less ``precision`` and ``backend``). The T5 bias
``table[bucket(p_j − p_i), h]`` depends only on the head and the distance
``d = p_j − p_i``, so the buckets are computed once per distance that
occurs (Nq + Nk − 1 of them for contiguous positions), the table is
gathered into one row per head over those distances, and that is handed
to the dense kernel's distance-bias hook
(:func:`refattn.dense.numba.attention_with_distance_bias`), which reads it
inside each tile: memory stays O(N). For the same reason the (Nq, Nk)
``aux["buckets"]`` of the reference is not returned.

Step numbers (T1)-(T4) match the reference's and spec/position.md (T5);
the kernel then runs dense attention's steps (1)-(7). Inputs are checked by the
reference's own checks, so bad input is rejected identically whichever
backend runs; in addition, positions spread over more distances than
:func:`refattn.dense.numba.distance_range` allows raise :class:`SpecError`.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Grads, Result
from ...dense.numba import attention_with_distance_bias, attention_with_distance_bias_vjp, distance_range
from .reference import T5Inputs, check_t5_inputs, relative_position_bucket


def t5_attention(
    q,
    k,
    v,
    *,
    table,
    q_positions,
    k_positions,
    bidirectional=True,
    num_buckets=32,
    max_distance=128,
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
    """Dense attention with T5's bias, tiled; see :func:`refattn.position.t5.reference.t5_attention`.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype:
        float32 for float32/float16/bfloat16 ``q``, float64 otherwise.
        ``aux`` is empty (the reference's (Nq, Nk) buckets are not formed).
    """
    x = check_t5_inputs(
        q, k, v, table=table, q_positions=q_positions, k_positions=k_positions, bidirectional=bidirectional,
        num_buckets=num_buckets, max_distance=max_distance, bias=bias,
    )  # fmt: skip
    hook, _ = _distance_bias(x)
    return attention_with_distance_bias(
        q, k, v, **hook, mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment,
        window=window, scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip


def t5_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    table,
    q_positions,
    k_positions,
    bidirectional=True,
    num_buckets=32,
    max_distance=128,
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
    """Gradients of :func:`t5_attention`; see :func:`refattn.position.t5.reference.t5_attention_vjp`.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v``, ``table`` (num_buckets, Hq) and (when a bias was
        given) ``bias`` in its own shape, in the compute dtype.
    """
    x = check_t5_inputs(
        q, k, v, table=table, q_positions=q_positions, k_positions=k_positions, bidirectional=bidirectional,
        num_buckets=num_buckets, max_distance=max_distance, bias=bias,
    )  # fmt: skip
    hook, bucket_of_distance = _distance_bias(x)
    grads, d_distance_table = attention_with_distance_bias_vjp(
        dout, q, k, v, dlse=dlse, **hook, mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment,
        window=window, scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    # (T3') The adjoint of the gather is a scatter-add: each distance's gradient (already summed
    #      over the batch and its (query, key) pairs by the kernel) goes to its bucket's row.
    d_table = np.zeros((x.bucketing.num_buckets, x.shape.q_heads))  # float64
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
