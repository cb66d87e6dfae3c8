"""Dense attention on CPU: tiled online-softmax kernels in Numba.

The same function as :mod:`refattn.dense.reference`, with the same names,
parameters and step numbers (1)-(7), computed by the tile library
:mod:`refattn.core.tiles` (read its docstring first: the online softmax, the
FlashAttention-2 backward, tiles and bounds, precision). No score-sized
array is ever allocated: memory is O(N), never O(Nq * Nk).

Position biases that depend only on the distance ``d = k_pos[j] - q_pos[i]``
and the head (ALiBi, T5) come through a hook,
:func:`attention_with_distance_bias`: a table (Hq, Nd) with one bias per
head and distance, read inside each tile at step (3), so even a bias that
differs for every (i, j) costs O(Nq + Nk) memory, not O(Nq * Nk). Its
gradient (3')::

    dtable[h, d] = sum of dS[b, h, i, j] over b and k_pos[j] - q_pos[i] = d

Kernels
-------
``_forward_kernel`` runs in parallel over (batch, query head, query block)
and sweeps key tiles with the online softmax.

``_backward_kernel`` is FlashAttention-2's backward in one pass: parallel
over (batch, kv head, split of the key blocks), a work item owns the key
blocks of its split and, for each, sweeps the query heads of its GQA group
and their query tiles. Per (query tile, key block) it forms the scores once
and takes the five products ``q kᵀ``, ``doutᵀ (P z)``, ``dout vᵀ``,
``qᵀ dscore`` and ``dscore k``: dk and dv (already summed over the group)
accumulate in the work item's own tiles, dq in the split's own slice of
``dq_parts`` (splits, B, Hq, Nq, D), summed at the end. No atomics: there
is one split when the (batch, kv head) items already share out evenly over
the threads, else one per thread (memory: that many copies of dq). The
bias gradient is owned the same way: a work item walks every axis the bias
is broadcast along (``TileArgs.serial_axes``; a bias broadcast over keys
means one split). Every work item adds into every distance of the
distance table, so with one the items are cut into one contiguous run per
thread, each adding into its own float64 slice ``ddist[lane]``, summed by
the caller.

The VJP uses the forward's ``out`` and ``lse`` from ``saved`` (this
backend's forward Result for the same inputs), and runs the forward again
only without them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from ..core import checks, tiles
from ..core.checks import float_array
from ..core.errors import SpecError
from ..core.results import Cotangents, Grads, Result
from ..core.tiles import BLOCK_K, BLOCK_Q, TileArgs, compute_dtype, exp_nonpositive, frozen, read_only
from .inputs import DenseInputs


# --------------------------------------------------------------------------
# The backend: forward and VJP over checked inputs (refattn/core/registry.py).
# --------------------------------------------------------------------------


def forward(x: DenseInputs) -> Result:
    """Steps (1)-(7), tiled: ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype
    (float32 for float32/float16/bfloat16 ``q``, float64 otherwise)."""
    return _run_forward(_DenseArgs.build(x))


def vjp(x: DenseInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (7')-(1'), tiled: ``q``, ``k``, ``v`` and (with a bias) ``bias`` in its own shape, in the compute dtype.

    ``saved``, this backend's forward of the same inputs, spares running the forward again.
    """
    grads, _ = _run_vjp(_DenseArgs.build(x), x, cotangents, saved)
    return grads


# --------------------------------------------------------------------------
# The distance-bias hook, for position encodings (refattn/position/).
#
# ALiBi and T5 add to each logit a bias that depends only on the query head
# and the distance d = k_positions[j] - q_positions[i]. The caller gives one
# row of biases per head over every distance that occurs, a table
# (Hq, Nd) whose column 0 is the distance ``d_min``; step (3) reads
# ``distance_table[h, d - d_min]`` inside each tile, so the (Nq, Nk) bias
# never exists. For contiguous positions Nd = Nq + Nk - 1: O(N) memory.
# --------------------------------------------------------------------------

#: A distance table may hold at most this many distances per query and key
#: (``distance_range`` refuses positions spread wider), but never fewer than
#: ``MIN_DISTANCE_SPAN_LIMIT``: the table replaces an (Nq, Nk) bias, and
#: positions scattered far apart would make it larger than what it replaces.
DISTANCE_SPAN_FACTOR = 16
MIN_DISTANCE_SPAN_LIMIT = 1 << 16


def distance_range(q_positions, k_positions) -> tuple[int, int]:
    """The distances a distance table must cover for these positions.

    Parameters
    ----------
    q_positions : int ndarray (Nq,)
    k_positions : int ndarray (Nk,)

    Returns
    -------
    d_min, n_distances : int
        ``d_min = min(k_positions) - max(q_positions)`` and ``n_distances =
        max(k_positions) - min(q_positions) - d_min + 1``: every distance
        ``k_positions[j] - q_positions[i]`` lies in ``[d_min, d_min +
        n_distances)``. Contiguous positions give ``n_distances = Nq + Nk - 1``.

    Raises
    ------
    SpecError
        If a position array is not a non-empty 1-D integer array, or if
        ``n_distances`` exceeds ``max(DISTANCE_SPAN_FACTOR * (Nq + Nk),
        MIN_DISTANCE_SPAN_LIMIT)``.
    """
    q_positions = checks.positions(q_positions, "q_positions", None)
    k_positions = checks.positions(k_positions, "k_positions", None)
    d_min = int(k_positions.min()) - int(q_positions.max())
    n_distances = int(k_positions.max()) - int(q_positions.min()) - d_min + 1
    limit = max(DISTANCE_SPAN_FACTOR * (q_positions.size + k_positions.size), MIN_DISTANCE_SPAN_LIMIT)
    if n_distances > limit:
        raise SpecError(
            "k_positions",
            f"positions spanning at most {limit} distances k - q together with q_positions "
            f"({DISTANCE_SPAN_FACTOR} per position; the kernel holds one bias per distance)",
            f"{n_distances} distances, from {d_min} to {d_min + n_distances - 1}",
        )
    return d_min, n_distances


def attention_with_distance_bias(
    x: DenseInputs, *, distance_table, d_min: int, q_positions, k_positions
) -> Result:
    """:func:`forward` with a position bias given per head and distance.

    The logits of step (3) are ``capped + (position_bias + bias)`` with
    ``position_bias[b, h, i, j] = distance_table[h, k_positions[j] -
    q_positions[i] - d_min]``, read tile by tile; masks, causality and
    windows stay index-based, as in :func:`forward`.

    Parameters
    ----------
    x : DenseInputs
        The checked dense arguments (q, k, v, mask, bias, causal, ...).
    distance_table : float ndarray (Hq, Nd)
        The bias of query head ``h`` at distance ``d_min + n`` is
        ``distance_table[h, n]``; it must cover every distance that occurs
        (see :func:`distance_range`).
    d_min : int
        The distance of column 0.
    q_positions : int ndarray (Nq,)
    k_positions : int ndarray (Nk,)
        The positions of the queries and keys.
    """
    distance = _DistanceBias.build(distance_table, d_min, q_positions, k_positions, x.shape, compute_dtype(x.q))
    return _run_forward(_DenseArgs.build(x, distance))


def attention_with_distance_bias_vjp(
    x: DenseInputs, cotangents: Cotangents, *, distance_table, d_min: int, q_positions, k_positions
) -> tuple[Grads, np.ndarray]:
    """Gradients of :func:`attention_with_distance_bias` for checked ``cotangents``.

    Returns
    -------
    grads : Grads
        As :func:`vjp`.
    d_distance_table : float64 ndarray (Hq, Nd)
        ``d_distance_table[h, n] = sum over b and over the (i, j) with
        k_positions[j] - q_positions[i] = d_min + n of dS[b, h, i, j]``, the
        gradient of the logits (3'). Accumulated in float64 whatever the
        compute dtype, because each entry sums up to B * Nq terms.
    """
    distance = _DistanceBias.build(distance_table, d_min, q_positions, k_positions, x.shape, compute_dtype(x.q))
    return _run_vjp(_DenseArgs.build(x, distance), x, cotangents)


# --------------------------------------------------------------------------
# What the kernels are given.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _DistanceBias:
    """The distance-bias hook, checked: the table in the compute dtype and the
    positions as int64, all read-only (see the hook's section above)."""

    table: np.ndarray  # (Hq, Nd)
    d_min: int
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64

    @staticmethod
    def build(distance_table, d_min, q_positions, k_positions, shape, dtype: np.dtype) -> "_DistanceBias":
        """Check the hook's arguments against the call's ``shape`` (an AttentionShape)."""
        q_positions = checks.positions(q_positions, "q_positions", shape.q_len)
        k_positions = checks.positions(k_positions, "k_positions", shape.kv_len)
        if isinstance(d_min, bool) or not isinstance(d_min, numbers.Integral):
            raise SpecError("d_min", "an int, the distance of the table's column 0", repr(d_min))
        table = float_array(distance_table, "distance_table")
        if table.ndim != 2 or table.shape[0] != shape.q_heads:
            raise SpecError("distance_table", f"shape (Hq, Nd) with Hq = {shape.q_heads}", f"shape {table.shape}")
        lowest = int(k_positions.min()) - int(q_positions.max())
        highest = int(k_positions.max()) - int(q_positions.min())
        if d_min > lowest or d_min + table.shape[1] - 1 < highest:
            raise SpecError(
                "distance_table",
                f"a column for every distance k_positions[j] - q_positions[i], {lowest} to {highest}",
                f"{table.shape[1]} columns from d_min = {d_min}",
            )
        return _DistanceBias(read_only(table, table, dtype), int(d_min), frozen(q_positions), frozen(k_positions))


@dataclass(frozen=True)
class _DenseArgs:
    """The tile arguments of a call (:class:`refattn.core.tiles.TileArgs`) and its
    distance bias; without one, a 1 x 1 table and one position each with
    ``has_dist`` False, so that the kernels see the same argument types every call."""

    tiles: TileArgs
    has_dist: bool
    distance: _DistanceBias

    @staticmethod
    def build(x: DenseInputs, distance: _DistanceBias | None = None) -> "_DenseArgs":
        dtype = compute_dtype(x.q)
        has_dist = distance is not None
        if not has_dist:
            no_positions = frozen(np.zeros(1, np.int64))
            distance = _DistanceBias(frozen(np.zeros((1, 1), dtype)), 0, no_positions, no_positions)
        return _DenseArgs(TileArgs.build(x, dtype, (x.q, x.k, x.v)), has_dist, distance)

    def arrays(self) -> tuple:
        """q, k, v."""
        return (self.tiles.q, self.tiles.k, self.tiles.v)

    def logits(self) -> tuple:
        """Arguments of steps (1)-(4), the distance bias first, in the kernels' order."""
        d = self.distance
        return (self.has_dist, d.table, d.d_min, d.q_positions, d.k_positions, *self.tiles.logits())


def _run_forward(args: _DenseArgs) -> Result:
    out, lse = tiles.forward_outputs(args.tiles.q, args.tiles.v.shape[3])
    _forward_kernel(*args.arrays(), *args.logits(), *args.tiles.dropout(), out, lse)
    return Result(out=out, lse=lse, aux={})


def _run_vjp(args: _DenseArgs, x: DenseInputs, cotangents: Cotangents, saved: Result | None = None):
    """Grads of q, k, v (and the user bias), and the distance table's gradient (None without one).

    ``out`` and ``lse`` come from ``saved`` when it holds them in the compute dtype, else from
    the forward once more (out for delta, lse to recompute P tile by tile).
    """
    t = args.tiles
    dtype = t.q.dtype
    if not tiles.reusable(saved, dtype, cotangents.dout.shape):
        saved = _run_forward(args)
    dout, lse_for_p, delta, dlse = tiles.backward_rows(cotangents.dout, cotangents.dlse, saved.out, saved.lse, dtype)

    threads = numba.get_num_threads()
    batch, kv_heads, kv_len = t.k.shape[:3]
    serial_batch, serial_heads, serial_blocks = t.serial_axes()
    items = (1 if serial_batch else batch) * (1 if serial_heads else kv_heads)
    n_blocks = (kv_len + BLOCK_K - 1) // BLOCK_K
    splits = 1 if serial_blocks or items % threads == 0 else min(threads, n_blocks)
    dq_parts = np.zeros((splits, *t.q.shape), dtype)  # (splits, B, Hq, Nq, D)
    dk = np.empty(t.k.shape, dtype)
    dv = np.empty(t.v.shape, dtype)
    dbias = np.zeros(t.bias_own_shape, dtype)  # the bias's own shape, as 4-D
    lanes = threads if args.has_dist else 1
    ddist = np.zeros((lanes, *args.distance.table.shape), np.float64)  # (lanes, Hq, Nd)
    _backward_kernel(
        *args.arrays(), dout, lse_for_p, delta, dlse, *args.logits(), *t.dropout(), *t.serial_axes(),
        dq_parts, dk, dv, dbias, ddist,
    )  # fmt: skip
    dq = dq_parts[0] if splits == 1 else dq_parts.sum(axis=0)
    dq *= t.scale
    grads = Grads(q=dq, k=dk, v=dv, **t.bias_grad(dbias, x))
    return grads, ddist.sum(axis=0) if args.has_dist else None


# --------------------------------------------------------------------------
# Steps (1)-(4) with the distance bias.
# --------------------------------------------------------------------------


@njit(cache=True)
def _logits(
    t, dcap, key_major, n_q, n_k, b, h, i0, j0,
    has_dist, dist_table, d_min, q_positions, k_positions,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
):  # fmt: skip
    """Steps (1)-(4) in place on a tile of ``q·k`` (see :func:`refattn.core.tiles.logits_tile`), the
    position bias ``dist_table[h, k_pos[j] - q_pos[i] - d_min]`` added at step (3), before the user bias."""
    tiles.scale_and_cap(t, dcap, key_major, n_q, n_k, scale, softcap)
    if has_dist:
        n_rows, n_cols = tiles.real_extent(key_major, n_q, n_k)
        for r in range(n_rows):
            for c in range(n_cols):
                i, j = tiles.pair(key_major, i0, j0, r, c)
                t[r, c] += dist_table[h, k_positions[j] - q_positions[i] - d_min]
    tiles.bias_and_mask(
        t, key_major, n_q, n_k, b, h, i0, j0,
        has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
    )  # fmt: skip


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(
    q, k, v,
    has_dist, dist_table, d_min, q_positions, k_positions,  # (3) the distance bias
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    out, lse,
):  # fmt: skip
    """out (B, Hq, Nq, Dv), lse (B, Hq, Nq) by the online softmax; parallel over (b, h, query block)."""
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    dtype = q.dtype
    for item in prange(tiles.query_blocks(q)):
        b, h, kvh, i0, n_q = tiles.query_block(item, q, kv_heads)
        q_t = tiles.transposed(q, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        s_t, dcap, acc_t, pv_t, state = tiles.forward_buffers(value_dim, dtype)
        key_lo, key_hi = tiles.key_range(i0, i0 + n_q, offset, left, right, kv_len)
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            np.dot(k[b, kvh, j0 : j0 + n_k], q_t, s_t[:n_k])  # (n_k, BQ) = k q^T
            _logits(
                s_t, dcap, True, n_q, n_k, b, h, i0, j0,
                has_dist, dist_table, d_min, q_positions, k_positions,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
            )  # fmt: skip
            tiles.attend_tile(
                s_t, n_q, n_k, b, h, i0, j0, v[b, kvh, j0 : j0 + n_k], state, acc_t, pv_t, has_keep, keep, keep_strides
            )
        tiles.finish_rows(acc_t, state, n_q, keep_scale, b, h, i0, out, lse)


# --------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _backward_kernel(
    q, k, v, dout, lse, delta, dlse,
    has_dist, dist_table, d_min, q_positions, k_positions,  # (3) the distance bias
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    serial_batch, serial_heads, serial_blocks,
    dq_parts, dk, dv, dbias, ddist,
):  # fmt: skip
    """dq_parts (splits, B, Hq, Nq, D) unscaled, dk, dv (B, Hkv, Nk, ·), dbias (the bias's own
    shape, 4-D) and ddist (lanes, Hq, Nd); parallel over (b, kv head, split) (see the module docstring).

    ``lse`` is the forward's, with +inf on fully masked rows.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    n_blocks = (kv_len + BLOCK_K - 1) // BLOCK_K
    splits = dq_parts.shape[0]
    dtype = q.dtype
    items_b, items_h, _ = tiles.key_block_items(batch, kv_heads, n_blocks, serial_batch, serial_heads, serial_blocks)
    n_items = items_b * items_h * splits
    lanes = min(ddist.shape[0], n_items) if has_dist else n_items
    for lane in prange(lanes):
        s, dcap, pz, ds, dk_tile, dv_tile, rows = tiles.pair_buffers(head_dim, value_dim, dtype)
        dq_tile = np.empty((BLOCK_Q, head_dim), dtype)  # one query tile's dscore k
        for item in range(lane * n_items // lanes, (lane + 1) * n_items // lanes):
            outer, split = item // splits, item % splits
            b_lo, b_hi, h_lo, h_hi, _, _ = tiles.item_ranges(
                outer // items_h, outer % items_h, 0, batch, kv_heads, n_blocks, serial_batch, serial_heads, True
            )
            dq = dq_parts[split]
            for b in range(b_lo, b_hi):
                for kvh in range(h_lo, h_hi):
                    for block in range(split, n_blocks, splits):
                        j0, n_k, k_t, v_t, dk_t, dv_t = tiles.key_block(k, v, b, kvh, block)  # (D, BK), (Dv, BK)
                        query_lo, query_hi = tiles.query_range(j0, j0 + n_k, offset, left, right, q_len)
                        for h in range(kvh * group, (kvh + 1) * group):
                            for i0 in range(query_lo, query_hi, BLOCK_Q):
                                n_q = min(BLOCK_Q, query_hi - i0)
                                q_tile = q[b, h, i0 : i0 + n_q]  # (n_q, D), a view
                                dout_tile = dout[b, h, i0 : i0 + n_q]  # (n_q, Dv), a view
                                tiles.load_rows(rows, lse, delta, dlse, b, h, i0, n_q)
                                # (1)-(4) Logits.
                                np.dot(q_tile, k_t, s[:n_q])  # (n_q, BK) = q k^T
                                _logits(
                                    s, dcap, False, n_q, n_k, b, h, i0, j0,
                                    has_dist, dist_table, d_min, q_positions, k_positions,
                                    scale, softcap, has_bias, bias, bias_strides,
                                    has_mask, mask, mask_strides, offset, left, right,
                                )  # fmt: skip
                                # (7') dP = dout v^T; (5)-(3') P, dv, dS, dbias.
                                np.dot(dout_tile, v_t, ds[:n_q])
                                tiles.pair_grads(
                                    s, pz, ds, dv_t, dv_tile, dout_tile, n_q, n_k, b, h, i0, j0, rows,
                                    has_bias, dbias, has_keep, keep, keep_strides, keep_scale,
                                )  # fmt: skip
                                # (3') The distance table's gradient: dS summed over b and over the
                                #      (i, j) of each distance.
                                if has_dist:
                                    for r in range(n_q):
                                        column_of_query = q_positions[i0 + r] + d_min
                                        for c in range(n_k):
                                            ddist[lane, h, k_positions[j0 + c] - column_of_query] += ds[r, c]
                                # (2') Soft-cap derivative; (1') dk^T += q^T dscore, dq += dscore k.
                                tiles.pair_products(ds, dcap, dk_t, dk_tile, q_tile, n_q, n_k, softcap)
                                np.dot(ds[:n_q], k_t.T, dq_tile[:n_q])
                                tiles.accumulate(dq[b, h, i0 : i0 + n_q], dq_tile[:n_q])
                        tiles.write_rows(dk, b, kvh, j0, n_k, dk_t, scale)
                        tiles.write_rows(dv, b, kvh, j0, n_k, dv_t, 1)
