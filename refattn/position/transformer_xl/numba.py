"""Transformer-XL relative attention on CPU: tiled online-softmax kernels in Numba.

The same function as :mod:`refattn.position.transformer_xl.reference`, with
the same names, parameters and step numbers, computed the way
:mod:`refattn.dense.numba` computes dense attention. Read that module's
docstring first: the online softmax, the FlashAttention-2 backward, the tile
bounds from causality and windows, the precision rules and the ``exp`` are
the same here, and so are the small pieces, imported from it. No score-sized
array is ever allocated: memory is O(N), never O(Nq * Nk).

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
scale, soft-cap, bias, mask -- follow dense's ``_logits_tile`` line for line
(``_scores_tile``).

Backward
--------
With ``dscore = dS`` times the soft-cap's derivative, as in dense::

    d(q + u)_i      = scale * sum_j dscore_ij k_j              (1a')  -> dq; du sums it over b, i
    d(q + v_bias)_i = scale * sum_j dscore_ij r[row(i, j)]     (1b')  -> dq; dv_bias sums it over b, i
    dk_j            = scale * sum_i dscore_ij (q_i + u)        (1a')
    dr[h, t]        = scale * sum over b and the pairs with row(i, j) = t of dscore_ij (q_i + v_bias)   (1b')

Three kernels, none with atomics:

* ``_dq_kernel``, parallel over (batch, query head, query block) like
  dense's, gives the two query gradients separately; their sums over batch
  and queries are du and dv_bias.
* ``_dkv_kernel``, parallel over (batch, kv head, key block) like dense's:
  dk, dv and the user bias's gradient.
* ``_dr_kernel``, parallel over (query head, block of ``BLOCK_R`` rows of
  r): a work item owns its rows of dr and sweeps the (query block, key block)
  tiles whose distances reach them, recomputing the tile's ``dscore``. With
  consecutive positions a tile's distances meet one or two row blocks, so
  this costs one to two passes over the scores.

Every unmasked pair must have a row of ``r``. The forward kernel checks
each tile after masking and records, per query row, the first key that
breaks this; the caller then raises the reference's error
(:func:`~refattn.position.transformer_xl.inputs.missing_row`).

Precision: float64 inputs run in float64; float32, float16 and bfloat16 run
in float32, ``q + u`` and ``q + v_bias`` included (formed once, before the kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ...core.checks import cotangent
from ...core.results import Grads, Result
from ...dense.numba import (
    BLOCK_K,
    BLOCK_Q,
    _at,
    _block_order,
    _compute_dtype,
    _exp_nonpositive,
    _KernelArgs,
    _key_range,
    _query_range,
    _read_only,
    _softcap_slope,
    _transposed,
)
from .inputs import TransformerXLInputs, check_transformer_xl_inputs, missing_row

SPAN_MAX = BLOCK_Q + BLOCK_K - 1  # rows of r one tile of consecutive positions can read
BLOCK_R = 256  # rows of r per work item of the dr kernel

# --------------------------------------------------------------------------
# Public functions: the same keyword parameters as reference.py.
# --------------------------------------------------------------------------


def transformer_xl_attention(
    q,
    k,
    v,
    *,
    r,
    u,
    v_bias,
    q_positions,
    k_positions,
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
    """Transformer-XL attention, tiled; see :func:`refattn.position.transformer_xl.transformer_xl_attention`.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype:
        float32 for float32/float16/bfloat16 ``q``, float64 otherwise.
    """
    x = check_transformer_xl_inputs(
        q, k, v, r=r, u=u, v_bias=v_bias, q_positions=q_positions, k_positions=k_positions,
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    args = _XLArgs.build(x, _compute_dtype(q), (q, k, v))
    out, lse = _run_forward(args, x)
    return Result(out=out, lse=lse, aux={})


def transformer_xl_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    r,
    u,
    v_bias,
    q_positions,
    k_positions,
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
    """Gradients of :func:`transformer_xl_attention`; see the reference's ``transformer_xl_attention_vjp``.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v``, ``r``, ``u``, ``v_bias`` and (when a bias was
        given) ``bias`` in its own shape, in the compute dtype.
    """
    x = check_transformer_xl_inputs(
        q, k, v, r=r, u=u, v_bias=v_bias, q_positions=q_positions, k_positions=k_positions,
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    s = x.dense.shape
    dout = cotangent(dout, "dout", (s.batch, s.q_heads, s.q_len, s.value_dim))
    dlse = None if dlse is None else cotangent(dlse, "dlse", (s.batch, s.q_heads, s.q_len))
    dtype = _compute_dtype(q)
    args = _XLArgs.build(x, dtype, (q, k, v))

    # The forward once more, for out (delta) and lse (to recompute P tile by tile).
    out, lse = _run_forward(args, x)
    dout = np.ascontiguousarray(dout, dtype=dtype)  # (B, Hq, Nq, Dv)
    dlse = np.zeros(lse.shape, dtype) if dlse is None else np.ascontiguousarray(dlse, dtype=dtype)
    delta = np.einsum("bhqe,bhqe->bhq", dout, out)  # (B, Hq, Nq): sum_j P_ij dW_ij
    lse_for_p = np.where(np.isneginf(lse), np.inf, lse).astype(dtype)  # P = exp(s - inf) = 0 on fully masked rows
    per_row = (dout, lse_for_p, delta, dlse)

    dq_content = np.empty(args.q_content.shape, dtype)
    dq_position = np.empty(args.q_content.shape, dtype)
    _dq_kernel(*args.tiles(), *per_row, *args.logits(), *args.dropout(), dq_content, dq_position)

    dk = np.empty(args.dense.k.shape, dtype)
    dv = np.empty(args.dense.v.shape, dtype)
    dbias = np.zeros(args.dense.bias_own_shape, dtype)  # the bias's own shape, as 4-D
    serial = args.dense.serial_axes()
    _dkv_kernel(*args.tiles(), *per_row, *args.logits(), *args.dropout(), *serial, dk, dv, dbias)

    dr = np.empty(args.r.shape, dtype)
    _dr_kernel(*args.tiles(), *per_row, *args.logits(), *args.dropout(), *args.block_extremes(), dr)

    # q enters both terms; u and v_bias are added to every query of every batch element.
    grads = Grads(
        q=dq_content + dq_position,
        k=dk,
        v=dv,
        r=dr,
        u=dq_content.sum(axis=(0, 2)),
        v_bias=dq_position.sum(axis=(0, 2)),
    )
    if x.dense.bias is not None:
        grads["bias"] = dbias.reshape(x.dense.bias.shape)
    return grads


# --------------------------------------------------------------------------
# What the kernels are given.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _XLArgs:
    """Checked inputs in the form the kernels take them.

    ``dense`` holds k, v, the mask, bias and keep-mask (flat, with broadcast
    strides) and the causal/window bounds exactly as dense's kernels take
    them (:class:`refattn.dense.numba._KernelArgs`); the queries are replaced
    by the two shifted queries of steps (1a) and (1b).
    """

    dense: _KernelArgs
    q_content: np.ndarray  # (B, Hq, Nq, D): q + u, compute dtype
    q_position: np.ndarray  # (B, Hq, Nq, D): q + v_bias
    r: np.ndarray  # (Hq, R, D), read-only
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64

    @staticmethod
    def build(x: TransformerXLInputs, dtype: np.dtype, given: tuple) -> "_XLArgs":
        """From checked inputs ``x``; ``given`` are the caller's q, k, v (used without a copy when they can be)."""
        dense = _KernelArgs.build(x.dense, dtype, given)
        return _XLArgs(
            dense=dense,
            q_content=dense.q + np.asarray(x.u, dtype)[None, :, None, :],
            q_position=dense.q + np.asarray(x.v_bias, dtype)[None, :, None, :],
            r=_read_only(x.r, x.r, dtype),
            q_positions=x.q_positions,
            k_positions=x.k_positions,
        )

    def tiles(self) -> tuple:
        """The arrays every kernel reads tiles of, in the kernels' order."""
        return (self.q_content, self.dense.k, self.dense.v, self.q_position, self.r, self.q_positions, self.k_positions)

    def logits(self) -> tuple:
        """Arguments of steps (1c)-(4), in the kernels' order."""
        d = self.dense
        return (d.scale, d.softcap, d.has_bias, d.bias, d.bias_strides,
                d.has_mask, d.mask, d.mask_strides, d.offset, d.left, d.right)  # fmt: skip

    def dropout(self) -> tuple:
        """Arguments of step (6)."""
        d = self.dense
        return (d.has_keep, d.keep, d.keep_strides, d.keep_scale)

    def block_extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """Smallest and largest position of each query block and each key block, (n_blocks, 2) int64 each."""
        return _extremes(self.q_positions, BLOCK_Q), _extremes(self.k_positions, BLOCK_K)


def _extremes(positions: np.ndarray, block: int) -> np.ndarray:
    starts = np.arange(0, positions.shape[0], block)
    return np.stack([np.minimum.reduceat(positions, starts), np.maximum.reduceat(positions, starts)], axis=1)


def _run_forward(args: _XLArgs, x: TransformerXLInputs) -> tuple[np.ndarray, np.ndarray]:
    """out and lse by the forward kernel; raises if an unmasked pair had no row of r."""
    batch, q_heads, q_len, _ = args.q_content.shape
    dtype = args.q_content.dtype
    out = np.empty((batch, q_heads, q_len, args.dense.v.shape[3]), dtype)
    lse = np.empty((batch, q_heads, q_len), dtype)
    missing = np.full((batch, q_heads, q_len), -1, np.int64)  # per query row: a key without a row, or -1
    _forward_kernel(*args.tiles(), *args.logits(), *args.dropout(), out, lse, missing)
    if np.any(missing >= 0):
        b, h, i = np.argwhere(missing >= 0)[0]
        raise missing_row(x, int(i), int(missing[b, h, i]))
    return out, lse


# --------------------------------------------------------------------------
# Steps (1b)-(4) of one tile, and the adjoint of (1b).
# --------------------------------------------------------------------------


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
def _scores_tile(
    t, dcap, g, key_major, n_q, n_k, b, h, i0, j0, qp_t, r_h, q_positions, k_positions,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
):  # fmt: skip
    """Steps (1b)-(4) in place on a tile ``t`` that holds the content term (1a).

    ``key_major``: ``t[a, c]`` is (query ``i0 + c``, key ``j0 + a``), else
    (query ``i0 + a``, key ``j0 + c``). ``n_q`` queries and ``n_k`` keys are
    real; padding columns become -inf, padding rows are not touched. ``qp_t``
    is the (D, BLOCK_Q) transposed tile of q + v_bias, ``g`` a (SPAN_MAX,
    BLOCK_Q) buffer. With a soft-cap, ``dcap`` receives its derivative
    ``sech²(s / c)``. Steps (1c)-(4) are those of dense's ``_logits_tile``.
    """
    neg_inf = -np.inf
    _add_position_term(t, key_major, n_q, n_k, i0, j0, qp_t, r_h, q_positions, k_positions, g)
    n_rows, n_cols = (n_k, n_q) if key_major else (n_q, n_k)
    for a in range(n_rows):
        # (1c) Scaled scores: the scale multiplies both terms.
        for c in range(t.shape[1]):
            t[a, c] *= scale
        # (2) Soft-capping c * tanh(s / c) of the whole score, before bias and mask.
        if softcap > 0:
            for c in range(n_cols):
                dcap[a, c] = _softcap_slope(t[a, c] / softcap)
                t[a, c] = softcap * math.tanh(t[a, c] / softcap)
        # (3) The user's bias, read through its broadcast view.
        if has_bias:
            for c in range(n_cols):
                i, j = (i0 + c, j0 + a) if key_major else (i0 + a, j0 + c)
                t[a, c] += bias[_at(bias_strides, b, h, i, j)]
        # (4) Mask, exactly -inf. Position (causal, window): key j is allowed
        #     for query i iff i + offset - left <= j <= i + offset + right, an
        #     interval [lo, hi) of this row's columns.
        if key_major:
            j = j0 + a
            lo, hi = j - right - offset - i0, j + left - offset - i0 + 1
        else:
            aligned = i0 + a + offset
            lo, hi = aligned - left - j0, aligned + right - j0 + 1
        lo = min(max(lo, 0), n_cols)
        hi = max(min(hi, n_cols), lo)
        for c in range(lo):
            t[a, c] = neg_inf
        for c in range(hi, t.shape[1]):
            t[a, c] = neg_inf
        if has_mask:
            for c in range(lo, hi):
                i, j = (i0 + c, j0 + a) if key_major else (i0 + a, j0 + c)
                if not mask[_at(mask_strides, b, h, i, j)]:
                    t[a, c] = neg_inf


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
    row_lse, row_delta, row_dlse,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
    has_keep, keep, keep_strides, keep_scale,
):  # fmt: skip
    """Key-major tile of the keys [j0, j0 + n_k): P into ``p_t``, dscore (unscaled) into ``ds_t``."""
    # (1)-(4) Logits, and (5) P = exp(s - lse).
    np.dot(k_tile, qc_t, p_t[:n_k])  # (1a) (n_k, BQ) = k (q + u)^T
    _scores_tile(
        p_t, dcap, g, True, n_q, n_k, b, h, i0, j0, qp_t, r_h, q_positions, k_positions,
        scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
    )  # fmt: skip
    for a in range(n_k):
        for c in range(BLOCK_Q):
            p_t[a, c] = _exp_nonpositive(p_t[a, c] - row_lse[c])
    # (7') dP = v dout^T; (6') dW = z * dP.
    np.dot(v_tile, dout_t, ds_t[:n_k])
    if has_keep:
        for a in range(n_k):
            for c in range(n_q):
                kept = keep[_at(keep_strides, b, h, i0 + c, j0 + a)]
                ds_t[a, c] = ds_t[a, c] * keep_scale if kept else 0
    # (5') dS = P (dW - delta) + P dlse; (2') times the soft-cap's derivative.
    for a in range(n_k):
        for c in range(BLOCK_Q):
            ds_t[a, c] = p_t[a, c] * (ds_t[a, c] - row_delta[c]) + p_t[a, c] * row_dlse[c]
    if softcap > 0:
        for a in range(n_k):
            for c in range(BLOCK_Q):
                ds_t[a, c] *= dcap[a, c]


@njit(cache=True)
def _query_rows(lse, delta, dlse, b, h, i0, n_q):
    """lse (+inf on padding, so P = 0 there), delta and dlse of the queries [i0, i0 + n_q), padded to BLOCK_Q."""
    dtype = lse.dtype
    row_lse = np.full(BLOCK_Q, np.inf, dtype)
    row_delta = np.zeros(BLOCK_Q, dtype)
    row_dlse = np.zeros(BLOCK_Q, dtype)
    for c in range(n_q):
        row_lse[c], row_delta[c], row_dlse[c] = lse[b, h, i0 + c], delta[b, h, i0 + c], dlse[b, h, i0 + c]
    return row_lse, row_delta, row_dlse


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
    batch, q_heads, q_len, head_dim = q_content.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    n_rows = r.shape[1]
    group = q_heads // kv_heads
    n_blocks = (q_len + BLOCK_Q - 1) // BLOCK_Q
    dtype = q_content.dtype
    for item in prange(batch * q_heads * n_blocks):
        bh, block = _block_order(item, n_blocks)
        b, h = bh // q_heads, bh % q_heads
        kvh = h // group  # GQA: query head h reads kv head h // group
        i0 = block * BLOCK_Q
        n_q = min(BLOCK_Q, q_len - i0)

        qc_t = _transposed(q_content, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        qp_t = _transposed(q_position, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        s_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits, then weights; key-major
        dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)  # unused by the forward
        g = np.empty((SPAN_MAX, BLOCK_Q), dtype)  # position scores by row of r
        acc_t = np.zeros((value_dim, BLOCK_Q), dtype)  # unnormalised out, transposed
        pv_t = np.empty((value_dim, BLOCK_Q), dtype)  # this tile's v^T p
        m = np.full(BLOCK_Q, -np.inf, dtype)  # running max
        l = np.zeros(BLOCK_Q, dtype)  # running sum of exp(s - m)
        shift = np.empty(BLOCK_Q, dtype)
        alpha = np.empty(BLOCK_Q, dtype)

        key_lo, key_hi = _key_range(i0, i0 + n_q, offset, left, right, kv_len)
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            # (1a) Content term; (1b)-(4) position term, scale, soft-cap, bias, mask.
            np.dot(k[b, kvh, j0 : j0 + n_k], qc_t, s_t[:n_k])  # (n_k, BQ) = k (q + u)^T
            _scores_tile(
                s_t, dcap, g, True, n_q, n_k, b, h, i0, j0, qp_t, r[h], q_positions, k_positions,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
            )  # fmt: skip
            _record_missing_rows(s_t, n_q, n_k, b, h, i0, j0, q_positions, k_positions, n_rows, missing)
            # (5) Online softmax: new maxima, rescale factors, exponentials, sums.
            for c in range(BLOCK_Q):
                shift[c] = m[c]
            for a in range(n_k):
                for c in range(BLOCK_Q):
                    shift[c] = max(shift[c], s_t[a, c])
            for c in range(BLOCK_Q):
                m_new = shift[c]
                if m_new == -np.inf:  # nothing allowed yet: shift by 0, never -inf - (-inf)
                    shift[c] = 0
                alpha[c] = _exp_nonpositive(m[c] - shift[c])
                m[c] = m_new
                l[c] *= alpha[c]
            for a in range(n_k):
                for c in range(BLOCK_Q):
                    p = _exp_nonpositive(s_t[a, c] - shift[c])
                    s_t[a, c] = p
                    l[c] += p
            # (6) Dropout: the keep-mask zeroes weights (1 / (1 - p) is applied at the end).
            if has_keep:
                for a in range(n_k):
                    for c in range(n_q):
                        if not keep[_at(keep_strides, b, h, i0 + c, j0 + a)]:
                            s_t[a, c] = 0
            # (7) acc = alpha * acc + v^T p
            np.dot(v[b, kvh, j0 : j0 + n_k].T, s_t[:n_k], pv_t)  # (Dv, BQ)
            for e in range(value_dim):
                for c in range(BLOCK_Q):
                    acc_t[e, c] = alpha[c] * acc_t[e, c] + pv_t[e, c]

        # Normalise: out = acc / l * 1/(1-p), lse = m + log l; a fully masked row has l = 0.
        for c in range(n_q):
            i = i0 + c
            if l[c] > 0:
                norm = keep_scale / l[c]
                for e in range(value_dim):
                    out[b, h, i, e] = acc_t[e, c] * norm
                lse[b, h, i] = m[c] + math.log(l[c])
            else:
                for e in range(value_dim):
                    out[b, h, i, e] = 0
                lse[b, h, i] = -np.inf


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
    batch, q_heads, q_len, head_dim = q_content.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    n_rows = r.shape[1]
    group = q_heads // kv_heads
    n_blocks = (q_len + BLOCK_Q - 1) // BLOCK_Q
    dtype = q_content.dtype
    for item in prange(batch * q_heads * n_blocks):
        bh, block = _block_order(item, n_blocks)
        b, h = bh // q_heads, bh % q_heads
        kvh = h // group
        i0 = block * BLOCK_Q
        n_q = min(BLOCK_Q, q_len - i0)
        r_h = r[h]

        qc_t = _transposed(q_content, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        qp_t = _transposed(q_position, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        dout_t = _transposed(dout, b, h, i0, n_q, BLOCK_Q)  # (Dv, BQ)
        row_lse, row_delta, row_dlse = _query_rows(lse, delta, dlse, b, h, i0, n_q)
        p_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits, then P; key-major
        dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)
        ds_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # dW, then dS, then dscore
        g = np.empty((SPAN_MAX, BLOCK_Q), dtype)
        dg = np.empty((SPAN_MAX, BLOCK_Q), dtype)  # dscore moved to the row of r each pair read
        dqc_t = np.zeros((head_dim, BLOCK_Q), dtype)
        dqp_t = np.zeros((head_dim, BLOCK_Q), dtype)
        tile = np.empty((head_dim, BLOCK_Q), dtype)

        key_lo, key_hi = _key_range(i0, i0 + n_q, offset, left, right, kv_len)
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            k_tile = k[b, kvh, j0 : j0 + n_k]  # (n_k, D), a view
            _dscore_tile(
                p_t, dcap, ds_t, g, n_q, n_k, b, h, i0, j0, k_tile, v[b, kvh, j0 : j0 + n_k], qc_t, qp_t, dout_t,
                r_h, q_positions, k_positions, row_lse, row_delta, row_dlse,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
                has_keep, keep, keep_strides, keep_scale,
            )  # fmt: skip
            # (1a') d(q + u)^T += k^T dscore  (scale applied once, below)
            np.dot(k_tile.T, ds_t[:n_k], tile)
            for d in range(head_dim):
                for c in range(BLOCK_Q):
                    dqc_t[d, c] += tile[d, c]
            # (1b') d(q + v_bias)^T += r[lo:hi]^T dG, dG the dscore moved to each pair's row.
            lo, hi, _ = _tile_rows(q_positions, k_positions, i0, n_q, j0, n_k, n_rows)
            if hi - lo > SPAN_MAX:
                _add_rows_pair_by_pair(ds_t, n_q, n_k, i0, j0, q_positions, k_positions, r_h, dqp_t)
            elif hi > lo:
                dg[: hi - lo] = 0
                _scatter_to_rows(ds_t, n_q, n_k, i0, j0, q_positions, k_positions, n_rows, lo, hi, dg)
                np.dot(r_h[lo:hi].T, dg[: hi - lo], tile)
                for d in range(head_dim):
                    for c in range(BLOCK_Q):
                        dqp_t[d, c] += tile[d, c]

        for c in range(n_q):
            for d in range(head_dim):
                dq_content[b, h, i0 + c, d] = scale * dqc_t[d, c]
                dq_position[b, h, i0 + c, d] = scale * dqp_t[d, c]


@njit(parallel=True, cache=True, fastmath=False)
def _dkv_kernel(
    q_content, k, v, q_position, r, q_positions, k_positions, dout, lse, delta, dlse,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1c)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    serial_batch, serial_heads, serial_blocks,
    dk, dv, dbias,
):  # fmt: skip
    """dk, dv (B, Hkv, Nk, ·), dbias (the bias's own shape, 4-D); parallel over (b, kv head, key block).

    Dense's ``_dkv_kernel`` with the scores of steps (1a)-(1b); see there for
    the sweep over a GQA group and the serial axes that keep dbias race-free.
    """
    batch, q_heads, q_len, head_dim = q_content.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    n_blocks = (kv_len + BLOCK_K - 1) // BLOCK_K
    dtype = q_content.dtype
    items_b = 1 if serial_batch else batch
    items_h = 1 if serial_heads else kv_heads
    items_k = 1 if serial_blocks else n_blocks
    full_b, full_h, full_q, full_k = dbias.shape[0] > 1, dbias.shape[1] > 1, dbias.shape[2] > 1, dbias.shape[3] > 1
    for item in prange(items_b * items_h * items_k):
        outer, item_k = _block_order(item, items_k)
        item_b, item_h = outer // items_h, outer % items_h
        s = np.empty((BLOCK_Q, BLOCK_K), dtype)  # logits, then P; query-major
        dcap = np.empty((BLOCK_Q, BLOCK_K), dtype)
        pz = np.empty((BLOCK_Q, BLOCK_K), dtype)  # dropped weights P * z
        ds = np.empty((BLOCK_Q, BLOCK_K), dtype)  # dW, then dS, then dscore
        g = np.empty((SPAN_MAX, BLOCK_Q), dtype)
        dk_tile = np.empty((head_dim, BLOCK_K), dtype)  # one query tile's (q + u)^T dscore
        dv_tile = np.empty((value_dim, BLOCK_K), dtype)  # one query tile's dout^T (P z)
        b_lo, b_hi = (0, batch) if serial_batch else (item_b, item_b + 1)
        h_lo, h_hi = (0, kv_heads) if serial_heads else (item_h, item_h + 1)
        k_lo, k_hi = (0, n_blocks) if serial_blocks else (item_k, item_k + 1)
        for b in range(b_lo, b_hi):
            for kvh in range(h_lo, h_hi):
                for block in range(k_lo, k_hi):
                    j0 = block * BLOCK_K
                    n_k = min(BLOCK_K, kv_len - j0)
                    k_t = _transposed(k, b, kvh, j0, n_k, BLOCK_K)  # (D, BK)
                    v_t = _transposed(v, b, kvh, j0, n_k, BLOCK_K)  # (Dv, BK)
                    dk_t = np.zeros((head_dim, BLOCK_K), dtype)
                    dv_t = np.zeros((value_dim, BLOCK_K), dtype)
                    query_lo, query_hi = _query_range(j0, j0 + n_k, offset, left, right, q_len)
                    for h in range(kvh * group, (kvh + 1) * group):
                        for i0 in range(query_lo, query_hi, BLOCK_Q):
                            n_q = min(BLOCK_Q, query_hi - i0)
                            qc_tile = q_content[b, h, i0 : i0 + n_q]  # (n_q, D), a view
                            qp_t = _transposed(q_position, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
                            dout_tile = dout[b, h, i0 : i0 + n_q]  # (n_q, Dv), a view
                            # (1)-(4) Logits, and (5) P = exp(s - lse), row by row.
                            np.dot(qc_tile, k_t, s[:n_q])  # (1a) (n_q, BK) = (q + u) k^T
                            _scores_tile(
                                s, dcap, g, False, n_q, n_k, b, h, i0, j0, qp_t, r[h], q_positions, k_positions,
                                scale, softcap, has_bias, bias, bias_strides,
                                has_mask, mask, mask_strides, offset, left, right,
                            )  # fmt: skip
                            for a in range(n_q):
                                row_lse = lse[b, h, i0 + a]
                                for c in range(BLOCK_K):
                                    s[a, c] = _exp_nonpositive(s[a, c] - row_lse)
                            # (6) Dropped weights P * z; (7') dv^T += dout^T (P z).
                            for a in range(n_q):
                                for c in range(BLOCK_K):
                                    pz[a, c] = s[a, c]
                                if has_keep:
                                    for c in range(n_k):
                                        kept = keep[_at(keep_strides, b, h, i0 + a, j0 + c)]
                                        pz[a, c] = pz[a, c] * keep_scale if kept else 0
                            np.dot(dout_tile.T, pz[:n_q], dv_tile)
                            for e in range(value_dim):
                                for c in range(BLOCK_K):
                                    dv_t[e, c] += dv_tile[e, c]
                            # (7') dP = dout v^T; (6') dW = z * dP.
                            np.dot(dout_tile, v_t, ds[:n_q])
                            if has_keep:
                                for a in range(n_q):
                                    for c in range(n_k):
                                        kept = keep[_at(keep_strides, b, h, i0 + a, j0 + c)]
                                        ds[a, c] = ds[a, c] * keep_scale if kept else 0
                            # (5') dS = P (dW - delta) + P dlse.
                            for a in range(n_q):
                                row_delta, row_dlse = delta[b, h, i0 + a], dlse[b, h, i0 + a]
                                for c in range(BLOCK_K):
                                    ds[a, c] = s[a, c] * (ds[a, c] - row_delta) + s[a, c] * row_dlse
                            # (3') dbias: dS summed over the bias's broadcast axes.
                            if has_bias:
                                bb = b if full_b else 0
                                bh = h if full_h else 0
                                for a in range(n_q):
                                    bi = i0 + a if full_q else 0
                                    for c in range(n_k):
                                        dbias[bb, bh, bi, j0 + c if full_k else 0] += ds[a, c]
                            # (2') Soft-cap derivative; (1a') dk^T += (q + u)^T dscore.
                            if softcap > 0:
                                for a in range(n_q):
                                    for c in range(BLOCK_K):
                                        ds[a, c] *= dcap[a, c]
                            np.dot(qc_tile.T, ds[:n_q], dk_tile)
                            for d in range(head_dim):
                                for c in range(BLOCK_K):
                                    dk_t[d, c] += dk_tile[d, c]

                    for c in range(n_k):
                        for d in range(head_dim):
                            dk[b, kvh, j0 + c, d] = scale * dk_t[d, c]
                        for e in range(value_dim):
                            dv[b, kvh, j0 + c, e] = dv_t[e, c]


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
        h, row_block = _block_order(item, n_row_blocks)
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
        for b in range(batch):
            for i0 in range(0, q_len, BLOCK_Q):
                n_q = min(BLOCK_Q, q_len - i0)
                q_low, q_high = q_extremes[i0 // BLOCK_Q, 0], q_extremes[i0 // BLOCK_Q, 1]
                key_lo, key_hi = _key_range(i0, i0 + n_q, offset, left, right, kv_len)
                first_key_block = key_lo // BLOCK_K  # whole key blocks: their extremes are known
                reached = False
                for j0 in range(first_key_block * BLOCK_K, key_hi, BLOCK_K):
                    k_low, k_high = k_extremes[j0 // BLOCK_K, 0], k_extremes[j0 // BLOCK_K, 1]
                    lo, hi, _ = _row_span(q_low, q_high, k_low, k_high, n_rows)
                    if max(lo, t0) >= min(hi, t1):
                        continue  # no pair of this tile reads rows [t0, t1)
                    if not reached:
                        reached = True
                        qc_t = _transposed(q_content, b, h, i0, n_q, BLOCK_Q)
                        qp_t = _transposed(q_position, b, h, i0, n_q, BLOCK_Q)
                        dout_t = _transposed(dout, b, h, i0, n_q, BLOCK_Q)
                        row_lse, row_delta, row_dlse = _query_rows(lse, delta, dlse, b, h, i0, n_q)
                        dg[:, :] = 0
                    n_k = min(BLOCK_K, kv_len - j0)
                    _dscore_tile(
                        p_t, dcap, ds_t, g, n_q, n_k, b, h, i0, j0, k[b, kvh, j0 : j0 + n_k],
                        v[b, kvh, j0 : j0 + n_k], qc_t, qp_t, dout_t, r_h, q_positions, k_positions,
                        row_lse, row_delta, row_dlse,
                        scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
                        has_keep, keep, keep_strides, keep_scale,
                    )  # fmt: skip
                    # (1b') Each pair's dscore to the row it read, for rows in [t0, t1).
                    _scatter_to_rows(ds_t, n_q, n_k, i0, j0, q_positions, k_positions, n_rows, t0, t1, dg)
                if reached:
                    np.dot(dg, qp_t.T, tile)  # (BLOCK_R, D) = dG (q + v_bias)
                    for t in range(t1 - t0):
                        for d in range(head_dim):
                            dr_t[t, d] += tile[t, d]
        for t in range(t0, t1):
            for d in range(head_dim):
                dr[h, t, d] = scale * dr_t[t - t0, d]
