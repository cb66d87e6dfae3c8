"""Shaw attention on CPU: tiled online-softmax kernels in Numba.

The same function as :mod:`refattn.position.shaw.reference`, with the same
names, parameters and step numbers (0)-(7), computed by the tile library
:mod:`refattn.core.tiles` (read its docstring first): the dense steps are
the library's, and this module adds the encoding to every tile. No array of
size Nq x Nk is ever allocated.

Table rows a block reads
------------------------
Queries ``[i0, i0 + n_q)`` and keys ``[j0, j0 + n_k)`` read only the table rows

    lo = clip(min k_pos - max q_pos, -K, K) + K  ...  hi = clip(max k_pos - min q_pos, -K, K) + K

(``_row_span``): at most 2K+1 rows, and at most ``n_q + n_k - 1`` when the
positions are consecutive. Every relative quantity is held as a
(rows, queries) array over those rows only:

* **Keys, step (1).** Once per query block, ``qa = rel_k[lo:hi+1] q_blockᵀ``
  (rows, BQ). Each score tile ``q_i · k_j`` gets ``qa[r_ij - lo, i]`` added
  before :func:`refattn.core.tiles.logits_tile` scales it, so the relative
  term is inside the scale and the soft-cap, as in the reference.
* **Values, step (7).** Per tile, the weights ``p_ij`` (dropout's zeros
  included) are summed by relative index into ``w`` (the tile's rows, BQ), and
  ``acc = alpha * acc + vᵀ p + rel_vᵀ w``: the online-softmax rescale and the
  final ``keep_scale / l`` apply to both terms at once.

Backward
--------
As in the library, with ``P = exp(s - lse)`` recomputed tile by tile from
the forward's lse (``saved``, or the forward once more). Since ``out``
includes the value term, ``delta_i = dout_i · out_i`` is still
``sum_j P_ij dW_ij``, now with ``dW_ij = z_ij dout_i · (v_j + rel_v[r_ij])``;
``dout_i · rel_v[r]`` is formed once per block as ``rel_v[lo:hi+1] doutᵀ``
and gathered like ``qa``.

* ``_dq_kernel`` (per query block) also sums, by relative index,
  ``gk[r, i] = sum_{j: r_ij = r} dscore_ij`` and ``gv[r, i] = sum_{j: r_ij = r} P_ij z_ij``;
  then ``dq += scale · rel_kᵀ gk``, ``d rel_k += scale · gk q`` and
  ``d rel_v += gv dout`` (1'), (7'), (0'). Table gradients sum over every
  block of every head: the blocks are dealt round-robin to ``TABLE_CHUNKS``
  chunks run in parallel, each adding into its own partial table, and the
  partials are summed in chunk order. No atomics, and the same sums whatever
  the number of threads.
* ``_dkv_kernel`` (per key block) is the library's pair of
  :func:`~refattn.core.tiles.pair_grads` and
  :func:`~refattn.core.tiles.pair_products` with the relative rows of each
  (key block, query tile) pair added to its scores and to ``dP``.

Memory beyond the dense kernels': (rows, BLOCK_Q) arrays per thread, rows at
most ``min(2K+1, span of the block's positions)``, and ``TABLE_CHUNKS``
partial tables over the rows any pair reads, ``min(2K+1, Nq + Nk - 1)`` for
consecutive positions, times D + Dv. So the backward's dq runs on at most
``TABLE_CHUNKS`` threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ...core import tiles
from ...core.results import Cotangents, Grads, Result
from ...core.tiles import BLOCK_K, BLOCK_Q, TileArgs, compute_dtype, read_only
from .inputs import ShawInputs

#: Partial table gradients summed at the end of the backward (see the module docstring).
TABLE_CHUNKS = 16

# --------------------------------------------------------------------------
# The backend: forward and VJP over checked inputs (refattn/core/registry.py).
# --------------------------------------------------------------------------


def forward(x: ShawInputs) -> Result:
    """Steps (0)-(7), tiled: ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype
    (float32 for float32/float16/bfloat16 ``q``, float64 otherwise). ``aux`` is empty: the
    (Nq, Nk) relative index is exactly what a kernel never forms."""
    return _run_forward(_ShawArgs.build(x))


def vjp(x: ShawInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (7')-(0'), tiled: ``q``, ``k``, ``v``, ``rel_k``, ``rel_v`` and (with a bias)
    ``bias`` in its own shape, in the compute dtype.

    ``saved``, this backend's forward of the same inputs, spares running the forward again.
    """
    args = _ShawArgs.build(x)
    t = args.tiles
    dtype = t.q.dtype
    if not tiles.reusable(saved, dtype, cotangents.dout.shape):
        saved = _run_forward(args)
    per_row = tiles.backward_rows(cotangents.dout, cotangents.dlse, saved.out, saved.lse, dtype)

    dq = np.empty(t.q.shape, dtype)
    lo, hi = args.rows_read()
    d_rel_k = np.zeros((TABLE_CHUNKS, hi - lo + 1, t.q.shape[3]), dtype)  # rows lo..hi, one partial per chunk
    d_rel_v = np.zeros((TABLE_CHUNKS, hi - lo + 1, t.v.shape[3]), dtype)
    _dq_kernel(
        t.q, t.k, t.v, *per_row, *args.encoding(), *t.logits(), *t.dropout(), dq, lo, d_rel_k, d_rel_v
    )  # fmt: skip

    dk = np.empty(t.k.shape, dtype)
    dv = np.empty(t.v.shape, dtype)
    dbias = np.zeros(t.bias_own_shape, dtype)  # the bias's own shape, as 4-D
    _dkv_kernel(
        t.q, t.k, t.v, *per_row, *args.encoding(), *t.logits(), *t.dropout(), *t.serial_axes(), dk, dv, dbias
    )  # fmt: skip

    grads = Grads(q=dq, k=dk, v=dv, **t.bias_grad(dbias, x.dense))
    grads["rel_k"] = np.zeros(args.rel_k.shape, dtype)  # rows that no pair reads stay 0
    grads["rel_k"][lo : hi + 1] = t.scale * d_rel_k.sum(axis=0)
    grads["rel_v"] = np.zeros(args.rel_v.shape, dtype)
    grads["rel_v"][lo : hi + 1] = d_rel_v.sum(axis=0)
    return grads


# --------------------------------------------------------------------------
# What the kernels are given.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShawArgs:
    """The dense part as the library's :class:`~refattn.core.tiles.TileArgs`, and the
    encoding: tables in the compute dtype and positions as int64, read-only."""

    tiles: TileArgs
    rel_k: np.ndarray  # (2K+1, D)
    rel_v: np.ndarray  # (2K+1, Dv)
    q_positions: np.ndarray  # (Nq,), int64
    k_positions: np.ndarray  # (Nk,), int64
    clip: int  # K

    @staticmethod
    def build(x: ShawInputs) -> "_ShawArgs":
        dtype = compute_dtype(x.dense.q)
        int64 = np.dtype(np.int64)
        return _ShawArgs(
            tiles=TileArgs.build(x.dense, dtype, (x.dense.q, x.dense.k, x.dense.v)),
            rel_k=read_only(x.rel_k, x.rel_k, dtype),
            rel_v=read_only(x.rel_v, x.rel_v, dtype),
            q_positions=read_only(x.q_positions, x.q_positions, int64),
            k_positions=read_only(x.k_positions, x.k_positions, int64),
            clip=x.max_relative_position,
        )

    def rows_read(self) -> tuple[int, int]:
        """First and last table row that any (query, key) pair reads (``_row_span`` of everything)."""
        clip, q_positions, k_positions = self.clip, self.q_positions, self.k_positions
        lowest = min(max(int(k_positions.min()) - int(q_positions.max()), -clip), clip) + clip
        highest = min(max(int(k_positions.max()) - int(q_positions.min()), -clip), clip) + clip
        return lowest, highest

    def encoding(self) -> tuple:
        """Arguments of step (0), in the kernels' order."""
        return (self.rel_k, self.rel_v, self.q_positions, self.k_positions, self.clip)


def _run_forward(args: _ShawArgs) -> Result:
    t = args.tiles
    out, lse = tiles.forward_outputs(t.q, t.v.shape[3])
    _forward_kernel(t.q, t.k, t.v, *args.encoding(), *t.logits(), *t.dropout(), out, lse)
    return Result(out=out, lse=lse, aux={})


# --------------------------------------------------------------------------
# Step (0) on tiles: relative indices, the rows a block reads, gather, sum.
# --------------------------------------------------------------------------


@njit(cache=True)
def _row(q_position, k_position, clip):
    """Table row of one (query, key) pair: clip(k_pos - q_pos, -K, K) + K."""
    return min(max(k_position - q_position, -clip), clip) + clip


@njit(cache=True)
def _row_span(q_pos, i0, n_q, k_pos, j0, n_k, clip):
    """First and last table row read by queries [i0, i0 + n_q) and keys [j0, j0 + n_k) (both non-empty)."""
    q_min, q_max = q_pos[i0], q_pos[i0]
    for i in range(i0, i0 + n_q):
        q_min, q_max = min(q_min, q_pos[i]), max(q_max, q_pos[i])
    k_min, k_max = k_pos[j0], k_pos[j0]
    for j in range(j0, j0 + n_k):
        k_min, k_max = min(k_min, k_pos[j]), max(k_max, k_pos[j])
    return _row(q_max, k_min, clip), _row(q_min, k_max, clip)


@njit(cache=True)
def _add_relative(t, rel_t, lo, key_major, n_q, n_k, i0, j0, q_pos, k_pos, clip):
    """Gather: ``t[query i, key j] += rel_t[r_ij - lo, i - i0]`` on the tile's real entries.

    ``rel_t`` (rows, queries) holds, per table row from ``lo`` on, a dot
    product with each query's row (``q · rel_k[r]``, or ``dout · rel_v[r]``).
    ``key_major`` orients ``t`` as in :func:`refattn.core.tiles.logits_tile`.
    """
    if key_major:
        for r in range(n_k):
            for c in range(n_q):
                t[r, c] += rel_t[_row(q_pos[i0 + c], k_pos[j0 + r], clip) - lo, c]
    else:
        for r in range(n_q):
            for c in range(n_k):
                t[r, c] += rel_t[_row(q_pos[i0 + r], k_pos[j0 + c], clip) - lo, r]


@njit(cache=True)
def _sum_by_row(w, t, lo, key_major, n_q, n_k, i0, j0, q_pos, k_pos, clip):
    """Adjoint of the gather: ``w[r - lo, i - i0] += sum_{j: r_ij = r} t[query i, key j]``."""
    if key_major:
        for r in range(n_k):
            for c in range(n_q):
                w[_row(q_pos[i0 + c], k_pos[j0 + r], clip) - lo, c] += t[r, c]
    else:
        for r in range(n_q):
            for c in range(n_k):
                w[_row(q_pos[i0 + r], k_pos[j0 + c], clip) - lo, r] += t[r, c]


@njit(cache=True)
def _rows_dot(table, lo, hi, x_t):
    """``table[lo:hi+1] @ x_t``, (rows, n): each row's dot product with every column of ``x_t`` (D, n).

    Like every product below, it is taken BLOCK_K rows at a time, so that no
    single BLAS call is larger than the dense kernels' tile products (a larger
    one may start OpenBLAS threads inside Numba's, which then compete).
    """
    out = np.empty((hi - lo + 1, x_t.shape[1]), x_t.dtype)
    for r0 in range(lo, hi + 1, BLOCK_K):
        r1 = min(r0 + BLOCK_K, hi + 1)
        np.dot(table[r0:r1], x_t, out[r0 - lo : r1 - lo])
    return out


@njit(cache=True)
def _add_rows_t_dot(acc_t, table, lo, g):
    """``acc_t += table[lo:lo+rows].T @ g``: (X, n) plus the rows of ``table`` (., X) weighted by ``g`` (rows, n)."""
    for r0 in range(0, g.shape[0], BLOCK_K):
        r1 = min(r0 + BLOCK_K, g.shape[0])
        acc_t += np.dot(table[lo + r0 : lo + r1].T, g[r0:r1])


@njit(cache=True)
def _add_to_rows(d_table, lo, g, x_t):
    """``d_table[lo:lo+rows] += g @ x_t.T``: each row ``r`` gains ``sum_n g[r, n] x_t[:, n]``."""
    for r0 in range(0, g.shape[0], BLOCK_K):
        r1 = min(r0 + BLOCK_K, g.shape[0])
        d_table[lo + r0 : lo + r1] += np.dot(g[r0:r1], x_t.T)


@njit(cache=True)
def _block_rows(q_pos, i0, n_q, k_pos, key_lo, key_hi, clip):
    """:func:`_row_span` of a query block and its keys [key_lo, key_hi); (0, 0) without keys."""
    if key_hi > key_lo:
        return _row_span(q_pos, i0, n_q, k_pos, key_lo, key_hi - key_lo, clip)
    return 0, 0  # no key: the tile loop does not run


@njit(cache=True)
def _logits(
    t, dcap, key_major, n_q, n_k, b, h, i0, j0,
    qa_t, lo, q_pos, k_pos, clip,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
):  # fmt: skip
    """Steps (1)-(4) in place on a tile ``t`` of dot products ``q·k``: the relative
    key term ``q_i · rel_k[r_ij] = qa_t[r_ij - lo, i - i0]`` added first, inside the
    scale, then the library's :func:`~refattn.core.tiles.logits_tile`."""
    _add_relative(t, qa_t, lo, key_major, n_q, n_k, i0, j0, q_pos, k_pos, clip)
    tiles.logits_tile(
        t, dcap, key_major, n_q, n_k, b, h, i0, j0,
        scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
    )  # fmt: skip


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(
    q, k, v,
    rel_k, rel_v, q_pos, k_pos, clip,  # (0)
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
        lo, hi = _block_rows(q_pos, i0, n_q, k_pos, key_lo, key_hi, clip)
        qa_t = _rows_dot(rel_k, lo, hi, q_t)  # (0)-(1) q · rel_k[r] for every row r this block reads: (rows, BQ)
        w_all = np.empty((hi - lo + 1, BLOCK_Q), dtype)  # a tile's weights summed by row
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            # (1)-(4) Logits of this tile: q·k + q·rel_k[r], then scale, cap, bias, mask.
            np.dot(k[b, kvh, j0 : j0 + n_k], q_t, s_t[:n_k])  # (n_k, BQ) = k q^T
            _logits(
                s_t, dcap, True, n_q, n_k, b, h, i0, j0, qa_t, lo, q_pos, k_pos, clip,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
            )  # fmt: skip
            # (5)-(7) acc = alpha * acc + v^T p + rel_v^T w, w the dropped weights summed by table row.
            tiles.attend_tile(
                s_t, n_q, n_k, b, h, i0, j0, v[b, kvh, j0 : j0 + n_k], state, acc_t, pv_t, has_keep, keep, keep_strides
            )
            t_lo, t_hi = _row_span(q_pos, i0, n_q, k_pos, j0, n_k, clip)
            w_t = w_all[: t_hi - t_lo + 1]  # (the tile's rows, BQ)
            w_t[:, :] = 0
            _sum_by_row(w_t, s_t, t_lo, True, n_q, n_k, i0, j0, q_pos, k_pos, clip)
            _add_rows_t_dot(acc_t, rel_v, t_lo, w_t)  # (Dv, BQ)
        tiles.finish_rows(acc_t, state, n_q, keep_scale, b, h, i0, out, lse)


# --------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _dq_kernel(
    q, k, v, dout, lse, delta, dlse,
    rel_k, rel_v, q_pos, k_pos, clip,  # (0)
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    dq, table_lo, d_rel_k, d_rel_v,
):  # fmt: skip
    """dq (B, Hq, Nq, D) and the partial table gradients d_rel_k (TABLE_CHUNKS, rows, D)
    (without the factor scale) and d_rel_v (TABLE_CHUNKS, rows, Dv) of the table
    rows from ``table_lo`` on.

    Parallel over chunks; chunk ``c`` runs the (b, h, query block) items
    ``c, c + TABLE_CHUNKS, ...`` and adds into its own partial tables.
    ``lse`` is the forward's, with +inf on fully masked rows.
    """
    n_items = tiles.query_blocks(q)
    n_chunks = d_rel_k.shape[0]
    for chunk in prange(n_chunks):
        for item in range(chunk, n_items, n_chunks):
            b, h, kvh, i0, n_q = tiles.query_block(item, q, k.shape[1])
            _dq_block(
                b, h, kvh, i0, n_q,
                q, k, v, dout, lse, delta, dlse,
                rel_k, rel_v, q_pos, k_pos, clip,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
                has_keep, keep, keep_strides, keep_scale,
                dq, table_lo, d_rel_k[chunk], d_rel_v[chunk],
            )  # fmt: skip


@njit(cache=True)
def _dq_block(
    b, h, kvh, i0, n_q,
    q, k, v, dout, lse, delta, dlse,
    rel_k, rel_v, q_pos, k_pos, clip,  # (0)
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    dq, table_lo, d_rel_k, d_rel_v,
):  # fmt: skip
    """dq of the query block starting at ``i0`` of head ``h``; adds its share into
    d_rel_k, d_rel_v (rows, ·), whose row 0 is table row ``table_lo``."""
    kv_len, head_dim = k.shape[2], q.shape[3]
    dtype = q.dtype
    q_t = tiles.transposed(q, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
    dout_t = tiles.transposed(dout, b, h, i0, n_q, BLOCK_Q)  # (Dv, BQ)
    rows = tiles.backward_row_buffer(BLOCK_Q, dtype)
    tiles.load_rows(rows, lse, delta, dlse, b, h, i0, n_q)
    p_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits, then P; key-major
    dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)
    ds_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # dP, then dS, then dscore
    dq_t = np.zeros((head_dim, BLOCK_Q), dtype)
    dq_tile = np.empty((head_dim, BLOCK_Q), dtype)  # this tile's k^T dscore

    key_lo, key_hi = tiles.key_range(i0, i0 + n_q, offset, left, right, kv_len)
    lo, hi = _block_rows(q_pos, i0, n_q, k_pos, key_lo, key_hi, clip)
    qa_t = _rows_dot(rel_k, lo, hi, q_t)  # (rows, BQ): q · rel_k[r]
    da_t = _rows_dot(rel_v, lo, hi, dout_t)  # (rows, BQ): dout · rel_v[r]
    gk = np.zeros((hi - lo + 1, BLOCK_Q), dtype)  # dscore summed by table row
    gv = np.zeros((hi - lo + 1, BLOCK_Q), dtype)  # dropped weights summed by table row

    for j0 in range(key_lo, key_hi, BLOCK_K):
        n_k = min(BLOCK_K, key_hi - j0)
        k_tile = k[b, kvh, j0 : j0 + n_k]  # (n_k, D), a view
        # (1)-(4) Logits, and (5) P = exp(s - lse).
        np.dot(k_tile, q_t, p_t[:n_k])
        _logits(
            p_t, dcap, True, n_q, n_k, b, h, i0, j0, qa_t, lo, q_pos, k_pos, clip,
            scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
        )  # fmt: skip
        tiles.probabilities(p_t, True, n_q, n_k, rows)
        # (7') dP = (v + rel_v[r]) dout^T; d rel_v gathers the dropped weights P z by row.
        np.dot(v[b, kvh, j0 : j0 + n_k], dout_t, ds_t[:n_k])
        _add_relative(ds_t, da_t, lo, True, n_q, n_k, i0, j0, q_pos, k_pos, clip)
        for r in range(n_k):  # z = keep_scale where kept (keep_scale = 1 without a keep-mask), else 0
            for c in range(n_q):
                if not has_keep or keep[tiles.at(keep_strides, b, h, i0 + c, j0 + r)]:
                    gv[_row(q_pos[i0 + c], k_pos[j0 + r], clip) - lo, c] += p_t[r, c] * keep_scale
        # (6')-(5') dS; (2') times the soft-cap's derivative.
        tiles.score_grad(ds_t, p_t, True, n_q, n_k, b, h, i0, j0, rows, has_keep, keep, keep_strides, keep_scale)
        tiles.softcap_grad(ds_t, dcap, True, n_q, n_k, softcap)
        # (1') dq^T += k^T dscore; the rows' share is summed by row for later.
        np.dot(k_tile.T, ds_t[:n_k], dq_tile)
        tiles.accumulate(dq_t, dq_tile)
        _sum_by_row(gk, ds_t, lo, True, n_q, n_k, i0, j0, q_pos, k_pos, clip)

    # (1') dq^T += rel_k^T gk; (0') d rel_k += gk q, d rel_v += gv dout (scale applied by the caller).
    _add_rows_t_dot(dq_t, rel_k, lo, gk)
    _add_to_rows(d_rel_k, lo - table_lo, gk, q_t)
    _add_to_rows(d_rel_v, lo - table_lo, gv, dout_t)
    tiles.write_rows(dq, b, h, i0, n_q, dq_t, scale)


@njit(parallel=True, cache=True, fastmath=False)
def _dkv_kernel(
    q, k, v, dout, lse, delta, dlse,
    rel_k, rel_v, q_pos, k_pos, clip,  # (0)
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    serial_batch, serial_heads, serial_blocks,
    dk, dv, dbias,
):  # fmt: skip
    """dk, dv (B, Hkv, Nk, ·), dbias (the bias's own shape, 4-D); parallel over (b, kv head, key block).

    Each work item sweeps the query heads of its GQA group and their query
    tiles; it walks the axes the bias is broadcast along itself
    (``serial_*``), so that every dbias entry has one owner.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    n_blocks = (kv_len + BLOCK_K - 1) // BLOCK_K
    dtype = q.dtype
    serial = (serial_batch, serial_heads, serial_blocks)
    items_b, items_h, items_k = tiles.key_block_items(batch, kv_heads, n_blocks, *serial)
    for item in prange(items_b * items_h * items_k):
        outer, item_k = tiles.block_order(item, items_k)
        b_lo, b_hi, h_lo, h_hi, k_lo, k_hi = tiles.item_ranges(
            outer // items_h, outer % items_h, item_k, batch, kv_heads, n_blocks, *serial
        )
        s, dcap, pz, ds, dk_tile, dv_tile, rows = tiles.pair_buffers(head_dim, value_dim, dtype)
        for b in range(b_lo, b_hi):
            for kvh in range(h_lo, h_hi):
                for block in range(k_lo, k_hi):
                    j0, n_k, k_t, v_t, dk_t, dv_t = tiles.key_block(k, v, b, kvh, block)  # (D, BK), (Dv, BK)
                    query_lo, query_hi = tiles.query_range(j0, j0 + n_k, offset, left, right, q_len)
                    for h in range(kvh * group, (kvh + 1) * group):
                        for i0 in range(query_lo, query_hi, BLOCK_Q):
                            n_q = min(BLOCK_Q, query_hi - i0)
                            q_tile = q[b, h, i0 : i0 + n_q]  # (n_q, D), a view
                            dout_tile = dout[b, h, i0 : i0 + n_q]  # (n_q, Dv), a view
                            tiles.load_rows(rows, lse, delta, dlse, b, h, i0, n_q)
                            # (0) The table rows this pair reads: q · rel_k[r] and dout · rel_v[r], (rows, n_q).
                            lo, hi = _row_span(q_pos, i0, n_q, k_pos, j0, n_k, clip)
                            qa_t = _rows_dot(rel_k, lo, hi, q_tile.T)
                            da_t = _rows_dot(rel_v, lo, hi, dout_tile.T)
                            # (1)-(4) Logits; (7') dP = dout (v + rel_v[r])^T.
                            np.dot(q_tile, k_t, s[:n_q])  # (n_q, BK) = q k^T
                            _logits(
                                s, dcap, False, n_q, n_k, b, h, i0, j0, qa_t, lo, q_pos, k_pos, clip,
                                scale, softcap, has_bias, bias, bias_strides,
                                has_mask, mask, mask_strides, offset, left, right,
                            )  # fmt: skip
                            np.dot(dout_tile, v_t, ds[:n_q])
                            _add_relative(ds, da_t, lo, False, n_q, n_k, i0, j0, q_pos, k_pos, clip)
                            # (5)-(3') P, dv, dS, dbias; (2')-(1') dk^T += q^T dscore.
                            tiles.pair_grads(
                                s, pz, ds, dv_t, dv_tile, dout_tile, n_q, n_k, b, h, i0, j0, rows,
                                has_bias, dbias, has_keep, keep, keep_strides, keep_scale,
                            )  # fmt: skip
                            tiles.pair_products(ds, dcap, dk_t, dk_tile, q_tile, n_q, n_k, softcap)
                    tiles.write_rows(dk, b, kvh, j0, n_k, dk_t, scale)
                    tiles.write_rows(dv, b, kvh, j0, n_k, dv_t, 1)
