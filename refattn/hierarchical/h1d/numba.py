"""H-Transformer-1D on CPU: the hierarchical matrix in Numba, O(N log N) time and O(N) memory.

The same function as :mod:`refattn.hierarchical.h1d.reference`, with its
step numbers (spec/hierarchical.md). One work item is one (batch, query
head); items run in parallel. An item builds the coarse pyramid of its
queries, keys (means) and values (sums) level by level (2), then for each
term (level 0's diagonal and siblings, each coarser level's siblings) and
query block forms one (block × block) tile of scores with ``np.dot`` (3),
shifts each row by its maximum over the kept keys (4) and keeps, per coarse
row, the shift, ``y = E v`` and ``a = E w`` (O(N) numbers over all levels).
Each token row then sums the terms that reach it (5)-(6), under one shared
shift (the paper) or as they are (``row_max="per_level"``), and divides (7).

Time: every level costs (its coarse length) · block · (D + Dv), and the
coarse lengths halve, so about 4 N · block · (D + Dv) in all, plus
N · levels · Dv for the sums at token rows: O(N log N). Memory: the pyramid
and the per-term results, about 4 N (D + Dv) numbers per work item.

The VJP recomputes the forward's per-term results (``saved`` holds only
``out`` and ``lse``), takes each token row's cotangents back to the coarse
rows (6'), redoes every tile to get ``dE = dy vᵀ + da wᵀ`` and
``dS = E ∘ dE`` (plus, for ``per_level``, the row's ``-sum(E dE)`` at its
first maximal key) (4'), and its products with the coarse q, k (3'); the
coarse gradients go back to tokens by pushing sums down the pyramid (2').
Keys and values get one gradient per query head, summed over each GQA group
at the end (no two items write the same memory).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from .inputs import H1DInputs


def _arguments(x: H1DInputs) -> tuple:
    """The scalars and term tables every kernel takes."""
    terms = x.terms()
    levels = np.array([t.level for t in terms], np.int64)
    sibling = np.array([t.sibling for t in terms], np.bool_)
    dtype = compute_dtype(x.q)
    return (x.shape.q_len, x.padded_len, x.block_size, x.num_levels, levels, sibling, x.causal,
            x.row_max == "shared", x.coarse_denominator == "counts", x.coarse_queries == "last",
            dtype.type(x.denominator_eps), dtype.type(x.scale), x.defines_lse)  # fmt: skip


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
# (1)-(2) The pyramid: offsets of each level's coarse rows in one array.
# --------------------------------------------------------------------------


@njit(cache=True)
def _level_offsets(p, num_levels):
    offsets = np.zeros(num_levels + 1, np.int64)
    for level in range(num_levels):
        offsets[level + 1] = offsets[level] + (p >> level)
    return offsets


@njit(cache=True)
def _pyramid(qf, kf, vf, n, p, num_levels, offsets, dtype):
    """(1)-(2) Coarse queries and keys (means over real tokens), values (sums) and token counts, every level."""
    total = offsets[num_levels]
    cq = np.zeros((total, qf.shape[1]), dtype)
    ck = np.zeros((total, kf.shape[1]), dtype)
    cv = np.zeros((total, vf.shape[1]), dtype)
    counts = np.zeros(total, dtype)
    cq[:n] = qf
    ck[:n] = kf
    cv[:n] = vf
    counts[:n] = 1.0
    for level in range(1, num_levels):
        here, below = offsets[level], offsets[level - 1]
        for row in range(p >> level):
            a, b = below + 2 * row, below + 2 * row + 1
            c = counts[a] + counts[b]
            counts[here + row] = c
            cv[here + row] = cv[a] + cv[b]
            if c > 0:  # the mean of two means is their count-weighted mean
                cq[here + row] = (counts[a] * cq[a] + counts[b] * cq[b]) / c
                ck[here + row] = (counts[a] * ck[a] + counts[b] * ck[b]) / c
    return cq, ck, cv, counts


@njit(cache=True)
def _block_tile(cq, ck, counts, q0, k0, r, scale, causal_diagonal, skip, dtype):
    """(3)-(4) A (r × r) tile: exps E = exp(s - m) of kept pairs, row maxima m (-inf: none kept), first argmax."""
    s = scale * np.dot(cq[q0:q0 + r], ck[k0:k0 + r].T)
    exps = np.zeros((r, r), dtype)
    shift = np.full(r, -np.inf, dtype)
    first = np.zeros(r, np.int64)
    if skip:
        return s, exps, shift, first
    for i in range(r):
        for j in range(r):
            if counts[k0 + j] > 0 and not (causal_diagonal and j > i) and s[i, j] > shift[i]:
                shift[i] = s[i, j]
                first[i] = j
        if np.isfinite(shift[i]):
            for j in range(r):
                if counts[k0 + j] > 0 and not (causal_diagonal and j > i):
                    exps[i, j] = np.exp(s[i, j] - shift[i])
    return s, exps, shift, first


@njit(cache=True)
def _key_weights(counts, k0, r, counts_den, dtype):
    w = np.zeros(r, dtype)
    for j in range(r):
        c = counts[k0 + j]
        w[j] = c if counts_den else (1.0 if c > 0 else 0.0)
    return w


@njit(cache=True)
def _term_offsets(p, levels):
    offsets = np.zeros(levels.shape[0] + 1, np.int64)
    for t in range(levels.shape[0]):
        offsets[t + 1] = offsets[t] + (p >> levels[t])
    return offsets


@njit(cache=True)
def _terms(cq, ck, cv, counts, offsets, p, r, levels, sibling, causal, counts_den, scale, dtype):
    """(3)-(4) Every term's per-coarse-row shift, y = E v and a = E w."""
    term_offsets = _term_offsets(p, levels)
    total = term_offsets[levels.shape[0]]
    shifts = np.full(total, -np.inf, dtype)
    ys = np.zeros((total, cv.shape[1]), dtype)
    as_ = np.zeros(total, dtype)
    for t in range(levels.shape[0]):
        base, row0 = offsets[levels[t]], term_offsets[t]
        for block in range((p >> levels[t]) // r):
            key_block = block ^ 1 if sibling[t] else block
            skip = causal and sibling[t] and block % 2 == 0
            q0, k0 = base + block * r, base + key_block * r
            _, exps, shift, _ = _block_tile(cq, ck, counts, q0, k0, r, scale, causal and not sibling[t], skip, dtype)
            w = _key_weights(counts, k0, r, counts_den, dtype)
            o = row0 + block * r
            shifts[o:o + r] = shift
            ys[o:o + r] = np.dot(exps, cv[k0:k0 + r])
            as_[o:o + r] = np.dot(exps, w)
    return term_offsets, shifts, ys, as_


@njit(cache=True)
def _reaches(i, level, last_rule):
    return not (last_rule and level > 0 and (i + 1) % (1 << level) != 0)


@njit(cache=True)
def _row(i, levels, term_offsets, shifts, ys, as_, shared, last_rule, eps, factors, dtype):
    """(5)-(7) Token row i: its terms' factors (into ``factors``), the summed y and a (with eps), and the shift."""
    top = -np.inf
    for t in range(levels.shape[0]):
        if _reaches(i, levels[t], last_rule):
            top = max(top, shifts[term_offsets[t] + (i >> levels[t])])
    base = top if np.isfinite(top) else 0.0
    y = np.zeros(ys.shape[1], dtype)
    a = dtype(eps)
    for t in range(levels.shape[0]):
        row = term_offsets[t] + (i >> levels[t])
        f = dtype(0.0)
        if _reaches(i, levels[t], last_rule) and np.isfinite(shifts[row]):
            f = dtype(np.exp(shifts[row] - base)) if shared else dtype(1.0)
        factors[t] = f
        if f != 0.0:
            y += f * ys[row]
            a += f * as_[row]
    return y, a, base


@njit(parallel=True, cache=True)
def _forward_kernel(q, k, v, out, lse, n, p, r, num_levels, levels, sibling, causal, shared, counts_den,
                    last_rule, eps, scale, defines_lse):  # fmt: skip
    batch, heads = q.shape[:2]
    group = heads // k.shape[1]
    dtype = q.dtype.type
    offsets = _level_offsets(p, num_levels)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        cq, ck, cv, counts = _pyramid(q[b, h], k[b, h // group], v[b, h // group], n, p, num_levels, offsets, dtype)
        term_offsets, shifts, ys, as_ = _terms(cq, ck, cv, counts, offsets, p, r, levels, sibling, causal, counts_den,
                                               scale, dtype)  # fmt: skip
        factors = np.zeros(levels.shape[0], dtype)
        for i in range(n):
            y, a, top = _row(i, levels, term_offsets, shifts, ys, as_, shared, last_rule, eps, factors, dtype)
            if a > 0:
                out[b, h, i] = y / a
                lse[b, h, i] = top + np.log(a) if defines_lse else 0.0
            else:
                out[b, h, i] = 0.0
                lse[b, h, i] = -np.inf


@njit(parallel=True, cache=True)
def _backward_kernel(q, k, v, dout, dlse, dq, dk, dv, n, p, r, num_levels, levels, sibling, causal, shared,
                     counts_den, last_rule, eps, scale, defines_lse):  # fmt: skip
    batch, heads = q.shape[:2]
    group = heads // k.shape[1]
    dtype = q.dtype.type
    offsets = _level_offsets(p, num_levels)
    n_terms = levels.shape[0]
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        cq, ck, cv, counts = _pyramid(q[b, h], k[b, h // group], v[b, h // group], n, p, num_levels, offsets, dtype)
        term_offsets, shifts, ys, as_ = _terms(cq, ck, cv, counts, offsets, p, r, levels, sibling, causal, counts_den,
                                               scale, dtype)  # fmt: skip
        # (7')-(6') Token rows' cotangents of Y and A, taken back to each term's coarse rows.
        dys = np.zeros(ys.shape, dtype)
        das = np.zeros(as_.shape, dtype)
        factors = np.zeros(n_terms, dtype)
        for i in range(n):
            y, a, _ = _row(i, levels, term_offsets, shifts, ys, as_, shared, last_rule, eps, factors, dtype)
            if not a > 0:
                continue
            d_y = dout[b, h, i] / a
            d_a = -np.dot(d_y, y) / a
            if defines_lse:
                d_a += dlse[b, h, i] / a
            for t in range(n_terms):
                if factors[t] != 0.0:
                    row = term_offsets[t] + (i >> levels[t])
                    dys[row] += factors[t] * d_y
                    das[row] += factors[t] * d_a
        # (4')-(3') Each tile again: dE = dy vᵀ + da wᵀ, dS = E ∘ dE (+ the row maximum's share), then q kᵀ's products.
        dcq = np.zeros(cq.shape, dtype)
        dck = np.zeros(ck.shape, dtype)
        dcv = np.zeros(cv.shape, dtype)
        for t in range(n_terms):
            base, row0 = offsets[levels[t]], term_offsets[t]
            for block in range((p >> levels[t]) // r):
                key_block = block ^ 1 if sibling[t] else block
                skip = causal and sibling[t] and block % 2 == 0
                if skip:
                    continue
                q0, k0, o = base + block * r, base + key_block * r, row0 + block * r
                _, exps, _, first = _block_tile(cq, ck, counts, q0, k0, r, scale, causal and not sibling[t], False, dtype)
                w = _key_weights(counts, k0, r, counts_den, dtype)
                d_exps = np.dot(dys[o:o + r], cv[k0:k0 + r].T)
                for i in range(r):
                    d_exps[i] += das[o + i] * w
                dcv[k0:k0 + r] += np.dot(exps.T, dys[o:o + r])
                d_scores = exps * d_exps
                if not shared:
                    for i in range(r):
                        d_scores[i, first[i]] -= d_scores[i].sum()
                dcq[q0:q0 + r] += scale * np.dot(d_scores, ck[k0:k0 + r])
                dck[k0:k0 + r] += scale * np.dot(d_scores.T, cq[q0:q0 + r])
        # (2') Means: a coarse gradient / count is a gradient of the sum; push sums down the pyramid.
        for level in range(num_levels - 1, 0, -1):
            here, below = offsets[level], offsets[level - 1]
            for row in range(p >> level):
                c = counts[here + row]
                if c > 0:
                    for child in (below + 2 * row, below + 2 * row + 1):
                        share = counts[child] / c  # d(sum)/d(child mean) = count of the child
                        dcq[child] += share * dcq[here + row]
                        dck[child] += share * dck[here + row]
                        dcv[child] += dcv[here + row]
        dq[b, h] = dcq[:n]
        dk[b, h] = dck[:n]
        dv[b, h] = dcv[:n]
