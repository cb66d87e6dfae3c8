"""Invariants of T5's bucketed bias (spec/position.md, "T5 bias: invariants"), reusable on any implementation.

Attention properties take ``attend(q, k, v, **params)``, a T5-bias
implementation returning an object with ``.out`` (B, Hq, Nq, Dv) and ``.lse``
(B, Hq, Nq) -- a refattn :class:`~refattn.core.results.Result`, or your kernel
wrapped to look like one -- and a problem: ``q``, ``k``, ``v`` and ``params``,
the keyword arguments of :func:`refattn.position.t5.t5_attention` (``table``,
``q_positions`` and ``k_positions`` included). The bucket property takes your
bucket function ``bucket(relative_position, bidirectional, num_buckets,
max_distance)`` instead. Each raises ``AssertionError`` describing the
violation, or returns None. ``rtol`` is a normwise relative tolerance: 1e-10
suits float64 implementations.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, shifted_positions_change_nothing


def position_shift_invariance(attend, q, k, v, params, shift=1000, rtol=1e-10):
    """Adding the same integer to every query and key position changes nothing: the
    buckets depend on the positions only through ``p_j − p_i``."""
    shifted_positions_change_nothing(attend, q, k, v, params, shift, rtol)


def constant_table_shifts_lse(attend, q, k, v, params, rtol=1e-10):
    """A table whose every bucket holds the same value ``c_h`` for head ``h`` adds
    ``c_h`` to every logit of the head: the output is that of a zero table and
    the log-sum-exp is larger by exactly ``c_h``."""
    table = np.asarray(params["table"], np.float64)
    per_head = np.arange(1, table.shape[1] + 1) * 0.75  # c_h
    base = attend(q, k, v, **dict(params, table=np.zeros_like(table)))
    moved = attend(q, k, v, **dict(params, table=np.broadcast_to(per_head, table.shape).copy()))
    close("out", moved.out, base.out, rtol)
    close("lse - c_h", moved.lse - per_head[:, None], base.lse, rtol)


def buckets_monotone_and_saturating(bucket, bidirectional=True, num_buckets=32, max_distance=128):
    """Buckets grow with the distance on each side, and saturate at ``max_distance``.

    Over every relative position ``r`` in ``[−3·max_distance, 3·max_distance]``:

    * every bucket is in ``[0, num_buckets)``;
    * bidirectional: ``r <= 0`` uses the lower half of the buckets, ``r > 0`` the
      upper half; unidirectional: every ``r >= 0`` is bucket 0;
    * on each side the bucket is non-decreasing in the distance ``|r|``, equals the
      distance below ``max_exact`` (half of one side's buckets), and is the side's
      last bucket from ``max_distance`` on.
    """
    side_buckets = num_buckets // 2 if bidirectional else num_buckets
    distance = np.arange(3 * max_distance + 1)  # n = |r|
    before = np.asarray(bucket(-distance, bidirectional, num_buckets, max_distance))  # r = -n <= 0
    _check_side("keys before the query", before, distance, side_buckets, max_distance)
    after = np.asarray(bucket(distance[1:], bidirectional, num_buckets, max_distance))  # r = n > 0
    if bidirectional:
        _check_side("keys after the query", after - side_buckets, distance[1:], side_buckets, max_distance)
    elif np.any(after != 0):
        raise AssertionError("keys after the query: not all in bucket 0 (unidirectional)")


def _check_side(name: str, local, distance, side_buckets: int, max_distance: int) -> None:
    """One side's buckets, counted from the side's first: in range, exact, non-decreasing, saturating."""
    max_exact = side_buckets // 2
    if np.any(local < 0) or np.any(local >= side_buckets):
        raise AssertionError(f"{name}: a bucket outside the side's {side_buckets} buckets")
    if np.any(np.diff(local) < 0):
        raise AssertionError(f"{name}: buckets decrease with the distance")
    small = distance < max_exact
    if np.any(local[small] != distance[small]):
        raise AssertionError(f"{name}: distances below max_exact = {max_exact} do not have a bucket each")
    if np.any(local[distance >= max_distance] != side_buckets - 1):
        raise AssertionError(f"{name}: distances from max_distance = {max_distance} on are not in the last bucket")


ALL = (position_shift_invariance, constant_table_shifts_lse)
