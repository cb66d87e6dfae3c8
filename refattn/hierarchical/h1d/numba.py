"""H-Transformer-1D on CPU: the hierarchical matrix in Numba, O(N) time and memory for a fixed block.

The same function as :mod:`refattn.hierarchical.h1d.reference`, with its
step numbers (spec/hierarchical.md). The (batch, query head) work items are
split into one chunk per thread; a chunk allocates its workspace once and
reuses it for each of its items. An item builds the coarse pyramid of its
queries (means, or first tokens), keys (means) and values (sums) level by
level (2); then, for each term (level 0's diagonal and neighbours, each
coarser level's neighbours) and query block, forms one (block × block) tile
of scores with ``np.dot`` (3), shifts each row by its maximum over the kept
keys (4) and merges the row's shift, ``y = E v`` and ``a = E w`` into its
level's row (one row per coarse token). The levels are then merged top down,
each coarse row into the rows of its two children, ``Y = Y⁽⁰⁾ + P(Y⁽¹⁾ +
P(Y⁽²⁾ + …))`` (5)-(6), under one shared shift per row (the paper) or as
they are (``row_max="per_level"``), and the token rows divided (7).

Time: every level costs (its coarse length) · block · (D + Dv) for the tiles
and (its coarse length) · Dv for the merge, and the coarse lengths halve: about
6 N · block · (D + Dv) in all, O(N). Memory per thread: the pyramid and the
per-level rows, 4 P (D + Dv) numbers, allocated once per thread (see
``_workspace``: per item, at 64K tokens, it made the time grow faster than N).

The VJP recomputes the forward's levels (``saved`` is not used), takes each
token row's cotangents ``dY``, ``dA`` up the levels (the transpose of the top
down merge, each coarse row collecting its children's, rescaled to its own
shift) (6'), redoes every tile to get ``dE = dy vᵀ + da wᵀ`` and ``dS = E ∘
dE`` (plus, for ``per_level``, the row's ``-sum(E dE)`` at its first maximal
key) (4'), and its products with the coarse q, k (3'); the coarse gradients go
back to tokens by pushing them down the pyramid (2'). Keys and values get one
gradient per query head, summed over each GQA group at the end (no two items
write the same memory).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from .inputs import KEY_BLOCKS, H1DInputs

OWN, SIBLING, LEFT, RIGHT = (KEY_BLOCKS.index(name) for name in ("own", "sibling", "left", "right"))


def _arguments(x: H1DInputs) -> tuple:
    """The scalars and term tables every kernel takes."""
    terms = x.terms()
    levels = np.array([t.level for t in terms], np.int64)
    keys = np.array([KEY_BLOCKS.index(t.keys) for t in terms], np.int64)
    dtype = compute_dtype(x.q)
    chunks = min(numba.get_num_threads(), x.shape.batch * x.shape.q_heads)  # one per thread: see _workspace
    return (chunks, _level_offsets(x.padded_len, x.num_levels), x.shape.q_len, x.padded_len, x.block_size, x.num_levels, levels, keys, x.causal,
            x.row_max == "shared", x.coarse_denominator == "counts", x.coarse_queries == "last",
            x.coarse_queries == "first", dtype.type(x.denominator_eps), dtype.type(x.scale), x.defines_lse)  # fmt: skip


def _inputs(x: H1DInputs):
    dtype = compute_dtype(x.q)
    return tuple(np.ascontiguousarray(a, dtype=dtype) for a in (x.q, x.k, x.v))


def forward(x: H1DInputs) -> Result:
    q, k, v = _inputs(x)
    out = np.zeros(q.shape[:3] + (v.shape[3],), q.dtype)
    lse = np.zeros(q.shape[:3], q.dtype)
    _forward_kernel(q, k, v, out, lse, *_arguments(x))
    return Result(out=out, lse=lse if x.defines_lse else None, aux={})


def vjp(x: H1DInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    q, k, v = _inputs(x)
    dtype = q.dtype
    dout = np.ascontiguousarray(cotangents.dout, dtype=dtype)
    dlse = np.zeros(q.shape[:3], dtype) if cotangents.dlse is None else np.ascontiguousarray(cotangents.dlse, dtype)
    dq = np.zeros(q.shape, dtype)
    dk = np.zeros(q.shape, dtype)  # one per query head, summed over GQA groups below
    dv = np.zeros(q.shape[:3] + (v.shape[3],), dtype)
    _backward_kernel(q, k, v, dout, dlse, dq, dk, dv, *_arguments(x))
    b, hkv, n = k.shape[:3]
    group = x.shape.group
    return Grads(q=dq, k=dk.reshape(b, hkv, group, n, -1).sum(axis=2), v=dv.reshape(b, hkv, group, n, -1).sum(axis=2))


# --------------------------------------------------------------------------
# (1)-(2) The pyramid: every level's coarse rows in one array, level l from offsets[l].
# --------------------------------------------------------------------------


@njit(cache=True)
def _level_offsets(p, num_levels):
    offsets = np.zeros(num_levels + 1, np.int64)
    for level in range(num_levels):
        offsets[level + 1] = offsets[level] + (p >> level)
    return offsets


@njit(cache=True)
def _pyramid(qf, kf, vf, n, p, num_levels, offsets, first_query, cq, ck, cv, counts):
    """(1)-(2) Into the workspace: coarse queries (means over real tokens, or first tokens), keys (means), values
    (sums) and token counts of every level; padded rows are zero."""
    d, dv = qf.shape[1], vf.shape[1]
    for row in range(p):
        real = row < n
        counts[row] = 1.0 if real else 0.0
        for f in range(d):
            cq[row, f] = qf[row, f] if real else 0.0
            ck[row, f] = kf[row, f] if real else 0.0
        for f in range(dv):
            cv[row, f] = vf[row, f] if real else 0.0
    for level in range(1, num_levels):
        here, below = offsets[level], offsets[level - 1]
        for row in range(p >> level):
            a, b, o = below + 2 * row, below + 2 * row + 1, here + row
            c = counts[a] + counts[b]
            counts[o] = c
            wa, wb = (counts[a] / c, counts[b] / c) if c > 0 else (0.0, 0.0)  # the mean of two means: count-weighted
            for f in range(d):
                cq[o, f] = cq[a, f] if first_query else wa * cq[a, f] + wb * cq[b, f]
                ck[o, f] = wa * ck[a, f] + wb * ck[b, f]
            for f in range(dv):
                cv[o, f] = cv[a, f] + cv[b, f]


# --------------------------------------------------------------------------
# (3)-(4) Tiles: one query block against one key block of a level.
# --------------------------------------------------------------------------


@njit(cache=True)
def _key_block(block, blocks, keys, causal):
    """The key block a term pairs with ``block``, or -1 when it has none (no block there; a later sibling)."""
    if keys == OWN:
        return block
    if keys == SIBLING:
        return -1 if causal and block % 2 == 0 else block ^ 1
    if keys == LEFT:
        return block - 1
    return -1 if block + 1 >= blocks else block + 1


@njit(cache=True)
def _kept(i, j, r, keys, level, causal):
    """Whether the term keeps the pair (query i, key j) of its two blocks: causality on the diagonal, and at
    levels >= 1 not a pair of adjacent half-blocks (level l - 1 covers those)."""
    if keys == OWN:
        return not (causal and j > i)
    if keys == LEFT:
        return not (level > 0 and i < r // 2 and j >= r // 2)
    if keys == RIGHT:
        return not (level > 0 and i >= r // 2 and j < r // 2)
    return True


@njit(cache=True)
def _block_tile(cq, ck, counts, q0, k0, r, scale, keys, level, causal, dtype):
    """(3)-(4) A (r × r) tile: exps E = exp(s - m) of kept pairs, row maxima m (-inf: none kept), first argmax."""
    s = scale * np.dot(cq[q0:q0 + r], ck[k0:k0 + r].T)
    exps = np.zeros((r, r), dtype)
    shift = np.full(r, -np.inf, dtype)
    first = np.zeros(r, np.int64)
    for i in range(r):
        for j in range(r):
            if counts[k0 + j] > 0 and _kept(i, j, r, keys, level, causal) and s[i, j] > shift[i]:
                shift[i] = s[i, j]
                first[i] = j
        if np.isfinite(shift[i]):
            for j in range(r):
                if counts[k0 + j] > 0 and _kept(i, j, r, keys, level, causal):
                    exps[i, j] = np.exp(s[i, j] - shift[i])
    return exps, shift, first


@njit(cache=True)
def _key_weights(counts, k0, r, counts_den, dtype):
    w = np.zeros(r, dtype)
    for j in range(r):
        c = counts[k0 + j]
        w[j] = c if counts_den else (1.0 if c > 0 else 0.0)
    return w


@njit(cache=True)
def _tiles(offsets, p, r, levels, keys, causal):
    """(3) Every tile of every term: rows (term, first query row, first key row) in the pyramid's numbering."""
    count = 0
    table = np.zeros((2 * (p // r) * levels.shape[0], 3), np.int64)
    for t in range(levels.shape[0]):
        base = offsets[levels[t]]
        blocks = (p >> levels[t]) // r
        for block in range(blocks):
            key_block = _key_block(block, blocks, keys[t], causal)
            if key_block >= 0:
                table[count] = (t, base + block * r, base + key_block * r)
                count += 1
    return table[:count]


# --------------------------------------------------------------------------
# (4)-(6) Each level's rows, then the levels merged top down.
# --------------------------------------------------------------------------


@njit(cache=True)
def _merge(shifts, ys, as_, row, shift, y, a, shared):
    """Row ``row`` (shift, y, a) += (shift, y, a): under the larger shift (shared), or summed (per_level)."""
    if not np.isfinite(shift):
        return
    old = shifts[row]
    if not np.isfinite(old):
        shifts[row] = shift
        ys[row] = y
        as_[row] = a
        return
    top = max(old, shift)
    f_old, f_new = (np.exp(old - top), np.exp(shift - top)) if shared else (1.0, 1.0)
    for e in range(ys.shape[1]):
        ys[row, e] = f_old * ys[row, e] + f_new * y[e]
    as_[row] = f_old * as_[row] + f_new * a
    shifts[row] = top


@njit(cache=True)
def _levels(cq, ck, cv, counts, offsets, p, r, num_levels, levels, keys, causal, shared, counts_den, last_rule,
            scale, shifts, ys, as_, dtype):  # fmt: skip
    """(3)-(6) Every level's rows (its terms merged), then merged top down: afterwards row ``offsets[l] + I`` holds
    what coarse token I of level l passes to its tokens from levels l and above (level 0: the token rows)."""
    shifts[:] = -np.inf
    ys[:] = 0.0
    as_[:] = 0.0
    tiles = _tiles(offsets, p, r, levels, keys, causal)
    for tile in range(tiles.shape[0]):
        t, q0, k0 = tiles[tile]
        exps, shift, _ = _block_tile(cq, ck, counts, q0, k0, r, scale, keys[t], levels[t], causal, dtype)
        y = np.dot(exps, cv[k0:k0 + r])
        a = np.dot(exps, _key_weights(counts, k0, r, counts_den, dtype))
        for i in range(r):
            _merge(shifts, ys, as_, q0 + i, shift[i], y[i], a[i], shared)
    # (5)-(6) Y = Y0 + P(Y1 + P(Y2 + ...)): a coarse row reaches both children (with "last", only the later one).
    for level in range(num_levels - 1, 0, -1):
        here, below = offsets[level], offsets[level - 1]
        for child in range(p >> (level - 1)):
            if not last_rule or child % 2 == 1:
                row = here + child // 2
                _merge(shifts, ys, as_, below + child, shifts[row], ys[row], as_[row], shared)


@njit(cache=True)
def _item_levels(q, k, v, b, h, n, p, r, num_levels, offsets, levels, keys, causal, shared, counts_den, last_rule,
                 first_query, scale, work, dtype):  # fmt: skip
    """(1)-(6) for work item (b, h) into the workspace ``work``: its pyramid, then its levels' merged rows."""
    cq, ck, cv, counts, shifts, ys, as_ = work
    kv = h // (q.shape[1] // k.shape[1])
    _pyramid(q[b, h], k[b, kv], v[b, kv], n, p, num_levels, offsets, first_query, cq, ck, cv, counts)
    _levels(cq, ck, cv, counts, offsets, p, r, num_levels, levels, keys, causal, shared, counts_den, last_rule, scale,
            shifts, ys, as_, dtype)  # fmt: skip


@njit(cache=True)
def _workspace(p, d, dv, num_levels, dtype):
    """One thread's arrays, reused for each of its items: the pyramid (q, k, v, counts) and the rows (shift, y, a).

    Allocated once per thread, not per item: buffers above the C library's mmap threshold (32 MiB) go back to the
    system when freed and are page-faulted in again at the next allocation.
    """
    rows = _level_offsets(p, num_levels)[num_levels]
    return (np.zeros((rows, d), dtype), np.zeros((rows, d), dtype), np.zeros((rows, dv), dtype), np.zeros(rows, dtype),
            np.zeros(rows, dtype), np.zeros((rows, dv), dtype), np.zeros(rows, dtype))  # fmt: skip


@njit(parallel=True, cache=True)
def _forward_kernel(q, k, v, out, lse, chunks, offsets, n, p, r, num_levels, levels, keys, causal, shared, counts_den, last_rule,
                    first_query, eps, scale, defines_lse):  # fmt: skip
    heads, dtype = q.shape[1], q.dtype.type
    for chunk in prange(chunks):
        work = _workspace(p, q.shape[3], v.shape[3], num_levels, dtype)
        cq, ck, cv, counts, shifts, ys, as_ = work
        for item in range(chunk, q.shape[0] * heads, chunks):
            b, h = item // heads, item % heads
            _item_levels(q, k, v, b, h, n, p, r, num_levels, offsets, levels, keys, causal, shared, counts_den,
                         last_rule, first_query, scale, work, dtype)  # fmt: skip
            # (7) out = Y / (A + eps), lse = shift + log A.
            for i in range(n):
                a = as_[i] + eps
                if a > 0:
                    for e in range(ys.shape[1]):
                        out[b, h, i, e] = ys[i, e] / a
                    lse[b, h, i] = shifts[i] + np.log(a) if defines_lse else 0.0
                else:
                    lse[b, h, i] = -np.inf


@njit(parallel=True, cache=True)
def _backward_kernel(q, k, v, dout, dlse, dq, dk, dv, chunks, offsets, n, p, r, num_levels, levels, keys, causal, shared,
                     counts_den, last_rule, first_query, eps, scale, defines_lse):  # fmt: skip
    heads, dtype = q.shape[1], q.dtype.type
    for chunk in prange(chunks):
        work = _workspace(p, q.shape[3], v.shape[3], num_levels, dtype)
        cq, ck, cv, counts, shifts, ys, as_ = work
        dcq, dck, dcv, _, das, dys, _ = _workspace(p, q.shape[3], v.shape[3], num_levels, dtype)
        for item in range(chunk, q.shape[0] * heads, chunks):
            b, h = item // heads, item % heads
            _item_levels(q, k, v, b, h, n, p, r, num_levels, offsets, levels, keys, causal, shared, counts_den,
                         last_rule, first_query, scale, work, dtype)  # fmt: skip
            _row_cotangents(dout[b, h], dlse[b, h], n, p, num_levels, offsets, shared, last_rule, eps, defines_lse,
                            shifts, ys, as_, dys, das)  # fmt: skip
            _tile_gradients(cq, ck, cv, counts, offsets, p, r, levels, keys, causal, shared, counts_den, scale, shifts,
                            dys, das, dcq, dck, dcv, dtype)  # fmt: skip
            _push_down(dcq, dck, dcv, counts, offsets, p, num_levels, first_query)
            dq[b, h] = dcq[:n]
            dk[b, h] = dck[:n]
            dv[b, h] = dcv[:n]


@njit(cache=True)
def _row_cotangents(dout, dlse, n, p, num_levels, offsets, shared, last_rule, eps, defines_lse, shifts, ys, as_, dys,
                    das):  # fmt: skip
    """(7')-(6') dY, dA of each token row, then up the levels: a coarse row collects its children's, each rescaled
    from the child's shift to its own (the transpose of the top-down merge)."""
    dys[:] = 0.0
    das[:] = 0.0
    for i in range(n):
        a = as_[i] + eps
        if not a > 0:
            continue
        dys[i] = dout[i] / a
        das[i] = -np.dot(dys[i], ys[i]) / a
        if defines_lse:
            das[i] += dlse[i] / a
    for level in range(1, num_levels):
        here, below = offsets[level], offsets[level - 1]
        for child in range(p >> (level - 1)):
            row, c = here + child // 2, below + child
            if (last_rule and child % 2 == 0) or not np.isfinite(shifts[row]):
                continue
            f = np.exp(shifts[row] - shifts[c]) if shared else 1.0
            dys[row] += f * dys[c]
            das[row] += f * das[c]


@njit(cache=True)
def _tile_gradients(cq, ck, cv, counts, offsets, p, r, levels, keys, causal, shared, counts_den, scale, shifts, dys,
                    das, dcq, dck, dcv, dtype):  # fmt: skip
    """(4')-(3') Each tile again: its rows' dy, da (the level's row cotangent rescaled to the tile's shift),
    dE = dy vᵀ + da wᵀ, dS = E ∘ dE (+ the row maximum's share), then q kᵀ's products."""
    dcq[:] = 0.0
    dck[:] = 0.0
    dcv[:] = 0.0
    tiles = _tiles(offsets, p, r, levels, keys, causal)
    for tile in range(tiles.shape[0]):
        t, q0, k0 = tiles[tile]
        exps, shift, first = _block_tile(cq, ck, counts, q0, k0, r, scale, keys[t], levels[t], causal, dtype)
        w = _key_weights(counts, k0, r, counts_den, dtype)
        dy = np.zeros((r, cv.shape[1]), dtype)
        da = np.zeros(r, dtype)
        for i in range(r):
            if np.isfinite(shift[i]):
                f = np.exp(shift[i] - shifts[q0 + i]) if shared else 1.0
                dy[i] = f * dys[q0 + i]
                da[i] = f * das[q0 + i]
        d_exps = np.dot(dy, cv[k0:k0 + r].T)
        for i in range(r):
            d_exps[i] += da[i] * w
        dcv[k0:k0 + r] += np.dot(exps.T, dy)
        d_scores = exps * d_exps
        if not shared:
            for i in range(r):
                d_scores[i, first[i]] -= d_scores[i].sum()
        dcq[q0:q0 + r] += scale * np.dot(d_scores, ck[k0:k0 + r])
        dck[k0:k0 + r] += scale * np.dot(d_scores.T, cq[q0:q0 + r])


@njit(cache=True)
def _push_down(dcq, dck, dcv, counts, offsets, p, num_levels, first_query):
    """(2') Coarse gradients to tokens: a mean's to each child by its share of the count, a sum's whole to each
    child, a first token's query's whole to the first child."""
    for level in range(num_levels - 1, 0, -1):
        here, below = offsets[level], offsets[level - 1]
        for row in range(p >> level):
            c = counts[here + row]
            if c > 0:
                for child in (below + 2 * row, below + 2 * row + 1):
                    share = counts[child] / c  # d(mean)/d(child mean) = the child's share of the count
                    q_share = (1.0 if child == below + 2 * row else 0.0) if first_query else share
                    dcq[child] += q_share * dcq[here + row]
                    dck[child] += share * dck[here + row]
                    dcv[child] += dcv[here + row]
