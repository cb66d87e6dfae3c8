"""Transformer-XL relative attention on CPU: tiled online-softmax kernels in Numba.

The same function as :mod:`refattn.position.transformer_xl.reference`, with
the same names, parameters and step numbers, computed by the tile library
:mod:`refattn.core.tiles`. Read its docstring first: the online softmax, the
FlashAttention-2 backward, the tile bounds from causality and windows, the
precision rules and the ``exp`` are the library's. No score-sized array is
ever allocated: memory is O(N), never O(Nq * Nk).

What differs is how a tile of raw scores is formed. For a tile of queries
``i`` and keys ``j``, the content term (1a) plus the position term (1b)::

    t_ij = (q_i + u) . k_j  +  (q_i + v_bias) . r[row(i, j)]        row(i, j) = R - 1 - (p_i - p'_j)

The content term is one product of tiles, ``(q + u) kᵀ``, as in dense.
For the position term (1b), the pairs of a tile read the rows ``[lo, hi)``
between its largest and its smallest distance; with consecutive positions
these are at most ``BLOCK_Q + BLOCK_K - 1`` rows. The tile forms
``G = r[lo:hi] (q + v_bias)ᵀ``, a (hi - lo, BLOCK_Q) product, once, and each
pair picks ``G[row(i, j) - lo, i]``: the original's ``(q + v_bias) rᵀ`` and
``_rel_shift``, restricted to the tile and without the shift. When positions
have gaps a tile may span more than ``SPAN_MAX`` rows; each pair's dot product
is then taken on its own (the same value, more slowly). Steps (1c)-(4) --
scale, soft-cap, bias, mask -- are the library's
:func:`~refattn.core.tiles.logits_tile`.

Backward
--------
With ``dscore = dS`` times the soft-cap's derivative, as in dense::

    d(q + u)_i      = scale * sum_j dscore_ij k_j              (1a')  -> dq; du sums it over b, i
    d(q + v_bias)_i = scale * sum_j dscore_ij r[row(i, j)]     (1b')  -> dq; dv_bias sums it over b, i
    dk_j            = scale * sum_i dscore_ij (q_i + u)        (1a')
    dr[h, t]        = scale * sum over b and the pairs with row(i, j) = t of dscore_ij (q_i + v_bias)   (1b')

Three kernels, none with atomics, given the forward's ``out`` and ``lse``
(``saved``, or the forward once more):

* ``_dq_kernel``, parallel over (batch, query head, query block), gives the
  two query gradients separately; their sums over batch and queries are du
  and dv_bias.
* ``_dkv_kernel``, parallel over (batch, kv head, key block): dk, dv and the
  user bias's gradient, by the library's
  :func:`~refattn.core.tiles.pair_grads` and
  :func:`~refattn.core.tiles.pair_products`.
* ``_dr_kernel``, parallel over (query head, block of ``BLOCK_R`` rows of
  r): a work item owns its rows of dr and sweeps the (query block, key block)
  tiles whose distances reach them, recomputing the tile's ``dscore``. With
  consecutive positions a tile's distances meet one or two row blocks, so
  this costs one to two passes over the scores.

Every unmasked pair must have a row of ``r``. The forward kernel checks
each tile after masking and records, per query row, the first key that
breaks this; the caller then raises the reference's error
(:func:`~refattn.position.transformer_xl.inputs.missing_row`).

Precision: as the library's; ``q + u`` and ``q + v_bias`` are formed once, in
the compute dtype, before the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ...core import tiles
from ...core.results import Cotangents, Grads, Result
from ...core.tiles import BLOCK_K, BLOCK_Q, TileArgs, compute_dtype, read_only
from .inputs import TransformerXLInputs, missing_row

SPAN_MAX = BLOCK_Q + BLOCK_K - 1  # rows of r one tile of consecutive positions can read
BLOCK_R = 256  # rows of r per work item of the dr kernel

# --------------------------------------------------------------------------
# The backend: forward and VJP over checked inputs (refattn/core/registry.py).
# --------------------------------------------------------------------------


def forward(x: TransformerXLInputs) -> Result:
    """Steps (1a)-(7), tiled: ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype
    (float32 for float32/float16/bfloat16 ``q``, float64 otherwise)."""
    return _run_forward(_XLArgs.build(x), x)


def vjp(x: TransformerXLInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (7')-(1'), tiled: ``q``, ``k``, ``v``, ``r``, ``u``, ``v_bias`` and (with a bias)
    ``bias`` in its own shape, in the compute dtype.

    ``saved``, this backend's forward of the same inputs, spares running the forward again.
    """
    args = _XLArgs.build(x)
    t = args.tiles
    dtype = t.q.dtype
    if not tiles.reusable(saved, dtype, cotangents.dout.shape):
        saved = _run_forward(args, x)
    per_row = tiles.backward_rows(cotangents.dout, cotangents.dlse, saved.out, saved.lse, dtype)

    dq_content = np.empty(args.q_content.shape, dtype)
    dq_position = np.empty(args.q_content.shape, dtype)
    _dq_kernel(*args.arrays(), *per_row, *t.logits(), *t.dropout(), dq_content, dq_position)

    dk = np.empty(t.k.shape, dtype)
    dv = np.empty(t.v.shape, dtype)
    dbias = np.zeros(t.bias_own_shape, dtype)  # the bias's own shape, as 4-D
    _dkv_kernel(*args.arrays(), *per_row, *t.logits(), *t.dropout(), *t.serial_axes(), dk, dv, dbias)

    dr = np.empty(args.r.shape, dtype)
    _dr_kernel(*args.arrays(), *per_row, *t.logits(), *t.dropout(), *args.block_extremes(), dr)

    # q enters both terms; u and v_bias are added to every query of every batch element.
    return Grads(
        q=dq_content + dq_position,
        k=dk,
        v=dv,
        r=dr,
        u=dq_content.sum(axis=(0, 2)),
        v_bias=dq_position.sum(axis=(0, 2)),
        **t.bias_grad(dbias, x.dense),
    )


# --------------------------------------------------------------------------
# What the kernels are given.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _XLArgs:
    """The dense part as the library's :class:`~refattn.core.tiles.TileArgs` (whose
    ``q`` is unused: the kernels take the two shifted queries of steps (1a) and (1b))."""

    tiles: TileArgs
    q_content: np.ndarray  # (B, Hq, Nq, D): q + u, compute dtype
    q_position: np.ndarray  # (B, Hq, Nq, D): q + v_bias
    r: np.ndarray  # (Hq, R, D), read-only
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64

    @staticmethod
    def build(x: TransformerXLInputs) -> "_XLArgs":
        dtype = compute_dtype(x.dense.q)
        dense = TileArgs.build(x.dense, dtype, (x.dense.q, x.dense.k, x.dense.v))
        return _XLArgs(
            tiles=dense,
            q_content=dense.q + np.asarray(x.u, dtype)[None, :, None, :],
            q_position=dense.q + np.asarray(x.v_bias, dtype)[None, :, None, :],
            r=read_only(x.r, x.r, dtype),
            q_positions=x.q_positions,
            k_positions=x.k_positions,
        )

    def arrays(self) -> tuple:
        """The arrays every kernel reads tiles of, in the kernels' order."""
        return (self.q_content, self.tiles.k, self.tiles.v, self.q_position, self.r, self.q_positions, self.k_positions)

    def block_extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest position of each query block and each key block, (n_blocks, 2) int64 each."""
        return _extremes(self.q_positions, BLOCK_Q), _extremes(self.k_positions, BLOCK_K)


def _extremes(positions: np.ndarray, block: int) -> np.ndarray:
    starts = np.arange(0, positions.shape[0], block)
    return np.stack([np.minimum.reduceat(positions, starts), np.maximum.reduceat(positions, starts)], axis=1)


def _run_forward(args: _XLArgs, x: TransformerXLInputs) -> Result:
    """out and lse by the forward kernel; raises if an unmasked pair had no row of r."""
    out, lse = tiles.forward_outputs(args.q_content, args.tiles.v.shape[3])
    missing = np.full(lse.shape, -1, np.int64)  # per query row: a key without a row, or -1
    _forward_kernel(*args.arrays(), *args.tiles.logits(), *args.tiles.dropout(), out, lse, missing)
    if np.any(missing >= 0):
        b, h, i = np.argwhere(missing >= 0)[0]
        raise missing_row(x, int(i), int(missing[b, h, i]))
    return Result(out=out, lse=lse, aux={})


# --------------------------------------------------------------------------
# Steps (1b)-(4) of one tile, and the adjoint of (1b).
# --------------------------------------------------------------------------


@njit(cache=True)
def _logits(
    t, dcap, g, key_major, n_q, n_k, b, h, i0, j0, qp_t, r_h, q_positions, k_positions,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
):  # fmt: skip
    """Steps (1b)-(4) in place on a tile ``t`` that holds the content term (1a): the
    position term (``qp_t`` the (D, BLOCK_Q) transposed tile of q + v_bias, ``g`` a
    (SPAN_MAX, BLOCK_Q) buffer), then the library's (1c)-(4), the scale multiplying both terms."""
    _add_position_term(t, key_major, n_q, n_k, i0, j0, qp_t, r_h, q_positions, k_positions, g)
    tiles.logits_tile(
        t, dcap, key_major, n_q, n_k, b, h, i0, j0,
        scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
    )  # fmt: skip


@njit(cache=True)
def _pair_row(q_positions, k_positions, i, j, n_rows):
    """The row of r that query i and key j read, R - 1 - (p_i - p'_j); it may lie outside [0, R)."""
    return n_rows - 1 - (q_positions[i] - k_positions[j])


@njit(cache=True)
def _row_span(q_low, q_high, k_low, k_high, n_rows):
    """Rows [lo, hi) of r that queries at positions in [q_low, q_high] and keys at
    positions in [k_low, k_high] read, clipped to [0, R); and whether every such pair has a row."""
    lo = n_rows - 1 - (q_high - k_low)  # the largest distance reads the lowest row
    hi = n_rows - (q_low - k_high)  # the smallest distance the highest
    return max(lo, 0), min(hi, n_rows), lo >= 0 and hi <= n_rows


@njit(cache=True)
def _tile_rows(q_positions, k_positions, i0, n_q, j0, n_k, n_rows):
    """:func:`_row_span` of the queries [i0, i0 + n_q) and the keys [j0, j0 + n_k)."""
    q_tile, k_tile = q_positions[i0 : i0 + n_q], k_positions[j0 : j0 + n_k]
    return _row_span(q_tile.min(), q_tile.max(), k_tile.min(), k_tile.max(), n_rows)


@njit(cache=True)
def _add_position_term(t, key_major, n_q, n_k, i0, j0, qp_t, r_h, q_positions, k_positions, g):
    """Step (1b): add ``(q_i + v_bias) . r[row(i, j)]`` to each pair of the tile ``t``.

    Pairs without a row get nothing; they must be masked (the forward checks).
    """
    n_rows = r_h.shape[0]
    lo, hi, _ = _tile_rows(q_positions, k_positions, i0, n_q, j0, n_k, n_rows)
    if hi <= lo:
        return
    gathered = hi - lo <= g.shape[0]
    if gathered:
        np.dot(r_h[lo:hi], qp_t, g[: hi - lo])  # (span, BQ): every query against every row it may read
    n_tile_rows, n_tile_cols = (n_k, n_q) if key_major else (n_q, n_k)
    for a in range(n_tile_rows):
        for c in range(n_tile_cols):
            i, j = (i0 + c, j0 + a) if key_major else (i0 + a, j0 + c)
            row = _pair_row(q_positions, k_positions, i, j, n_rows)
            if lo <= row < hi:
                if gathered:
                    t[a, c] += g[row - lo, i - i0]
                else:  # positions with gaps: this pair's dot product on its own
                    total = t.dtype.type(0.0)
                    for d in range(r_h.shape[1]):
                        total += qp_t[d, i - i0] * r_h[row, d]
                    t[a, c] += total


@njit(cache=True)
def _scatter_to_rows(ds_t, n_q, n_k, i0, j0, q_positions, k_positions, n_rows, lo, hi, dg):
    """Adjoint of the pick in (1b), key-major tile: ``dg[row(i, j) - lo, i] += ds_t[j, i]`` for rows in [lo, hi)."""
    for a in range(n_k):
        for c in range(n_q):
            row = _pair_row(q_positions, k_positions, i0 + c, j0 + a, n_rows)
            if lo <= row < hi:
                dg[row - lo, c] += ds_t[a, c]


@njit(cache=True)
def _add_rows_pair_by_pair(ds_t, n_q, n_k, i0, j0, q_positions, k_positions, r_h, dqp_t):
    """(1b') for a key-major tile spanning more than SPAN_MAX rows: ``dqp_t[:, i] += ds_t[j, i] r[row(i, j)]``."""
    n_rows = r_h.shape[0]
    for a in range(n_k):
        for c in range(n_q):
            row = _pair_row(q_positions, k_positions, i0 + c, j0 + a, n_rows)
            if 0 <= row < n_rows:
                for d in range(r_h.shape[1]):
                    dqp_t[d, c] += ds_t[a, c] * r_h[row, d]


@njit(cache=True)
def _record_missing_rows(s_t, n_q, n_k, b, h, i0, j0, q_positions, k_positions, n_rows, missing):
    """After masking a key-major tile: note, per query, the first unmasked key whose distance has no row."""
    _, _, complete = _tile_rows(q_positions, k_positions, i0, n_q, j0, n_k, n_rows)
    if complete:
        return
    for a in range(n_k):
        for c in range(n_q):
            row = _pair_row(q_positions, k_positions, i0 + c, j0 + a, n_rows)
            if s_t[a, c] != -np.inf and (row < 0 or row >= n_rows) and missing[b, h, i0 + c] < 0:
                missing[b, h, i0 + c] = j0 + a


@njit(cache=True)
def _dscore_tile(
    p_t, dcap, ds_t, g, n_q, n_k, b, h, i0, j0, k_tile, v_tile, qc_t, qp_t, dout_t, r_h, q_positions, k_positions,
    rows,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
    has_keep, keep, keep_strides, keep_scale,
):  # fmt: skip
    """Key-major tile of the keys [j0, j0 + n_k): P into ``p_t``, dscore (unscaled) into ``ds_t``."""
    # (1)-(4) Logits, and (5) P = exp(s - lse).
    np.dot(k_tile, qc_t, p_t[:n_k])  # (1a) (n_k, BQ) = k (q + u)^T
    _logits(
        p_t, dcap, g, True, n_q, n_k, b, h, i0, j0, qp_t, r_h, q_positions, k_positions,
        scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
    )  # fmt: skip
    tiles.probabilities(p_t, True, n_q, n_k, rows)
    # (7') dP = v dout^T; (6')-(5') dS; (2') times the soft-cap's derivative.
    np.dot(v_tile, dout_t, ds_t[:n_k])
    tiles.score_grad(ds_t, p_t, True, n_q, n_k, b, h, i0, j0, rows, has_keep, keep, keep_strides, keep_scale)
    tiles.softcap_grad(ds_t, dcap, True, n_q, n_k, softcap)


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(
    q_content, k, v, q_position, r, q_positions, k_positions,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1c)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    out, lse, missing,
):  # fmt: skip
    """out (B, Hq, Nq, Dv), lse (B, Hq, Nq) by the online softmax; parallel over (b, h, query block).

    ``missing[b, h, i]`` receives the first key j that query i may attend to
    but whose distance has no row of r (it stays -1 when there is none).
    """
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    n_rows = r.shape[1]
    dtype = q_content.dtype
    for item in prange(tiles.query_blocks(q_content)):
        b, h, kvh, i0, n_q = tiles.query_block(item, q_content, kv_heads)
        qc_t = tiles.transposed(q_content, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        qp_t = tiles.transposed(q_position, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        s_t, dcap, acc_t, pv_t, state = tiles.forward_buffers(value_dim, dtype)
        g = np.empty((SPAN_MAX, BLOCK_Q), dtype)  # position scores by row of r
        key_lo, key_hi = tiles.key_range(i0, i0 + n_q, offset, left, right, kv_len)
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            # (1a) Content term; (1b)-(4) position term, scale, soft-cap, bias, mask.
            np.dot(k[b, kvh, j0 : j0 + n_k], qc_t, s_t[:n_k])  # (n_k, BQ) = k (q + u)^T
            _logits(
                s_t, dcap, g, True, n_q, n_k, b, h, i0, j0, qp_t, r[h], q_positions, k_positions,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
            )  # fmt: skip
            _record_missing_rows(s_t, n_q, n_k, b, h, i0, j0, q_positions, k_positions, n_rows, missing)
            # (5)-(7) Online softmax, dropout, acc = alpha * acc + v^T p.
            tiles.attend_tile(
                s_t, n_q, n_k, b, h, i0, j0, v[b, kvh, j0 : j0 + n_k], state, acc_t, pv_t, has_keep, keep, keep_strides
            )
        tiles.finish_rows(acc_t, state, n_q, keep_scale, b, h, i0, out, lse)


# --------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _dq_kernel(
    q_content, k, v, q_position, r, q_positions, k_positions, dout, lse, delta, dlse,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1c)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    dq_content, dq_position,
):  # fmt: skip
    """d(q + u) and d(q + v_bias), (B, Hq, Nq, D) each; parallel over (b, h, query block).

    ``lse`` is the forward's, with +inf on fully masked rows.
    """
    kv_heads, kv_len, head_dim = k.shape[1], k.shape[2], q_content.shape[3]
    n_rows = r.shape[1]
    dtype = q_content.dtype
    for item in prange(tiles.query_blocks(q_content)):
        b, h, kvh, i0, n_q = tiles.query_block(item, q_content, kv_heads)
        r_h = r[h]
        qc_t = tiles.transposed(q_content, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        qp_t = tiles.transposed(q_position, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        dout_t = tiles.transposed(dout, b, h, i0, n_q, BLOCK_Q)  # (Dv, BQ)
        rows = tiles.backward_row_buffer(BLOCK_Q, dtype)
        tiles.load_rows(rows, lse, delta, dlse, b, h, i0, n_q)
        p_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits, then P; key-major
        dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)
        ds_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # dP, then dS, then dscore
        g = np.empty((SPAN_MAX, BLOCK_Q), dtype)
        dg = np.empty((SPAN_MAX, BLOCK_Q), dtype)  # dscore moved to the row of r each pair read
        dqc_t = np.zeros((head_dim, BLOCK_Q), dtype)
        dqp_t = np.zeros((head_dim, BLOCK_Q), dtype)
        tile = np.empty((head_dim, BLOCK_Q), dtype)

        key_lo, key_hi = tiles.key_range(i0, i0 + n_q, offset, left, right, kv_len)
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            k_tile = k[b, kvh, j0 : j0 + n_k]  # (n_k, D), a view
            _dscore_tile(
                p_t, dcap, ds_t, g, n_q, n_k, b, h, i0, j0, k_tile, v[b, kvh, j0 : j0 + n_k], qc_t, qp_t, dout_t,
                r_h, q_positions, k_positions, rows,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
                has_keep, keep, keep_strides, keep_scale,
            )  # fmt: skip
            # (1a') d(q + u)^T += k^T dscore  (scale applied once, below)
            np.dot(k_tile.T, ds_t[:n_k], tile)
            tiles.accumulate(dqc_t, tile)
            # (1b') d(q + v_bias)^T += r[lo:hi]^T dG, dG the dscore moved to each pair's row.
            lo, hi, _ = _tile_rows(q_positions, k_positions, i0, n_q, j0, n_k, n_rows)
            if hi - lo > SPAN_MAX:
                _add_rows_pair_by_pair(ds_t, n_q, n_k, i0, j0, q_positions, k_positions, r_h, dqp_t)
            elif hi > lo:
                dg[: hi - lo] = 0
                _scatter_to_rows(ds_t, n_q, n_k, i0, j0, q_positions, k_positions, n_rows, lo, hi, dg)
                np.dot(r_h[lo:hi].T, dg[: hi - lo], tile)
                tiles.accumulate(dqp_t, tile)

        tiles.write_rows(dq_content, b, h, i0, n_q, dqc_t, scale)
        tiles.write_rows(dq_position, b, h, i0, n_q, dqp_t, scale)


@njit(parallel=True, cache=True, fastmath=False)
def _dkv_kernel(
    q_content, k, v, q_position, r, q_positions, k_positions, dout, lse, delta, dlse,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1c)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    serial_batch, serial_heads, serial_blocks,
    dk, dv, dbias,
):  # fmt: skip
    """dk, dv (B, Hkv, Nk, ·), dbias (the bias's own shape, 4-D); parallel over (b, kv head, key block).

    Each work item sweeps the query heads of its GQA group and their query
    tiles; it walks the axes the bias is broadcast along itself
    (``serial_*``), so that every dbias entry has one owner.
    """
    batch, q_heads, q_len, head_dim = q_content.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    n_blocks = (kv_len + BLOCK_K - 1) // BLOCK_K
    dtype = q_content.dtype
    serial = (serial_batch, serial_heads, serial_blocks)
    items_b, items_h, items_k = tiles.key_block_items(batch, kv_heads, n_blocks, *serial)
    for item in prange(items_b * items_h * items_k):
        outer, item_k = tiles.block_order(item, items_k)
        b_lo, b_hi, h_lo, h_hi, k_lo, k_hi = tiles.item_ranges(
            outer // items_h, outer % items_h, item_k, batch, kv_heads, n_blocks, *serial
        )
        s, dcap, pz, ds, dk_tile, dv_tile, rows = tiles.pair_buffers(head_dim, value_dim, dtype)
        g = np.empty((SPAN_MAX, BLOCK_Q), dtype)
        for b in range(b_lo, b_hi):
            for kvh in range(h_lo, h_hi):
                for block in range(k_lo, k_hi):
                    j0, n_k, k_t, v_t, dk_t, dv_t = tiles.key_block(k, v, b, kvh, block)  # (D, BK), (Dv, BK)
                    query_lo, query_hi = tiles.query_range(j0, j0 + n_k, offset, left, right, q_len)
                    for h in range(kvh * group, (kvh + 1) * group):
                        for i0 in range(query_lo, query_hi, BLOCK_Q):
                            n_q = min(BLOCK_Q, query_hi - i0)
                            qc_tile = q_content[b, h, i0 : i0 + n_q]  # (n_q, D), a view
                            qp_t = tiles.transposed(q_position, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
                            dout_tile = dout[b, h, i0 : i0 + n_q]  # (n_q, Dv), a view
                            tiles.load_rows(rows, lse, delta, dlse, b, h, i0, n_q)
                            # (1)-(4) Logits; (7') dP = dout v^T.
                            np.dot(qc_tile, k_t, s[:n_q])  # (1a) (n_q, BK) = (q + u) k^T
                            _logits(
                                s, dcap, g, False, n_q, n_k, b, h, i0, j0, qp_t, r[h], q_positions, k_positions,
                                scale, softcap, has_bias, bias, bias_strides,
                                has_mask, mask, mask_strides, offset, left, right,
                            )  # fmt: skip
                            np.dot(dout_tile, v_t, ds[:n_q])
                            # (5)-(3') P, dv, dS, dbias; (2')-(1a') dk^T += (q + u)^T dscore.
                            tiles.pair_grads(
                                s, pz, ds, dv_t, dv_tile, dout_tile, n_q, n_k, b, h, i0, j0, rows,
                                has_bias, dbias, has_keep, keep, keep_strides, keep_scale,
                            )  # fmt: skip
                            tiles.pair_products(ds, dcap, dk_t, dk_tile, qc_tile, n_q, n_k, softcap)
                    tiles.write_rows(dk, b, kvh, j0, n_k, dk_t, scale)
                    tiles.write_rows(dv, b, kvh, j0, n_k, dv_t, 1)


@njit(parallel=True, cache=True, fastmath=False)
def _dr_kernel(
    q_content, k, v, q_position, r, q_positions, k_positions, dout, lse, delta, dlse,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1c)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    q_extremes, k_extremes,
    dr,
):  # fmt: skip
    """dr (Hq, R, D); parallel over (query head, block of BLOCK_R rows of r).

    A work item owns rows [t0, t1) of dr[h]. For every batch element it
    visits the (query block, key block) tiles whose distances reach those
    rows -- read off ``q_extremes`` and ``k_extremes``, the smallest and
    largest position of each block -- recomputes their dscore, and adds
    ``dscore_ij (q_i + v_bias)`` into the row each pair read.
    """
    batch, q_heads, q_len, head_dim = q_content.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    n_rows = r.shape[1]
    group = q_heads // kv_heads
    n_row_blocks = (n_rows + BLOCK_R - 1) // BLOCK_R
    dtype = q_content.dtype
    for item in prange(q_heads * n_row_blocks):
        h, row_block = tiles.block_order(item, n_row_blocks)
        kvh = h // group
        t0 = row_block * BLOCK_R
        t1 = min(t0 + BLOCK_R, n_rows)
        r_h = r[h]
        p_t = np.empty((BLOCK_K, BLOCK_Q), dtype)
        dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)
        ds_t = np.empty((BLOCK_K, BLOCK_Q), dtype)
        g = np.empty((SPAN_MAX, BLOCK_Q), dtype)
        dg = np.empty((BLOCK_R, BLOCK_Q), dtype)  # one query block's dscore, by row t0 + ...
        tile = np.empty((BLOCK_R, head_dim), dtype)
        dr_t = np.zeros((BLOCK_R, head_dim), dtype)
        rows = tiles.backward_row_buffer(BLOCK_Q, dtype)  # one query block's lse, delta, dlse
        for b in range(batch):
            for i0 in range(0, q_len, BLOCK_Q):
                n_q = min(BLOCK_Q, q_len - i0)
                q_low, q_high = q_extremes[i0 // BLOCK_Q, 0], q_extremes[i0 // BLOCK_Q, 1]
                key_lo, key_hi = tiles.key_range(i0, i0 + n_q, offset, left, right, kv_len)
                first_key_block = key_lo // BLOCK_K  # whole key blocks: their extremes are known
                reached = False
                for j0 in range(first_key_block * BLOCK_K, key_hi, BLOCK_K):
                    k_low, k_high = k_extremes[j0 // BLOCK_K, 0], k_extremes[j0 // BLOCK_K, 1]
                    lo, hi, _ = _row_span(q_low, q_high, k_low, k_high, n_rows)
                    if max(lo, t0) >= min(hi, t1):
                        continue  # no pair of this tile reads rows [t0, t1)
                    if not reached:
                        reached = True
                        qc_t = tiles.transposed(q_content, b, h, i0, n_q, BLOCK_Q)
                        qp_t = tiles.transposed(q_position, b, h, i0, n_q, BLOCK_Q)
                        dout_t = tiles.transposed(dout, b, h, i0, n_q, BLOCK_Q)
                        tiles.load_rows(rows, lse, delta, dlse, b, h, i0, n_q)
                        dg[:, :] = 0
                    n_k = min(BLOCK_K, kv_len - j0)
                    _dscore_tile(
                        p_t, dcap, ds_t, g, n_q, n_k, b, h, i0, j0, k[b, kvh, j0 : j0 + n_k],
                        v[b, kvh, j0 : j0 + n_k], qc_t, qp_t, dout_t, r_h, q_positions, k_positions,
                        rows,
                        scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
                        has_keep, keep, keep_strides, keep_scale,
                    )  # fmt: skip
                    # (1b') Each pair's dscore to the row it read, for rows in [t0, t1).
                    _scatter_to_rows(ds_t, n_q, n_k, i0, j0, q_positions, k_positions, n_rows, t0, t1, dg)
                if reached:
                    np.dot(dg, qp_t.T, tile)  # (BLOCK_R, D) = dG (q + v_bias)
                    tiles.accumulate(dr_t, tile)
        for t in range(t0, t1):
            for d in range(head_dim):
                dr[h, t, d] = scale * dr_t[t - t0, d]
