"""Shaw attention on CPU: tiled online-softmax kernels in Numba.

The same function as :mod:`refattn.position.shaw.reference`, with the same
names, parameters and step numbers (0)-(7), computed the way
:mod:`refattn.dense.numba` computes dense attention: read that module first.
Its small utilities are used unchanged (the vectorisable
``_exp_nonpositive``, the broadcast-stride form ``_flat`` of masks and
biases, the tile and block helpers); the three kernels below are the dense
kernels with the encoding added to every tile, and ``_logits_tile`` is the
dense step (1)-(4) with the relative key term added before the scale. No
array of size Nq x Nk is ever allocated.

Table rows a block reads
------------------------
Queries ``[i0, i0 + n_q)`` and keys ``[j0, j0 + n_k)`` read only the table rows

    lo = clip(min k_pos - max q_pos, -K, K) + K  ...  hi = clip(max k_pos - min q_pos, -K, K) + K

(``_row_span``): at most 2K+1 rows, and at most ``n_q + n_k - 1`` when the
positions are consecutive. Every relative quantity is held as a
(rows, queries) array over those rows only:

* **Keys, step (1).** Once per query block, ``qa = rel_k[lo:hi+1] q_blockᵀ``
  (rows, BQ). Each score tile ``q_i · k_j`` gets ``qa[r_ij - lo, i]`` added
  before ``_logits_tile`` scales it, so the relative term is inside the scale
  and the soft-cap, as in the reference.
* **Values, step (7).** Per tile, the weights ``p_ij`` (dropout's zeros
  included) are summed by relative index into ``w`` (the tile's rows, BQ), and
  ``acc = alpha * acc + vᵀ p + rel_vᵀ w``: the online-softmax rescale and the
  final ``keep_scale / l`` apply to both terms at once.

Backward
--------
As in dense, with ``P = exp(s - lse)`` recomputed tile by tile. Since ``out``
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
* ``_dkv_kernel`` is the dense one with the relative rows of each (key block,
  query tile) pair added to its scores and to ``dW``.

Memory beyond the dense kernels': (rows, BLOCK_Q) arrays per thread, rows at
most ``min(2K+1, span of the block's positions)``, and ``TABLE_CHUNKS``
partial tables over the rows any pair reads, ``min(2K+1, Nq + Nk - 1)`` for
consecutive positions, times D + Dv. So the backward's dq runs on at most
``TABLE_CHUNKS`` threads. Precision, tiles and threads are as in
:mod:`refattn.dense.numba`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ...core.checks import cotangent
from ...core.masks import query_offset
from ...core.results import Grads, Result
from ...dense.numba import (
    BLOCK_K,
    BLOCK_Q,
    _at,
    _block_order,
    _compute_dtype,
    _exp_nonpositive,
    _flat,
    _key_range,
    _query_range,
    _read_only,
    _softcap_slope,
    _transposed,
)
from .inputs import ShawInputs, check_shaw_inputs

#: Partial table gradients summed at the end of the backward (see the module docstring).
TABLE_CHUNKS = 16

# --------------------------------------------------------------------------
# Public functions: the same keyword parameters as reference.py.
# --------------------------------------------------------------------------


def shaw_attention(
    q,
    k,
    v,
    *,
    rel_k,
    rel_v,
    q_positions,
    k_positions,
    max_relative_position,
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
    """Shaw attention, tiled; see :func:`refattn.position.shaw.reference.shaw_attention`.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype:
        float32 for float32/float16/bfloat16 ``q``, float64 otherwise. ``aux``
        is empty: the (Nq, Nk) relative index is exactly what a kernel never forms.
    """
    x = check_shaw_inputs(
        q, k, v, rel_k=rel_k, rel_v=rel_v, q_positions=q_positions, k_positions=k_positions,
        max_relative_position=max_relative_position, mask=mask, bias=bias, causal=causal,
        causal_alignment=causal_alignment, window=window, scale=scale, softcap=softcap,
        dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    args = _KernelArgs.build(x, _compute_dtype(q), (q, k, v, rel_k, rel_v))
    out, lse = _run_forward(args)
    return Result(out=out, lse=lse, aux={})


def shaw_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    rel_k,
    rel_v,
    q_positions,
    k_positions,
    max_relative_position,
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
    """Gradients of :func:`shaw_attention`; see :func:`refattn.position.shaw.reference.shaw_attention_vjp`.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v``, ``rel_k``, ``rel_v`` and (when a bias was given)
        ``bias`` in its own shape, in the compute dtype.
    """
    x = check_shaw_inputs(
        q, k, v, rel_k=rel_k, rel_v=rel_v, q_positions=q_positions, k_positions=k_positions,
        max_relative_position=max_relative_position, mask=mask, bias=bias, causal=causal,
        causal_alignment=causal_alignment, window=window, scale=scale, softcap=softcap,
        dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    s = x.dense.shape
    dout = cotangent(dout, "dout", (s.batch, s.q_heads, s.q_len, s.value_dim))
    dlse = None if dlse is None else cotangent(dlse, "dlse", (s.batch, s.q_heads, s.q_len))
    dtype = _compute_dtype(q)
    args = _KernelArgs.build(x, dtype, (q, k, v, rel_k, rel_v))

    # The forward once more, for out (delta) and lse (to recompute P tile by tile).
    out, lse = _run_forward(args)
    dout = np.ascontiguousarray(dout, dtype=dtype)  # (B, Hq, Nq, Dv)
    dlse = np.zeros(lse.shape, dtype) if dlse is None else np.ascontiguousarray(dlse, dtype=dtype)
    delta = np.einsum("bhqe,bhqe->bhq", dout, out)  # (B, Hq, Nq): sum_j P_ij dW_ij
    lse_for_p = np.where(np.isneginf(lse), np.inf, lse).astype(dtype)  # P = exp(s - inf) = 0 on fully masked rows

    dq = np.empty(args.q.shape, dtype)
    lo, hi = args.rows_read()
    d_rel_k = np.zeros((TABLE_CHUNKS, hi - lo + 1, s.head_dim), dtype)  # rows lo..hi, one partial per chunk
    d_rel_v = np.zeros((TABLE_CHUNKS, hi - lo + 1, s.value_dim), dtype)
    _dq_kernel(
        args.q, args.k, args.v, dout, lse_for_p, delta, dlse, *args.encoding(), *args.logits(), *args.dropout(),
        dq, lo, d_rel_k, d_rel_v,
    )  # fmt: skip

    dk = np.empty(args.k.shape, dtype)
    dv = np.empty(args.v.shape, dtype)
    dbias = np.zeros(args.bias_own_shape, dtype)  # the bias's own shape, as 4-D
    _dkv_kernel(
        args.q, args.k, args.v, dout, lse_for_p, delta, dlse, *args.encoding(), *args.logits(), *args.dropout(),
        *args.serial_axes(), dk, dv, dbias,
    )  # fmt: skip

    grads = Grads(q=dq, k=dk, v=dv)
    grads["rel_k"] = np.zeros(args.rel_k.shape, dtype)  # rows that no pair reads stay 0
    grads["rel_k"][lo : hi + 1] = args.scale * d_rel_k.sum(axis=0)
    grads["rel_v"] = np.zeros(args.rel_v.shape, dtype)
    grads["rel_v"][lo : hi + 1] = d_rel_v.sum(axis=0)
    if x.dense.bias is not None:
        grads["bias"] = dbias.reshape(x.dense.bias.shape)
    return grads


# --------------------------------------------------------------------------
# What the kernels are given.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _KernelArgs:
    """Checked inputs in the form the kernels take them.

    The dense part is in refattn.dense.numba's form: ``mask``, ``bias`` and
    ``keep`` each a read-only flat array with the strides by which (b, h, i, j)
    reaches into it (0 along broadcast axes; a single element when absent,
    with its ``has_*`` flag False), and ``left``, ``right`` the window sides
    with causality folded in (``right <= 0``) and an unbounded side replaced by
    ``Nq + Nk``. One form whatever the shapes, so each kernel compiles once
    per dtype. Arrays are C-contiguous and read-only; floats in the compute dtype.
    """

    q: np.ndarray  # (B, Hq, Nq, D)
    k: np.ndarray  # (B, Hkv, Nk, D)
    v: np.ndarray  # (B, Hkv, Nk, Dv)
    rel_k: np.ndarray  # (2K+1, D)
    rel_v: np.ndarray  # (2K+1, Dv)
    q_positions: np.ndarray  # (Nq,), int64
    k_positions: np.ndarray  # (Nk,), int64
    clip: int  # K
    scale: np.floating
    softcap: np.floating
    has_bias: bool
    bias: np.ndarray  # flat
    bias_strides: tuple
    bias_own_shape: tuple  # the bias's shape, as 4-D
    has_mask: bool
    mask: np.ndarray  # flat, bool
    mask_strides: tuple
    offset: int
    left: int
    right: int
    has_keep: bool
    keep: np.ndarray  # flat, bool
    keep_strides: tuple
    keep_scale: np.floating

    @staticmethod
    def build(x: ShawInputs, dtype: np.dtype, given: tuple) -> "_KernelArgs":
        """From checked inputs ``x``; ``given`` are the caller's q, k, v, rel_k,
        rel_v, used as they are when already C-contiguous in ``dtype`` (no copy)."""
        d, s = x.dense, x.dense.shape
        real = dtype.type
        bias, bias_strides = _flat(d.bias, dtype)
        mask, mask_strides = _flat(d.mask, np.bool_)
        keep, keep_strides = _flat(d.dropout_keep, np.bool_)
        unbounded = s.q_len + s.kv_len
        left, right = unbounded, unbounded
        if d.window is not None:
            left = unbounded if d.window[0] is None else min(d.window[0], unbounded)
            right = unbounded if d.window[1] is None else min(d.window[1], unbounded)
        if d.causal:
            right = min(right, 0)
        int64 = np.dtype(np.int64)
        return _KernelArgs(
            q=_read_only(given[0], d.q, dtype),
            k=_read_only(given[1], d.k, dtype),
            v=_read_only(given[2], d.v, dtype),
            rel_k=_read_only(given[3], x.rel_k, dtype),
            rel_v=_read_only(given[4], x.rel_v, dtype),
            q_positions=_read_only(x.q_positions, x.q_positions, int64),
            k_positions=_read_only(x.k_positions, x.k_positions, int64),
            clip=x.max_relative_position,
            scale=real(d.scale),
            softcap=real(d.softcap),
            has_bias=d.bias is not None,
            bias=bias,
            bias_strides=bias_strides,
            bias_own_shape=(1, 1, 1, 1) if d.bias is None else (1,) * (4 - d.bias.ndim) + d.bias.shape,
            has_mask=d.mask is not None,
            mask=mask,
            mask_strides=mask_strides,
            offset=query_offset(s.q_len, s.kv_len, d.causal_alignment),
            left=left,
            right=right,
            has_keep=d.dropout_keep is not None,
            keep=keep,
            keep_strides=keep_strides,
            keep_scale=real(1.0 / (1.0 - d.dropout_p)),
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

    def logits(self) -> tuple:
        """Arguments of steps (1)-(4) besides the encoding, in the kernels' order."""
        return (self.scale, self.softcap, self.has_bias, self.bias, self.bias_strides,
                self.has_mask, self.mask, self.mask_strides, self.offset, self.left, self.right)  # fmt: skip

    def dropout(self) -> tuple:
        """Arguments of step (6)."""
        return (self.has_keep, self.keep, self.keep_strides, self.keep_scale)

    def serial_axes(self) -> tuple[bool, bool, bool]:
        """Which of batch, kv head, key block ``_dkv_kernel`` sweeps serially: the
        axes the bias is broadcast along, so that each dbias entry has one owner
        (as in refattn.dense.numba)."""
        if not self.has_bias:
            return (False, False, False)
        b, h, _, n = self.bias_own_shape
        return (b == 1, h == 1, n == 1)


def _run_forward(args: _KernelArgs) -> tuple[np.ndarray, np.ndarray]:
    batch, q_heads, q_len, _ = args.q.shape
    out = np.empty((batch, q_heads, q_len, args.v.shape[3]), args.q.dtype)
    lse = np.empty((batch, q_heads, q_len), args.q.dtype)
    _forward_kernel(args.q, args.k, args.v, *args.encoding(), *args.logits(), *args.dropout(), out, lse)
    return out, lse


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
    ``key_major`` orients ``t`` as in ``_logits_tile``.
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
def _logits_tile(
    t, dcap, key_major, n_q, n_k, b, h, i0, j0,
    qa_t, lo, q_pos, k_pos, clip,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
):  # fmt: skip
    """Steps (1)-(4) in place on a tile ``t`` of dot products ``q·k``.

    refattn.dense.numba's ``_logits_tile`` with the relative key term
    ``q_i · rel_k[r_ij] = qa_t[r_ij - lo, i - i0]`` added first, inside the
    scale. ``key_major``: ``t[r, c]`` is (query ``i0 + c``, key ``j0 + r``),
    else (query ``i0 + r``, key ``j0 + c``). ``n_q`` queries and ``n_k`` keys
    are real; padding columns become -inf, padding rows are not touched. With
    a soft-cap, ``dcap`` receives its derivative ``sech²(s / c)``.
    """
    neg_inf = -np.inf
    n_rows, n_cols = (n_k, n_q) if key_major else (n_q, n_k)
    # (1) Scaled scores: (q·k + q·rel_k[r]) * scale.
    _add_relative(t, qa_t, lo, key_major, n_q, n_k, i0, j0, q_pos, k_pos, clip)
    for r in range(n_rows):
        for c in range(t.shape[1]):
            t[r, c] *= scale
        # (2) Soft-capping c * tanh(s / c), before bias and mask.
        if softcap > 0:
            for c in range(n_cols):
                dcap[r, c] = _softcap_slope(t[r, c] / softcap)
                t[r, c] = softcap * math.tanh(t[r, c] / softcap)
        # (3) Additive bias, read through its broadcast view.
        if has_bias:
            for c in range(n_cols):
                i, j = (i0 + c, j0 + r) if key_major else (i0 + r, j0 + c)
                t[r, c] += bias[_at(bias_strides, b, h, i, j)]
        # (4) Mask, exactly -inf: by position (causal, window) an interval
        #     [lo, hi) of this row's columns, then the user mask.
        if key_major:
            j = j0 + r
            first, stop = j - right - offset - i0, j + left - offset - i0 + 1
        else:
            aligned = i0 + r + offset
            first, stop = aligned - left - j0, aligned + right - j0 + 1
        first = min(max(first, 0), n_cols)
        stop = max(min(stop, n_cols), first)
        for c in range(first):
            t[r, c] = neg_inf
        for c in range(stop, t.shape[1]):
            t[r, c] = neg_inf
        if has_mask:
            for c in range(first, stop):
                i, j = (i0 + c, j0 + r) if key_major else (i0 + r, j0 + c)
                if not mask[_at(mask_strides, b, h, i, j)]:
                    t[r, c] = neg_inf


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
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    n_blocks = (q_len + BLOCK_Q - 1) // BLOCK_Q
    dtype = q.dtype
    for item in prange(batch * q_heads * n_blocks):
        bh, block = _block_order(item, n_blocks)
        b, h = bh // q_heads, bh % q_heads
        kvh = h // group  # GQA: query head h reads kv head h // group
        i0 = block * BLOCK_Q
        n_q = min(BLOCK_Q, q_len - i0)

        q_t = _transposed(q, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        s_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits, then weights; key-major
        dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)  # unused by the forward
        acc_t = np.zeros((value_dim, BLOCK_Q), dtype)  # unnormalised out, transposed
        pv_t = np.empty((value_dim, BLOCK_Q), dtype)  # this tile's v^T p
        m = np.full(BLOCK_Q, -np.inf, dtype)  # running max
        l = np.zeros(BLOCK_Q, dtype)  # running sum of exp(s - m)
        shift = np.empty(BLOCK_Q, dtype)
        alpha = np.empty(BLOCK_Q, dtype)

        key_lo, key_hi = _key_range(i0, i0 + n_q, offset, left, right, kv_len)
        if key_hi > key_lo:
            lo, hi = _row_span(q_pos, i0, n_q, k_pos, key_lo, key_hi - key_lo, clip)
        else:
            lo, hi = 0, 0  # no key: the tile loop below does not run
        # (0)-(1) q · rel_k[r] for every row r this block reads: (rows, BQ).
        qa_t = _rows_dot(rel_k, lo, hi, q_t)
        w_all = np.empty((hi - lo + 1, BLOCK_Q), dtype)  # a tile's weights summed by row

        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            # (1)-(4) Logits of this tile: q·k + q·rel_k[r], then scale, cap, bias, mask.
            np.dot(k[b, kvh, j0 : j0 + n_k], q_t, s_t[:n_k])  # (n_k, BQ) = k q^T
            _logits_tile(
                s_t, dcap, True, n_q, n_k, b, h, i0, j0, qa_t, lo, q_pos, k_pos, clip,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
            )  # fmt: skip
            # (5) Online softmax: new maxima, rescale factors, exponentials, sums.
            for c in range(BLOCK_Q):
                shift[c] = m[c]
            for r in range(n_k):
                for c in range(BLOCK_Q):
                    shift[c] = max(shift[c], s_t[r, c])
            for c in range(BLOCK_Q):
                m_new = shift[c]
                if m_new == -np.inf:  # nothing allowed yet: shift by 0, never -inf - (-inf)
                    shift[c] = 0
                alpha[c] = _exp_nonpositive(m[c] - shift[c])
                m[c] = m_new
                l[c] *= alpha[c]
            for r in range(n_k):
                for c in range(BLOCK_Q):
                    p = _exp_nonpositive(s_t[r, c] - shift[c])
                    s_t[r, c] = p
                    l[c] += p
            # (6) Dropout: the keep-mask zeroes weights (1 / (1 - p) is applied at the end).
            if has_keep:
                for r in range(n_k):
                    for c in range(n_q):
                        if not keep[_at(keep_strides, b, h, i0 + c, j0 + r)]:
                            s_t[r, c] = 0
            # (7) acc = alpha * acc + v^T p + rel_v^T w, w the weights summed by table row.
            np.dot(v[b, kvh, j0 : j0 + n_k].T, s_t[:n_k], pv_t)  # (Dv, BQ)
            t_lo, t_hi = _row_span(q_pos, i0, n_q, k_pos, j0, n_k, clip)
            w_t = w_all[: t_hi - t_lo + 1]  # (the tile's rows, BQ)
            w_t[:, :] = 0
            _sum_by_row(w_t, s_t, t_lo, True, n_q, n_k, i0, j0, q_pos, k_pos, clip)
            for e in range(value_dim):
                for c in range(BLOCK_Q):
                    acc_t[e, c] = alpha[c] * acc_t[e, c] + pv_t[e, c]
            _add_rows_t_dot(acc_t, rel_v, t_lo, w_t)  # (Dv, BQ)

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
    batch, q_heads, q_len, _ = q.shape
    n_blocks = (q_len + BLOCK_Q - 1) // BLOCK_Q
    n_items = batch * q_heads * n_blocks
    n_chunks = d_rel_k.shape[0]
    for chunk in prange(n_chunks):
        for item in range(chunk, n_items, n_chunks):
            bh, block = _block_order(item, n_blocks)
            _dq_block(
                bh // q_heads, bh % q_heads, block * BLOCK_Q,
                q, k, v, dout, lse, delta, dlse,
                rel_k, rel_v, q_pos, k_pos, clip,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
                has_keep, keep, keep_strides, keep_scale,
                dq, table_lo, d_rel_k[chunk], d_rel_v[chunk],
            )  # fmt: skip


@njit(cache=True)
def _dq_block(
    b, h, i0,
    q, k, v, dout, lse, delta, dlse,
    rel_k, rel_v, q_pos, k_pos, clip,  # (0)
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (1)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    dq, table_lo, d_rel_k, d_rel_v,
):  # fmt: skip
    """dq of the query block starting at ``i0`` of head ``h``; adds its share into
    d_rel_k, d_rel_v (rows, ·), whose row 0 is table row ``table_lo``."""
    q_heads, q_len, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_len = k.shape[2]
    kvh = h // (q_heads // k.shape[1])
    n_q = min(BLOCK_Q, q_len - i0)
    dtype = q.dtype

    q_t = _transposed(q, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
    dout_t = _transposed(dout, b, h, i0, n_q, BLOCK_Q)  # (Dv, BQ)
    row_lse = np.full(BLOCK_Q, np.inf, dtype)  # padding queries: P = 0
    row_delta = np.zeros(BLOCK_Q, dtype)
    row_dlse = np.zeros(BLOCK_Q, dtype)
    for c in range(n_q):
        row_lse[c], row_delta[c], row_dlse[c] = lse[b, h, i0 + c], delta[b, h, i0 + c], dlse[b, h, i0 + c]
    p_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits, then P; key-major
    dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)
    ds_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # dW, then dS, then dscore
    dq_t = np.zeros((head_dim, BLOCK_Q), dtype)
    dq_tile = np.empty((head_dim, BLOCK_Q), dtype)  # this tile's k^T dscore

    key_lo, key_hi = _key_range(i0, i0 + n_q, offset, left, right, kv_len)
    if key_hi > key_lo:
        lo, hi = _row_span(q_pos, i0, n_q, k_pos, key_lo, key_hi - key_lo, clip)
    else:
        lo, hi = 0, 0  # no key: the tile loop below does not run
    qa_t = _rows_dot(rel_k, lo, hi, q_t)  # (rows, BQ): q · rel_k[r]
    da_t = _rows_dot(rel_v, lo, hi, dout_t)  # (rows, BQ): dout · rel_v[r]
    gk = np.zeros((hi - lo + 1, BLOCK_Q), dtype)  # dscore summed by table row
    gv = np.zeros((hi - lo + 1, BLOCK_Q), dtype)  # dropped weights summed by table row

    for j0 in range(key_lo, key_hi, BLOCK_K):
        n_k = min(BLOCK_K, key_hi - j0)
        k_tile = k[b, kvh, j0 : j0 + n_k]  # (n_k, D), a view
        # (1)-(4) Logits, and (5) P = exp(s - lse).
        np.dot(k_tile, q_t, p_t[:n_k])
        _logits_tile(
            p_t, dcap, True, n_q, n_k, b, h, i0, j0, qa_t, lo, q_pos, k_pos, clip,
            scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
        )  # fmt: skip
        for r in range(n_k):
            for c in range(BLOCK_Q):
                p_t[r, c] = _exp_nonpositive(p_t[r, c] - row_lse[c])
        # (7') dP = (v + rel_v[r]) dout^T; d rel_v gathers the dropped weights P z by row.
        np.dot(v[b, kvh, j0 : j0 + n_k], dout_t, ds_t[:n_k])
        _add_relative(ds_t, da_t, lo, True, n_q, n_k, i0, j0, q_pos, k_pos, clip)
        for r in range(n_k):  # z = keep_scale where kept (keep_scale = 1 without a keep-mask), else 0
            for c in range(n_q):
                if not has_keep or keep[_at(keep_strides, b, h, i0 + c, j0 + r)]:
                    gv[_row(q_pos[i0 + c], k_pos[j0 + r], clip) - lo, c] += p_t[r, c] * keep_scale
        # (6') dW = z * dP.
        if has_keep:
            for r in range(n_k):
                for c in range(n_q):
                    kept = keep[_at(keep_strides, b, h, i0 + c, j0 + r)]
                    ds_t[r, c] = ds_t[r, c] * keep_scale if kept else 0
        # (5') dS = P (dW - delta) + P dlse; (2') times the soft-cap's derivative.
        for r in range(n_k):
            for c in range(BLOCK_Q):
                ds_t[r, c] = p_t[r, c] * (ds_t[r, c] - row_delta[c]) + p_t[r, c] * row_dlse[c]
        if softcap > 0:
            for r in range(n_k):
                for c in range(BLOCK_Q):
                    ds_t[r, c] *= dcap[r, c]
        # (1') dq^T += k^T dscore; the rows' share is summed by row for later.
        np.dot(k_tile.T, ds_t[:n_k], dq_tile)
        for d in range(head_dim):
            for c in range(BLOCK_Q):
                dq_t[d, c] += dq_tile[d, c]
        _sum_by_row(gk, ds_t, lo, True, n_q, n_k, i0, j0, q_pos, k_pos, clip)

    # (1') dq^T += rel_k^T gk; (0') d rel_k += gk q, d rel_v += gv dout (scale applied by the caller).
    _add_rows_t_dot(dq_t, rel_k, lo, gk)
    _add_to_rows(d_rel_k, lo - table_lo, gk, q_t)
    _add_to_rows(d_rel_v, lo - table_lo, gv, dout_t)
    for c in range(n_q):
        for d in range(head_dim):
            dq[b, h, i0 + c, d] = scale * dq_t[d, c]


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

    As refattn.dense.numba's ``_dkv_kernel``, with the relative rows of each
    (key block, query tile) pair added to the scores (1) and to dP (7').
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    n_blocks = (kv_len + BLOCK_K - 1) // BLOCK_K
    dtype = q.dtype
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
        dk_tile = np.empty((head_dim, BLOCK_K), dtype)  # one query tile's q^T dscore
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
                            q_tile = q[b, h, i0 : i0 + n_q]  # (n_q, D), a view
                            dout_tile = dout[b, h, i0 : i0 + n_q]  # (n_q, Dv), a view
                            # (0) The table rows this pair reads: q · rel_k[r] and dout · rel_v[r], (rows, n_q).
                            lo, hi = _row_span(q_pos, i0, n_q, k_pos, j0, n_k, clip)
                            qa_t = _rows_dot(rel_k, lo, hi, q_tile.T)
                            da_t = _rows_dot(rel_v, lo, hi, dout_tile.T)
                            # (1)-(4) Logits, and (5) P = exp(s - lse), row by row.
                            np.dot(q_tile, k_t, s[:n_q])  # (n_q, BK) = q k^T
                            _logits_tile(
                                s, dcap, False, n_q, n_k, b, h, i0, j0, qa_t, lo, q_pos, k_pos, clip,
                                scale, softcap, has_bias, bias, bias_strides,
                                has_mask, mask, mask_strides, offset, left, right,
                            )  # fmt: skip
                            for r in range(n_q):
                                row_lse = lse[b, h, i0 + r]
                                for c in range(BLOCK_K):
                                    s[r, c] = _exp_nonpositive(s[r, c] - row_lse)
                            # (6) Dropped weights P * z; (7') dv^T += dout^T (P z).
                            for r in range(n_q):
                                for c in range(BLOCK_K):
                                    pz[r, c] = s[r, c]
                                if has_keep:
                                    for c in range(n_k):
                                        kept = keep[_at(keep_strides, b, h, i0 + r, j0 + c)]
                                        pz[r, c] = pz[r, c] * keep_scale if kept else 0
                            np.dot(dout_tile.T, pz[:n_q], dv_tile)
                            for e in range(value_dim):
                                for c in range(BLOCK_K):
                                    dv_t[e, c] += dv_tile[e, c]
                            # (7') dP = dout (v + rel_v[r])^T; (6') dW = z * dP.
                            np.dot(dout_tile, v_t, ds[:n_q])
                            _add_relative(ds, da_t, lo, False, n_q, n_k, i0, j0, q_pos, k_pos, clip)
                            if has_keep:
                                for r in range(n_q):
                                    for c in range(n_k):
                                        kept = keep[_at(keep_strides, b, h, i0 + r, j0 + c)]
                                        ds[r, c] = ds[r, c] * keep_scale if kept else 0
                            # (5') dS = P (dW - delta) + P dlse.
                            for r in range(n_q):
                                row_delta, row_dlse = delta[b, h, i0 + r], dlse[b, h, i0 + r]
                                for c in range(BLOCK_K):
                                    ds[r, c] = s[r, c] * (ds[r, c] - row_delta) + s[r, c] * row_dlse
                            # (3') dbias: dS summed over the bias's broadcast axes.
                            if has_bias:
                                bb = b if full_b else 0
                                bh = h if full_h else 0
                                for r in range(n_q):
                                    bi = i0 + r if full_q else 0
                                    for c in range(n_k):
                                        dbias[bb, bh, bi, j0 + c if full_k else 0] += ds[r, c]
                            # (2') Soft-cap derivative; (1') dk^T += q^T dscore.
                            if softcap > 0:
                                for r in range(n_q):
                                    for c in range(BLOCK_K):
                                        ds[r, c] *= dcap[r, c]
                            np.dot(q_tile.T, ds[:n_q], dk_tile)
                            for d in range(head_dim):
                                for c in range(BLOCK_K):
                                    dk_t[d, c] += dk_tile[d, c]

                    for c in range(n_k):
                        for d in range(head_dim):
                            dk[b, kvh, j0 + c, d] = scale * dk_t[d, c]
                        for e in range(value_dim):
                            dv[b, kvh, j0 + c, e] = dv_t[e, c]
