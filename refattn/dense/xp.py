"""Dense attention over an array namespace ``xp`` (NumPy or CuPy): the tiled algorithm of the GPU path.

The same steps as spec/dense.md, computed FlashAttention's way so that memory
is O(N): query blocks of :data:`BLOCK_Q` rows sweep key blocks of
:data:`BLOCK_K` columns with an online softmax, so that no (Nq, Nk) array
exists; only (B, Hkv, G, BLOCK_Q, BLOCK_K) tiles do (G = Hq / Hkv, the query
heads that read one kv head: GQA without repeating k and v). The tile
products are batched ``xp.matmul`` calls (cuBLAS under CuPy). Inputs compute
in float32 when they are float32 or narrower, in float64 otherwise.

Einsum letters: b batch, g kv head, r query head within its group, i query,
j key, d head dim, e value dim.

Other mechanisms reuse :func:`attend` and :func:`attend_vjp` with their own
terms, each formed tile by tile: of the logits (``extra_logits``: a position
bias), of the scaled scores before the soft-cap (``extra_scores``: Shaw's and
Transformer-XL's query-dependent terms) and of the output (``extra_values``:
Shaw's relative values); they take their gradients from each tile's
``dlogits`` or ``dscores`` (``on_dlogits``, ``on_dscores``) or in
``extra_values.backward``. :func:`attended_counts` and :func:`first_allowed`
walk the same tiles of the mask alone; :class:`RelativeRows` reads a table of
one row per clipped relative position per tile.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from ..core.checks import AttentionShape
from ..core.masks import query_offset
from ..core.results import Cotangents, Grads, Result
from ..core.xp import compute_dtype, scatter_add
from .inputs import DenseInputs

BLOCK_Q = 256
BLOCK_K = 512

#: ``extra_logits(i0, i1, j0, j1) -> (…, i1 - i0, j1 - j0)`` array broadcastable to the tile, added after the
#: soft-cap with the bias (steps (3)), or None. ``extra_scores`` has the same form and is added to the scaled
#: scores before the soft-cap (step (1)).
LogitsTerm = Callable[[int, int, int, int], object]


class ValueTerm(Protocol):
    """A mechanism's own term of the output, ``out_i += Σ_j P'_ij a_ij`` (P' the dropped weights), tile by tile."""

    def forward(self, i0: int, i1: int, j0: int, j1: int, kept):
        """The tile's share of the term, (B, Hkv, G, bq, Dv), from its dropped weights ``kept`` (…, bq, bk),
        still unnormalised (the row's sum divides it with the rest)."""

    def backward(self, i0: int, i1: int, j0: int, j1: int, kept, dout):
        """``dout_i · a_ij`` (B, Hkv, G, bq, bk), the term's part of the dropped weights' gradient, for
        ``dout`` (…, bq, Dv); accumulates the term's own parameters' gradients from ``kept`` and ``dout``."""


def forward(x: DenseInputs, xp) -> Result:
    """Steps (1)-(7) of spec/dense.md, tiled."""
    out, lse = attend(x, xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={})


def vjp(x: DenseInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (7')-(1'), tiled; ``saved`` (this backend's forward result) spares recomputing out and lse."""
    return attend_vjp(x, cotangents, xp, (BLOCK_Q, BLOCK_K), saved)


def inputs_over(q, k, v, scale: float, mask=None, *, causal: bool = False, window=None,
                causal_alignment: str = "bottom_right") -> DenseInputs:  # fmt: skip
    """A :class:`DenseInputs` over arrays a mechanism has already checked and formed (on the host or the
    device): its own dense step, e.g. queries over projected keys or over memory plus segment."""
    (b, hq, nq, d), (hkv, nk), dv = q.shape, k.shape[1:3], v.shape[-1]
    shape = AttentionShape(batch=b, q_heads=hq, kv_heads=hkv, q_len=nq, kv_len=nk, head_dim=d, value_dim=dv)
    return DenseInputs(q, k, v, shape, mask, None, causal, causal_alignment, window, scale, 0.0, None, 0.0)


# --- the tiled forward --------------------------------------------------------


class _Visibility:
    """Which (query, key) pairs attention keeps, tile by tile: the user mask, causality and the window."""

    def __init__(self, x: DenseInputs, xp):
        s = x.shape
        self.xp, self.x, self.shape = xp, x, s
        self.group = s.q_heads // s.kv_heads
        self.offset = query_offset(s.q_len, s.kv_len, x.causal_alignment)
        self.mask = _grouped(x.mask, s, self.group, xp, bool)

    def query_blocks(self, block: int):
        return [(start, min(start + block, self.shape.q_len)) for start in range(0, self.shape.q_len, block)]

    def key_blocks(self, i0: int, i1: int, block: int):
        """The key tiles rows i0:i1 can see: causality and the window bound the columns, so a window
        costs O(N·window), not O(N²)."""
        x, low, high = self.x, 0, self.shape.kv_len
        first, last = i0 + self.offset, i1 - 1 + self.offset  # aligned positions of the first and last row
        if x.causal:
            high = min(high, last + 1)
        if x.window is not None:
            left, right = x.window
            if left is not None:
                low = max(low, first - left)
            if right is not None:
                high = min(high, last + right + 1)
        return [(start, min(start + block, high)) for start in range(low, high, block)]

    def tiles(self, blocks: tuple[int, int]):
        """Every (i0, i1, j0, j1) tile with a key the rows may see, row block by row block."""
        for i0, i1 in self.query_blocks(blocks[0]):
            for j0, j1 in self.key_blocks(i0, i1, blocks[1]):
                yield i0, i1, j0, j1

    def position_allowed(self, i0: int, i1: int, j0: int, j1: int):
        """(i1 - i0, j1 - j0) bool of causality and the window for this tile, or None (spec/README.md)."""
        x, xp = self.x, self.xp
        if not x.causal and x.window is None:
            return None
        aligned = xp.arange(i0, i1)[:, None] + self.offset  # (bq, 1)
        key = xp.arange(j0, j1)[None, :]  # (1, bk)
        allowed = xp.ones((i1 - i0, j1 - j0), dtype=bool)
        if x.causal:
            allowed &= key <= aligned
        if x.window is not None:
            left, right = x.window
            if left is not None:
                allowed &= key >= aligned - left
            if right is not None:
                allowed &= key <= aligned + right
        return allowed

    def allowed(self, i0: int, i1: int, j0: int, j1: int):
        """The tile's allowed entries (broadcastable to (B, Hkv, G, bq, bk)), or None when all are."""
        by_position = self.position_allowed(i0, i1, j0, j1)
        user = None if self.mask is None else _tile(self.mask, i0, i1, j0, j1)
        if user is None:
            return by_position
        return user if by_position is None else user & by_position


class _Problem(_Visibility):
    """The checked inputs on the device, grouped for GQA, in the compute dtype."""

    def __init__(self, x: DenseInputs, xp):
        super().__init__(x, xp)
        s = x.shape
        self.dtype = compute_dtype(x.q.dtype)
        # (B, Hkv, G, Nq, D): query head g·G + r reads kv head g.
        self.q = xp.asarray(x.q, dtype=self.dtype).reshape(s.batch, s.kv_heads, self.group, s.q_len, s.head_dim)
        self.k = xp.asarray(x.k, dtype=self.dtype)[:, :, None]  # (B, Hkv, 1, Nk, D)
        self.v = xp.asarray(x.v, dtype=self.dtype)[:, :, None]  # (B, Hkv, 1, Nk, Dv)
        self.bias = _grouped(x.bias, s, self.group, xp, self.dtype)
        self.keep = _grouped(x.dropout_keep, s, self.group, xp, bool)

    def logits(self, i0: int, i1: int, j0: int, j1: int, extra_logits: LogitsTerm | None,
               extra_scores: LogitsTerm | None = None):  # fmt: skip
        """Steps (1)-(4) on one tile: the scaled scores (kept for the soft-cap's derivative) and the
        masked logits (B, Hkv, G, bq, bk)."""
        xp, x = self.xp, self.x
        # (1) Scaled scores s = scale · q kᵀ, plus the mechanism's own scaled term.
        scores = x.scale * xp.matmul(self.q[..., i0:i1, :], xp.swapaxes(self.k[..., j0:j1, :], -1, -2))
        if extra_scores is not None:
            scores = scores + extra_scores(i0, i1, j0, j1)
        # (2) Soft-cap c · tanh(s / c).
        logits = x.softcap * xp.tanh(scores / x.softcap) if x.softcap > 0 else scores
        # (3) Additive terms: the user's bias and the mechanism's own.
        if self.bias is not None:
            logits = logits + _tile(self.bias, i0, i1, j0, j1)
        if extra_logits is not None:
            logits = logits + extra_logits(i0, i1, j0, j1)
        # (4) Mask: exactly -inf.
        allowed = self.allowed(i0, i1, j0, j1)
        if allowed is not None:
            logits = xp.where(allowed, logits, -np.inf)
        return scores, logits

    def dropout(self, weights, i0: int, i1: int, j0: int, j1: int):
        """Step (6) on a tile of weights: the keep-mask, survivors scaled by 1 / (1 - p)."""
        if self.keep is None:
            return weights
        return self.xp.where(_tile(self.keep, i0, i1, j0, j1), weights / (1.0 - self.x.dropout_p), 0.0)


def _grouped(array, s, group: int, xp, dtype):
    """A (…, Nq, Nk) broadcastable array as (B or 1, Hkv or 1, G or 1, Nq or 1, Nk or 1), on the device."""
    if array is None:
        return None
    full = np.reshape(array, (1,) * (4 - array.ndim) + array.shape)  # 4-D, still broadcastable
    b, h, nq, nk = full.shape
    if h == 1:
        grouped = full.reshape(b, 1, 1, nq, nk)
    else:
        grouped = full.reshape(b, s.kv_heads, group, nq, nk)
    return xp.asarray(grouped, dtype=dtype)


def _tile(array, i0: int, i1: int, j0: int, j1: int):
    """The (rows i0:i1, columns j0:j1) tile of a broadcastable array; an axis of size 1 stays whole."""
    rows = slice(None) if array.shape[-2] == 1 else slice(i0, i1)
    cols = slice(None) if array.shape[-1] == 1 else slice(j0, j1)
    return array[..., rows, cols]


def _stable(row_max, xp):
    """The row maximum with -inf (a row with nothing allowed yet) replaced by 0, so exp(-inf - 0) = 0."""
    return xp.where(xp.isfinite(row_max), row_max, 0.0)


def attend(x: DenseInputs, xp, blocks: tuple[int, int], extra_logits: LogitsTerm | None = None, *,
           extra_scores: LogitsTerm | None = None, extra_values: ValueTerm | None = None):  # fmt: skip
    """``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) by the online softmax (steps (1)-(7)), in tiles of
    ``blocks = (query rows, key columns)``, with a mechanism's own terms of the logits (after the soft-cap),
    of the scaled scores (before it) and of the output, when given.

    A fully masked row has ``out`` 0 and ``lse`` -inf (its running sum stays 0).
    """
    p = _Problem(x, xp)
    s = p.shape
    out = xp.empty((s.batch, s.kv_heads, p.group, s.q_len, s.value_dim), dtype=p.dtype)
    lse = xp.empty((s.batch, s.kv_heads, p.group, s.q_len), dtype=p.dtype)
    block_q, block_k = blocks
    for i0, i1 in p.query_blocks(block_q):
        row_max = xp.full(out.shape[:3] + (i1 - i0,), -np.inf, dtype=p.dtype)  # m_i
        row_sum = xp.zeros_like(row_max)  # Σ_j exp(z_ij − m_i), before dropout
        acc = xp.zeros(out.shape[:3] + (i1 - i0, s.value_dim), dtype=p.dtype)  # Σ_j exp(z_ij − m_i) keep_ij v_j
        for j0, j1 in p.key_blocks(i0, i1, block_k):
            _, logits = p.logits(i0, i1, j0, j1, extra_logits, extra_scores)
            # (5) Online softmax: rescale what was summed under the old maximum.
            new_max = xp.maximum(row_max, logits.max(axis=-1))
            stable = _stable(new_max, xp)
            rescale = xp.exp(row_max - stable)  # 0 while a row had nothing allowed (m = -inf)
            weights = xp.exp(logits - stable[..., None])  # unnormalised; 0 where masked
            row_sum = row_sum * rescale + weights.sum(axis=-1)
            # (6)-(7) Dropout on the weights, then the values.
            kept = p.dropout(weights, i0, i1, j0, j1)
            acc = acc * rescale[..., None] + xp.matmul(kept, p.v[..., j0:j1, :])
            if extra_values is not None:
                acc = acc + extra_values.forward(i0, i1, j0, j1, kept)
            row_max = new_max
        # Row finishing: divide by the sum; a row whose sum is 0 has nothing allowed.
        has_keys = row_sum > 0
        out[..., i0:i1, :] = xp.where(has_keys[..., None], acc / xp.where(has_keys, row_sum, 1.0)[..., None], 0.0)
        with np.errstate(divide="ignore"):
            lse[..., i0:i1] = xp.where(has_keys, _stable(row_max, xp) + xp.log(xp.where(has_keys, row_sum, 1.0)), -np.inf)
    return out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim), lse.reshape(s.batch, s.q_heads, s.q_len)


def attended_counts(x: DenseInputs, xp, blocks: tuple[int, int]):
    """How many keys each query row attends to (the mask, causality and the window; not dropout),
    (B, Hq, Nq) int64 on the device, counted tile by tile: nothing (Nq, Nk) is formed."""
    v = _Visibility(x, xp)
    s = v.shape
    counts = xp.zeros((s.batch, s.kv_heads, v.group, s.q_len), dtype=np.int64)
    for i0, i1, j0, j1 in v.tiles(blocks):
        allowed = v.allowed(i0, i1, j0, j1)
        if allowed is None:
            counts[..., i0:i1] += j1 - j0
        else:
            counts[..., i0:i1] += xp.broadcast_to(allowed, allowed.shape[:-2] + (i1 - i0, j1 - j0)).sum(axis=-1)
    return counts.reshape(s.batch, s.q_heads, s.q_len)


def first_allowed(x: DenseInputs, xp, blocks: tuple[int, int], marked: LogitsTerm) -> tuple[int, int] | None:
    """The first (query, key) pair, in tile order, that attention keeps and ``marked(i0, i1, j0, j1)``
    ((bq, bk) bool) marks, or None: a mechanism's check that every kept pair has what it needs.

    Each tile's verdict stays on the device and the host reads them once, at the end: one wait for the
    device in all, not one per tile. Only when a tile has such a pair is it formed again to find which.
    """
    v = _Visibility(x, xp)

    def kept_and_marked(i0: int, i1: int, j0: int, j1: int):
        marked_pairs, allowed = marked(i0, i1, j0, j1), v.allowed(i0, i1, j0, j1)
        return marked_pairs if allowed is None else marked_pairs & allowed  # (bq, bk) or (…, bq, bk)

    tiles = list(v.tiles(blocks))
    verdicts = xp.stack([kept_and_marked(*tile).any() for tile in tiles]) if tiles else None  # (tiles,)
    if verdicts is None or not bool(verdicts.any()):
        return None
    i0, i1, j0, j1 = tiles[int(xp.argmax(verdicts))]
    i, j = (int(index) for index in xp.argwhere(kept_and_marked(i0, i1, j0, j1))[0][-2:])
    return i0 + i, j0 + j


class RelativeRows:
    """A table with one row per clipped relative position, read per tile: pair (i, j) reads row
    ``clip(k_positions[j] − q_positions[i] + offset, 0, n_rows − 1)``.

    A tile's pairs read only rows ``lo .. hi`` (bq + bk − 1 of them for contiguous positions): a
    mechanism scores its rows against the tile's queries, (…, bq, hi − lo + 1), then :meth:`gather`
    picks each pair's; :meth:`scatter` is its adjoint (repeated rows summed), so nothing (Nq, Nk, D)
    is formed.
    """

    def __init__(self, q_positions: np.ndarray, k_positions: np.ndarray, offset: int, n_rows: int, xp):
        self.xp, self.offset, self.n_rows = xp, offset, n_rows
        self.host = (q_positions, k_positions)  # the tile's row range is found on the host
        self.q_positions, self.k_positions = xp.asarray(q_positions), xp.asarray(k_positions)

    def tile(self, i0: int, i1: int, j0: int, j1: int) -> tuple[slice, object]:
        """The rows ``lo:hi + 1`` the tile reads, and each pair's row minus ``lo``, (bq, bk)."""
        q_positions, k_positions = self.host[0][i0:i1], self.host[1][j0:j1]
        last = self.n_rows - 1
        lo = min(max(int(k_positions.min() - q_positions.max()) + self.offset, 0), last)
        hi = min(max(int(k_positions.max() - q_positions.min()) + self.offset, 0), last)
        relative = self.k_positions[None, j0:j1] - self.q_positions[i0:i1, None] + self.offset  # (bq, bk)
        return slice(lo, hi + 1), self.xp.clip(relative, 0, last) - lo

    def gather(self, by_row, index):
        """``by_row[..., i, index[i, j]]``: (…, bq, rows) to (…, bq, bk)."""
        return by_row[..., self.xp.arange(index.shape[0])[:, None], index]

    def scatter(self, by_pair, index, n_rows: int):
        """The adjoint of :meth:`gather`: (…, bq, bk) summed into (…, bq, n_rows) by ``index``."""
        by_row = self.xp.zeros(by_pair.shape[:-1] + (n_rows,), dtype=by_pair.dtype)
        scatter_add(self.xp, by_row, (Ellipsis, self.xp.arange(index.shape[0])[:, None], index), by_pair)
        return by_row


# --- the tiled VJP ------------------------------------------------------------


def attend_vjp(x: DenseInputs, cotangents: Cotangents, xp, blocks: tuple[int, int], saved: Result | None = None,
               extra_logits: LogitsTerm | None = None, on_dlogits: Callable | None = None, *,
               extra_scores: LogitsTerm | None = None, on_dscores: Callable | None = None,
               extra_values: ValueTerm | None = None) -> Grads:  # fmt: skip
    """Gradients of :func:`attend` for ``dout`` and ``dlse`` (FlashAttention-2's order, tile by tile).

    ``∂L/∂z_ij = w_ij (g_ij − δ_i) + w_ij · dlse_i`` with ``w`` the weights,
    ``g_ij = keep_ij/(1−p) · dout_i·v_j`` and ``δ_i = dout_i·out_i``.
    ``on_dlogits(i0, i1, j0, j1, dz)`` receives each tile's
    ``∂L/∂z`` (B, Hkv, G, bq, bk) for a mechanism's own logits term, ``on_dscores`` likewise
    ``∂L/∂s`` for its scores term; ``extra_values.backward`` adds its part to ``g`` and takes its own
    gradients.
    """
    p = _Problem(x, xp)
    s, dtype = p.shape, p.dtype
    if saved is None:
        out, lse = attend(x, xp, blocks, extra_logits, extra_scores=extra_scores, extra_values=extra_values)
    else:
        out, lse = xp.asarray(saved.out, dtype=dtype), xp.asarray(saved.lse, dtype=dtype)
    grouped = (s.batch, s.kv_heads, p.group, s.q_len)
    out = out.reshape(grouped + (s.value_dim,))
    lse = lse.reshape(grouped)
    dout = xp.asarray(cotangents.dout, dtype=dtype).reshape(grouped + (s.value_dim,))
    dlse = (xp.zeros(grouped, dtype=dtype) if cotangents.dlse is None
            else xp.asarray(cotangents.dlse, dtype=dtype).reshape(grouped))  # fmt: skip
    delta = (dout * out).sum(axis=-1)  # δ_i = dout_i · out_i
    stable_lse = _stable(lse, xp)  # -inf rows: every weight is 0 anyway
    dq = xp.zeros_like(p.q)
    dk = xp.zeros((s.batch, s.kv_heads, s.kv_len, s.head_dim), dtype=dtype)
    dv = xp.zeros((s.batch, s.kv_heads, s.kv_len, s.value_dim), dtype=dtype)
    dbias = None if p.bias is None else xp.zeros(p.bias.shape, dtype=dtype)
    block_q, block_k = blocks
    for i0, i1 in p.query_blocks(block_q):
        for j0, j1 in p.key_blocks(i0, i1, block_k):
            scores, logits = p.logits(i0, i1, j0, j1, extra_logits, extra_scores)
            # (5') The weights again, from the saved log-sum-exp.
            weights = xp.exp(logits - stable_lse[..., i0:i1, None])  # (B, Hkv, G, bq, bk)
            kept = p.dropout(weights, i0, i1, j0, j1)
            # (7') dv_j += Σ_i kept_ij dout_i (summed over the group's query heads).
            dv[..., j0:j1, :] += xp.matmul(xp.swapaxes(kept, -1, -2), dout[..., i0:i1, :]).sum(axis=2)
            # (6')-(5') g_ij = keep-scaled dout_i·v_j; ∂L/∂z = w (g − δ) + w dlse.
            dout_v = xp.matmul(dout[..., i0:i1, :], xp.swapaxes(p.v[..., j0:j1, :], -1, -2))
            if extra_values is not None:
                dout_v = dout_v + extra_values.backward(i0, i1, j0, j1, kept, dout[..., i0:i1, :])
            g = p.dropout(dout_v, i0, i1, j0, j1)
            dz = weights * (g - delta[..., i0:i1, None] + dlse[..., i0:i1, None])
            # (3') The additive terms' gradients.
            if dbias is not None:
                _add_to_broadcast(dbias, dz, i0, i1, j0, j1, xp)
            if on_dlogits is not None:
                on_dlogits(i0, i1, j0, j1, dz)
            # (2') The soft-cap's derivative 1 − tanh²(s / c).
            ds = dz * (1.0 - xp.tanh(scores / x.softcap) ** 2) if x.softcap > 0 else dz
            if on_dscores is not None:
                on_dscores(i0, i1, j0, j1, ds)
            # (1') dq += scale ds k, dk += scale dsᵀ q.
            dq[..., i0:i1, :] += x.scale * xp.matmul(ds, p.k[..., j0:j1, :])
            dk[..., j0:j1, :] += x.scale * xp.matmul(xp.swapaxes(ds, -1, -2), p.q[..., i0:i1, :]).sum(axis=2)
    grads = Grads(q=dq.reshape(x.q.shape), k=dk, v=dv)
    if dbias is not None:
        grads["bias"] = dbias.reshape(x.bias.shape)
    return grads


def _add_to_broadcast(target, tile, i0: int, i1: int, j0: int, j1: int, xp) -> None:
    """``target[..., rows, cols] += tile`` summed over the axes ``target`` is broadcast along (size 1)."""
    for axis in range(tile.ndim - 2):
        if target.shape[axis] == 1 and tile.shape[axis] != 1:
            tile = tile.sum(axis=axis, keepdims=True)
    rows = slice(0, 1) if target.shape[-2] == 1 else slice(i0, i1)
    cols = slice(0, 1) if target.shape[-1] == 1 else slice(j0, j1)
    if target.shape[-2] == 1:
        tile = tile.sum(axis=-2, keepdims=True)
    if target.shape[-1] == 1:
        tile = tile.sum(axis=-1, keepdims=True)
    target[..., rows, cols] += tile
