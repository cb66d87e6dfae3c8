"""Attention over a key list per query block, over an array namespace ``xp`` (NumPy or CuPy): the GPU path
of every mechanism of this family.

The pattern is the one refattn/segmented/blocksparse.py (the Numba kernel) takes: for each query block
``t`` (queries ``t * block ... t * block + block - 1``) a list ``keys[.., t, e]`` of key indices (``-1``
ends it) with a flag ``banded[.., t, e]``; query ``i`` attends to entry ``e`` unless the entry is banded
and key ``j`` lies outside i's band (``j < i - left``, ``j > i + right``, a side ``< 0`` unbounded; ``j > i``
when ``causal``). A key index ``>= Nk`` is a zero key (score 0, value 0); an entry listed twice counts
twice; with ``self_score`` finite, the logit of key ``j == i`` is that constant and passes no gradient to
q or k. Lists have a leading batch axis of 1 or B and a head axis of 1 or Hq.

Here a step takes ``rows`` query rows (whole blocks, at least one) and sweeps their lists ``columns``
entries at a time with an online softmax: the listed keys and values are gathered with fancy indexing
into (…, blocks, columns, D) tiles, so each product is one batched ``xp.matmul`` (cuBLAS under CuPy).
Memory is O(N·D) for the arrays plus one step's tiles: nothing (N, N) exists. The backward recomputes the
weights from the saved lse (FlashAttention-2) and scatter-adds the gathered dk and dv back to their keys.

Einsum letters / shape names: b batch, g kv head, r query head within its group (G = Hq / Hkv), t query
block, i row within a block, e list entry, d head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.xp import blocks, scatter_add


@dataclass(frozen=True)
class Pattern:
    """A key-list pattern and its band: what :func:`attend` and :func:`attend_vjp` take besides the arrays."""

    keys: np.ndarray  # (1 or B, 1 or Hq, T, W) int64, -1 after each list
    banded: np.ndarray  # (1 or B, 1 or Hq, T, W) bool
    block: int  # query rows per list
    scale: float
    left: int = -1
    right: int = -1
    causal: bool = False
    self_score: float = math.nan


class _Sweep:
    """One problem on the device: q grouped for GQA and padded to whole blocks, k and v with a zero row
    appended (where zero keys and list ends read), the lists grouped like q."""

    def __init__(self, q, k, v, pattern: Pattern, xp):
        self.xp, self.pattern = xp, pattern
        b, hq, self.q_len, d = q.shape
        hkv, self.kv_len = k.shape[1], k.shape[2]
        self.group = hq // hkv
        self.n_blocks = pattern.keys.shape[2]
        rows = self.n_blocks * pattern.block
        # (B, Hkv, G, T, block, D): query head g·G + r reads kv head g; rows past Nq are zero.
        padded = xp.zeros((b, hq, rows, d), dtype=q.dtype)
        padded[:, :, : self.q_len] = q
        self.q = padded.reshape(b, hkv, self.group, self.n_blocks, pattern.block, d)
        # (B, Hkv, Nk + 1, D): row Nk is the zero key.
        self.k = xp.concatenate([k, xp.zeros((b, hkv, 1, d), dtype=k.dtype)], axis=2)
        self.v = xp.concatenate([v, xp.zeros((b, hkv, 1, v.shape[3]), dtype=v.dtype)], axis=2)
        keys, banded = _grouped(pattern.keys, hkv, self.group), _grouped(pattern.banded, hkv, self.group)
        self.listed = xp.asarray(keys)  # (1|B, 1|Hkv, 1|G, T, W) key index, -1 for none
        self.read = xp.asarray(np.where((keys < 0) | (keys >= self.kv_len), self.kv_len, keys))  # row of k read
        self.banded = xp.asarray(banded)
        self.batch_index = xp.arange(b).reshape(b, 1, 1, 1, 1)
        self.head_index = xp.arange(hkv).reshape(1, hkv, 1, 1, 1)

    def steps(self, rows: int, columns: int):
        """(t0, t1) query blocks per step and (e0, e1) list entries per tile."""
        per_step = max(rows // self.pattern.block, 1)
        return blocks(self.n_blocks, per_step), blocks(self.listed.shape[-1], columns)

    def gathered(self, t0: int, t1: int, e0: int, e1: int):
        """The tile's listed keys and values, (B, Hkv, 1|G, t, e, D) and (…, Dv)."""
        index = (self.batch_index, self.head_index, self.read[..., t0:t1, e0:e1])
        return self.k[index], self.v[index]

    def logits(self, t0: int, t1: int, e0: int, e1: int, kk):
        """(B, Hkv, G, t, i, e) logits of the tile (−inf outside the pattern, the self score on j == i), and
        where the self score stands (no gradient to q or k) or None."""
        xp, p = self.xp, self.pattern
        logits = p.scale * xp.matmul(self.q[:, :, :, t0:t1], xp.swapaxes(kk, -1, -2))
        key = self.listed[..., t0:t1, None, e0:e1]  # (…, t, 1, e)
        query = xp.arange(t0 * p.block, t1 * p.block).reshape(t1 - t0, p.block, 1)  # (t, i, 1)
        outside = (key > query) if p.causal else xp.zeros(key.shape[:-3] + (t1 - t0, p.block, e1 - e0), dtype=bool)
        if p.left >= 0:
            outside = outside | (key < query - p.left)
        if p.right >= 0:
            outside = outside | (key > query + p.right)
        allowed = (key >= 0) & ~(self.banded[..., t0:t1, None, e0:e1] & outside)
        logits = xp.where(allowed, logits, -np.inf)
        if math.isnan(p.self_score):
            return logits, None
        constant = allowed & (key == query)
        return xp.where(constant, p.self_score, logits), constant

    def logits_and_values(self, t0: int, t1: int, e0: int, e1: int):
        """The tile's logits (B, Hkv, G, t, i, e) and listed values (B, Hkv, 1|G, t, e, Dv)."""
        kk, vv = self.gathered(t0, t1, e0, e1)
        return self.logits(t0, t1, e0, e1, kk)[0], vv

    def rows(self, array, fill: float):
        """A (B, Hq, Nq, …) array as (B, Hkv, G, T, block, …), rows past Nq set to ``fill``."""
        xp = self.xp
        b, hq = array.shape[:2]
        padded = xp.full((b, hq, self.n_blocks * self.pattern.block) + array.shape[3:], fill, dtype=array.dtype)
        padded[:, :, : self.q_len] = array
        return padded.reshape(self.q.shape[:5] + array.shape[3:])

    def unrows(self, array):
        """The inverse of :meth:`rows`: (B, Hkv, G, T, block, …) to (B, Hq, Nq, …)."""
        b, hkv, g, t, block = array.shape[:5]
        return array.reshape((b, hkv * g, t * block) + array.shape[5:])[:, :, : self.q_len]

    def scatter(self, target, t0: int, t1: int, e0: int, e1: int, listed):
        """``target[b, g, key] += listed`` over the tile's entries (the zero row Nk collects what no key takes)."""
        xp = self.xp
        index = self.read[..., t0:t1, e0:e1]
        if index.shape[2] == 1:
            listed = listed.sum(axis=2, keepdims=True)  # the group's query heads share the list
        index = xp.broadcast_to(index, listed.shape[:-1])
        scatter_add(xp, target, (xp.broadcast_to(self.batch_index, index.shape),
                                 xp.broadcast_to(self.head_index, index.shape), index), listed)  # fmt: skip


def _grouped(lists: np.ndarray, kv_heads: int, group: int) -> np.ndarray:
    """(1|B, 1|Hq, T, W) lists as (1|B, 1|Hkv, 1|G, T, W)."""
    lb, lh, t, w = lists.shape
    return lists.reshape(lb, 1, 1, t, w) if lh == 1 else lists.reshape(lb, kv_heads, group, t, w)


def online_softmax(tiles, xp, statistics: bool = False):
    """``out`` (…, rows, Dv) and ``lse`` (…, rows) of the softmax over the columns of every tile together, from
    ``tiles``: (logits (…, rows, columns), values (…, columns, Dv)) pairs, swept with an online softmax. A row
    with no finite logit has ``out`` 0 and ``lse`` −inf.

    With ``statistics``, also each row's maximum (0 for a row with no finite logit) and its sum of
    ``exp(z − max)``: the weights ``exp(z − max) / sum`` again, exact where rounding ``lse`` is not (logits of
    a huge magnitude in float32, e.g. a mask value added to every score of a row)."""
    row_max = row_sum = acc = None
    for logits, values in tiles:
        if row_max is None:
            row_max = xp.full(logits.shape[:-1], -np.inf, dtype=logits.dtype)  # m_i
            row_sum = xp.zeros_like(row_max)  # Σ_j exp(z_ij − m_i)
            acc = xp.zeros(row_max.shape + values.shape[-1:], dtype=logits.dtype)  # Σ_j exp(z_ij − m_i) v_j
        new_max = xp.maximum(row_max, logits.max(axis=-1))
        stable = xp.where(xp.isfinite(new_max), new_max, 0.0)
        rescale = xp.exp(row_max - stable)  # 0 while a row had nothing allowed (m = −inf)
        weights = xp.exp(logits - stable[..., None])
        row_sum = row_sum * rescale + weights.sum(axis=-1)
        acc = acc * rescale[..., None] + xp.matmul(weights, values)
        row_max = new_max
    has_keys = row_sum > 0
    safe_sum = xp.where(has_keys, row_sum, 1.0)
    out = xp.where(has_keys[..., None], acc / safe_sum[..., None], 0.0)
    stable_max = xp.where(has_keys, row_max, 0.0)
    lse = xp.where(has_keys, stable_max + xp.log(safe_sum), -np.inf)
    return (out, lse, stable_max, row_sum) if statistics else (out, lse)


def attend(q, k, v, pattern: Pattern, xp, tiles: tuple[int, int]):
    """``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) over the pattern, in steps of ``tiles = (query rows,
    list entries)``; a row with no key has ``out`` 0 and ``lse`` −inf. q, k, v are device arrays of one dtype."""
    sweep = _Sweep(q, k, v, pattern, xp)
    step_blocks, entries = sweep.steps(*tiles)
    out = xp.zeros(sweep.q.shape[:5] + (v.shape[3],), dtype=q.dtype)  # (B, Hkv, G, T, block, Dv)
    lse = xp.full(sweep.q.shape[:5], -np.inf, dtype=q.dtype)
    for t0, t1 in step_blocks:
        tiles = (sweep.logits_and_values(t0, t1, e0, e1) for e0, e1 in entries)
        out[:, :, :, t0:t1], lse[:, :, :, t0:t1] = online_softmax(tiles, xp)
    return sweep.unrows(out), sweep.unrows(lse)


def attend_vjp(q, k, v, pattern: Pattern, xp, tiles: tuple[int, int], out, lse, dout, dlse=None):
    """Gradients ``dq`` (B, Hq, Nq, D), ``dk`` (B, Hkv, Nk, D), ``dv`` (B, Hkv, Nk, Dv) of :func:`attend` for
    ``dout`` and ``dlse`` (None: 0). A row whose ``lse`` is +inf takes no part (its weights are 0)."""
    sweep = _Sweep(q, k, v, pattern, xp)
    step_blocks, entries = sweep.steps(*tiles)
    dtype = q.dtype
    dout = sweep.rows(xp.asarray(dout, dtype=dtype), 0.0)
    out = sweep.rows(xp.asarray(out, dtype=dtype), 0.0)
    lse = sweep.rows(xp.asarray(lse, dtype=dtype), np.inf)  # padding rows: no weight
    lse = xp.where(lse == -np.inf, 0.0, lse)  # a row with no key: every logit is −inf
    dlse = xp.zeros(lse.shape, dtype) if dlse is None else sweep.rows(xp.asarray(dlse, dtype=dtype), 0.0)
    delta = (dout * out).sum(axis=-1)  # δ_i = dout_i · out_i
    dq = xp.zeros_like(sweep.q)
    dk, dv = xp.zeros_like(sweep.k), xp.zeros_like(sweep.v)
    for t0, t1 in step_blocks:
        for e0, e1 in entries:
            kk, vv = sweep.gathered(t0, t1, e0, e1)
            logits, constant = sweep.logits(t0, t1, e0, e1, kk)
            weights = xp.exp(logits - lse[:, :, :, t0:t1, :, None])  # (B, Hkv, G, t, i, e)
            dout_rows = dout[:, :, :, t0:t1]
            dz = weights * (xp.matmul(dout_rows, xp.swapaxes(vv, -1, -2))
                            - delta[:, :, :, t0:t1, :, None] + dlse[:, :, :, t0:t1, :, None])  # fmt: skip
            if constant is not None:
                dz = xp.where(constant, 0.0, dz)
            dq[:, :, :, t0:t1] += pattern.scale * xp.matmul(dz, kk)
            dk_listed = pattern.scale * xp.matmul(xp.swapaxes(dz, -1, -2), sweep.q[:, :, :, t0:t1])
            sweep.scatter(dk, t0, t1, e0, e1, dk_listed)
            sweep.scatter(dv, t0, t1, e0, e1, xp.matmul(xp.swapaxes(weights, -1, -2), dout_rows))
    return sweep.unrows(dq), dk[:, :, : sweep.kv_len], dv[:, :, : sweep.kv_len]
