"""The Numba kernel every mechanism of this family runs: attention over a key list per query block.

A pattern is given as, for each query block ``t`` (queries ``t * block ...
t * block + block - 1``), a list of key indices ``keys[.., t, e]`` (``-1``
ends the list) with a flag ``banded[.., t, e]``. Query ``i`` attends to
entry ``e`` of its block's list unless the entry is banded and the key is
outside query i's band: ``j < i - left`` or ``j > i + right`` (a side
``< 0`` is unbounded), or ``j > i`` when ``causal``. A key index ``>= Nk``
is a zero key (score 0, value 0: what a library that pads with zeros and
forgets to mask computes). An entry listed twice counts twice (HF BigBird's
repeated blocks); a pattern that must count a key once lists it once. With
``self_score`` finite, the score of key ``j == i`` is that constant (shared
query-key attention's self score) and passes no gradient to q or k.

Lists have a leading batch axis of 1 or B and a head axis of 1 or Hq, so a
pattern shared by every head (Longformer, local) costs one list, and
BigBird's per-head random blocks one per head. Memory is O(N * list
width / block) for the lists, O(N * D) for everything else: no (N, N)
array exists.

A query block's listed keys and values are gathered into one tile
(width x D), so its scores, weights and products are BLAS products
(``np.dot``) of a (block x D) and a (width x D) tile: the whole list is one
tile, so the softmax needs no online rescaling. The backward recomputes the
weights from the saved lse (FlashAttention-2's ``dS = P * (dP - delta +
dlse)`` with ``delta = dout . out``) and scatters the gathered dk and dv back
to their keys. Both run in parallel over (batch, query head); the backward
accumulates dk and dv per query head and sums each GQA group at the end, so
no two threads write the same element. The products run on the calling
Numba thread; with tiles above 64 rows OpenBLAS may start threads of its own
inside Numba's, so set ``OPENBLAS_NUM_THREADS=1`` (as
refattn/routing/numba.py says for its tiles).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..core.shapes import sum_kv_heads


def attend(q, k, v, keys, banded, *, block, scale, left=-1, right=-1, causal=False, self_score=math.nan):
    """Forward over the pattern; returns ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in q's dtype."""
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    out = np.zeros(q.shape[:3] + (v.shape[3],), q.dtype)
    lse = np.full(q.shape[:3], -np.inf, q.dtype)
    _forward(q, k, v, keys, banded, block, q.dtype.type(scale), left, right, causal, q.dtype.type(self_score), out, lse)
    return out, lse


def attend_vjp(q, k, v, keys, banded, out, lse, dout, dlse, *, block, scale, left=-1, right=-1, causal=False,
               self_score=math.nan):  # fmt: skip
    """Gradients ``dq`` (B, Hq, Nq, D), ``dk`` (B, Hkv, Nk, D), ``dv`` (B, Hkv, Nk, Dv) in q's dtype."""
    q, k, v, out, dout = (np.ascontiguousarray(x, q.dtype) for x in (q, k, v, out, dout))
    dtype = q.dtype
    dq = np.zeros(q.shape, dtype)
    dk = np.zeros(q.shape[:2] + k.shape[2:], dtype)  # per query head, summed below
    dv = np.zeros(q.shape[:2] + v.shape[2:], dtype)
    dlse = np.zeros(lse.shape, dtype) if dlse is None else dlse.astype(dtype, copy=False)
    _backward(q, k, v, keys, banded, block, dtype.type(scale), left, right, causal, dtype.type(self_score), out,
              lse.astype(dtype, copy=False), dout, dlse, dq, dk, dv)  # fmt: skip
    group = q.shape[1] // k.shape[1]
    return dq, sum_kv_heads(dk, group), sum_kv_heads(dv, group)


@njit(cache=True, inline="always")
def _work_item(item, q_heads, kv_heads, keys):
    """Batch b, query head h, its kv head g, and the batch and head index into the key lists (1 or B, 1 or Hq)."""
    b, h = item // q_heads, item % q_heads
    return b, h, h // (q_heads // kv_heads), min(b, keys.shape[0] - 1), min(h, keys.shape[1] - 1)


@njit(cache=True, inline="always")
def _allowed(i, j, banded, left, right, causal):
    """Whether query i attends to key j of its list (step: the pattern)."""
    if not banded:
        return True
    if causal and j > i:
        return False
    if left >= 0 and j < i - left:
        return False
    return not (right >= 0 and j > i + right)


@njit(cache=True)
def _gather(k, v, keys, lb, lh, t, b, g, kk, vv):
    """Copy block t's listed keys and values into kk (W, D), vv (W, Dv); zero rows for zero keys. Returns the count."""
    count = 0
    for e in range(keys.shape[3]):
        j = keys[lb, lh, t, e]
        if j < 0:
            break
        if j < k.shape[2]:
            kk[e] = k[b, g, j]
            vv[e] = v[b, g, j]
        else:
            kk[e] = 0.0
            vv[e] = 0.0
        count += 1
    return count


@njit(cache=True)
def _tile_logits(q_rows, kk, count, i0, keys, banded, lb, lh, t, scale, left, right, causal, self_score):
    """(rows, count) logits of one query block: ``scale q kᵀ``, -inf outside the pattern, the self score on j == i.

    Also returns which entries carry a constant (the self score), which pass no gradient to q or k.
    """
    logits = scale * np.dot(q_rows, kk[:count].T)  # (rows, count)
    constant = np.zeros(logits.shape, dtype=np.bool_)
    for r in range(logits.shape[0]):
        i = i0 + r
        for e in range(count):
            j = keys[lb, lh, t, e]
            if not _allowed(i, j, banded[lb, lh, t, e], left, right, causal):
                logits[r, e] = -np.inf
            elif j == i and not math.isnan(self_score):
                logits[r, e] = self_score
                constant[r, e] = True
    return logits, constant


@njit(cache=True, parallel=True)
def _forward(q, k, v, keys, banded, block, scale, left, right, causal, self_score, out, lse):
    batch, q_heads, q_len = q.shape[0], q.shape[1], q.shape[2]
    for item in prange(batch * q_heads):
        b, h, g, lb, lh = _work_item(item, q_heads, k.shape[1], keys)
        kk = np.zeros((keys.shape[3], k.shape[3]), q.dtype)
        vv = np.zeros((keys.shape[3], v.shape[3]), q.dtype)
        for t in range(keys.shape[2]):
            i0, i1 = t * block, min((t + 1) * block, q_len)
            count = _gather(k, v, keys, lb, lh, t, b, g, kk, vv)
            if i0 >= i1 or count == 0:
                continue
            logits, _ = _tile_logits(np.ascontiguousarray(q[b, h, i0:i1]), kk, count, i0, keys, banded, lb, lh, t,
                                     scale, left, right, causal, self_score)  # fmt: skip
            # Softmax of each row over the block's keys (the whole list is one tile: no online rescaling).
            row_sum = np.zeros(i1 - i0, q.dtype)
            for r in range(i1 - i0):
                top = logits[r].max()
                if top == -np.inf:
                    logits[r] = 0.0  # a row with no key keeps out 0, lse -inf
                    continue
                for e in range(count):
                    logits[r, e] = math.exp(logits[r, e] - top)
                    row_sum[r] += logits[r, e]
                lse[b, h, i0 + r] = top + math.log(row_sum[r])
            weighted = np.dot(logits, vv[:count])  # (rows, Dv)
            for r in range(i1 - i0):
                if row_sum[r] > 0.0:
                    out[b, h, i0 + r] = weighted[r] / row_sum[r]


@njit(cache=True, parallel=True)
def _backward(q, k, v, keys, banded, block, scale, left, right, causal, self_score, out, lse, dout, dlse, dq, dk, dv):
    batch, q_heads, q_len = q.shape[0], q.shape[1], q.shape[2]
    for item in prange(batch * q_heads):
        b, h, g, lb, lh = _work_item(item, q_heads, k.shape[1], keys)
        kk = np.zeros((keys.shape[3], k.shape[3]), q.dtype)
        vv = np.zeros((keys.shape[3], v.shape[3]), q.dtype)
        for t in range(keys.shape[2]):
            i0, i1 = t * block, min((t + 1) * block, q_len)
            count = _gather(k, v, keys, lb, lh, t, b, g, kk, vv)
            if i0 >= i1 or count == 0:
                continue
            q_rows = np.ascontiguousarray(q[b, h, i0:i1])
            dout_rows = np.ascontiguousarray(dout[b, h, i0:i1])
            logits, constant = _tile_logits(q_rows, kk, count, i0, keys, banded, lb, lh, t, scale, left, right,
                                            causal, self_score)  # fmt: skip
            # P from the saved lse; dP = dout vᵀ; dS = P (dP - dout.out + dlse) (FlashAttention-2).
            d_products = np.dot(dout_rows, vv[:count].T)  # (rows, count)
            for r in range(i1 - i0):
                i = i0 + r
                if lse[b, h, i] == -np.inf:
                    logits[r] = 0.0
                    d_products[r] = 0.0
                    continue
                delta = 0.0
                for d in range(v.shape[3]):
                    delta += dout[b, h, i, d] * out[b, h, i, d]
                for e in range(count):
                    p = math.exp(logits[r, e] - lse[b, h, i])
                    logits[r, e] = p
                    d_products[r, e] = 0.0 if constant[r, e] else p * (d_products[r, e] - delta + dlse[b, h, i])
            dq[b, h, i0:i1] += scale * np.dot(d_products, kk[:count])
            dk_listed = scale * np.dot(d_products.T, q_rows)  # (count, D)
            dv_listed = np.dot(logits.T, dout_rows)  # (count, Dv)
            for e in range(count):
                j = keys[lb, lh, t, e]
                if j < k.shape[2]:  # a zero key has nothing to receive
                    dk[b, h, j] += dk_listed[e]
                    dv[b, h, j] += dv_listed[e]


def key_lists(rows: list, width: int | None = None) -> np.ndarray:
    """Stack per-block lists of key indices into an int64 (len(rows), width) array, -1 after each list's end."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    keys = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    for t, row in enumerate(rows):
        keys[t, : len(row)] = row
    return keys
