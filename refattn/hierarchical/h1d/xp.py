"""H-Transformer-1D over an array namespace ``xp`` (NumPy or CuPy): the GPU path (spec/hierarchical.md).

The hierarchy is already block-batched: each term of each level is one batched
product of (block_size × block_size) blocks, (B, Hq, n, r, r), so a level of
``P / 2**l`` coarse tokens costs O(P · r) and the whole hierarchy O(P · r · L)
with L ≤ log2(P / r) levels; nothing (N, N) is formed. The products are
``xp.matmul`` calls (cuBLAS under CuPy). The masks and token counts, which
depend on the shape alone, are built on the host by the reference's own
functions and moved once. Inputs compute in float32 when they are float32 or
narrower, in float64 otherwise.

Einsum letters (in comments): b batch, h query head, n block, q query in its
block, k key in its block, d head dim, e value dim.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.shapes import sum_kv_heads
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from . import reference as ref
from .inputs import H1DInputs, Term

#: The shared test's tile sizes (tests/test_xp_path.py patches them); h1d's tiles are its own blocks of
#: ``block_size``, which the call fixes, so these are not read.
BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K


def forward(x: H1DInputs, xp) -> Result:
    """Steps (1)-(7), every level's terms batched over blocks."""
    f = _forward_steps(x, xp)
    n = x.shape.q_len
    return Result(out=f["out"][:, :, :n], lse=None if f["lse"] is None else f["lse"][:, :, :n], aux={})


def _padded(a, length: int, xp):
    """(1) ``a`` (B, H, N, D) with zero rows appended up to ``length``."""
    return xp.pad(a, ((0, 0), (0, 0), (0, length - a.shape[2]), (0, 0)))


def _interpolated(a, level: int, xp):
    """(5) Each coarse row of ``a`` (B, H, P / 2**level, ...) repeated for its ``2**level`` tokens."""
    return xp.repeat(a, 1 << level, axis=2)


def _term_keys(a, term: Term, block_size: int, xp):
    """(3) The key-side blocks a term pairs with each query block (the reference's ``term_keys`` over ``xp``)."""
    blocks = ref.to_blocks(a, block_size)
    if term.keys == "sibling":
        return ref.siblings(blocks)
    return xp.roll(blocks, ref.ROLLS[term.keys], axis=2) if term.keys in ref.ROLLS else blocks


def _own_blocks(g, term: Term, xp):
    """(3') The inverse of :func:`_term_keys` on blocks (B, H, n, ...)."""
    if term.keys == "sibling":
        return ref.siblings(g)
    return xp.roll(g, -ref.ROLLS[term.keys], axis=2) if term.keys in ref.ROLLS else g


def _forward_steps(x: H1DInputs, xp) -> dict:
    """Steps (1)-(7); returns every intermediate the VJP needs (rows up to the padded length P)."""
    s, p, dtype = x.shape, x.padded_len, compute_dtype(x.q.dtype)
    # (1) Pad to P = block_size · 2**k; GQA: each query head reads its kv head.
    q = _padded(xp.asarray(x.q, dtype=dtype), p, xp)  # (B, Hq, P, D)
    k = xp.repeat(_padded(xp.asarray(x.k, dtype=dtype), p, xp), s.group, axis=1)  # (B, Hq, P, D)
    v = xp.repeat(_padded(xp.asarray(x.v, dtype=dtype), p, xp), s.group, axis=1)  # (B, Hq, P, Dv)
    levels = []
    for level in range(x.num_levels):
        # (2) Coarsen: queries and keys are means over 2**level tokens, values are sums.
        counts = ref.token_counts(x, level)  # (P / 2**l,) on the host
        per_token = xp.asarray(np.maximum(counts, 1.0)[None, None, :, None], dtype=dtype)
        levels.append(dict(counts=counts,
                           q=ref.coarse_queries(x, q, level, per_token),  # (B, Hq, P / 2**l, D)
                           k=ref.group_sums(k, level) / per_token,
                           v=ref.group_sums(v, level)))  # (B, Hq, P / 2**l, Dv)  # fmt: skip
    terms = [_term_forward(x, term, levels[term.level], xp, dtype) for term in x.terms()]
    # (6) Sum the interpolated levels under one shift per token row (shared), or as they are (per_level).
    top = xp.stack([t["shift"] for t in terms]).max(axis=0)  # (B, Hq, P)
    top = xp.where(xp.isfinite(top), top, 0.0)
    numerator, denominator = 0.0, 0.0
    for t in terms:
        seen = xp.isfinite(t["shift"])
        t["factor"] = xp.exp(t["shift"] - top) if x.row_max == "shared" else seen.astype(dtype)  # (B, Hq, P)
        numerator = numerator + t["factor"][..., None] * t["y"]
        denominator = denominator + t["factor"] * t["a"]
    denominator = denominator + x.denominator_eps
    # (7) Normalise: out = Y / (A + eps); a row that sees no key has out 0 (and lse -inf).
    has_key = denominator > 0
    out = numerator / xp.where(has_key, denominator, 1.0)[..., None]  # (B, Hq, P, Dv)
    lse = None
    if x.defines_lse:
        with np.errstate(divide="ignore"):
            lse = xp.where(has_key, top + xp.log(xp.where(has_key, denominator, 1.0)), -np.inf)
    return dict(levels=levels, terms=terms, denominator=denominator, has_key=has_key, out=out, lse=lse)


def _term_forward(x: H1DInputs, term: Term, coarse: dict, xp, dtype) -> dict:
    """Steps (3)-(5) for one term: its block products at coarse resolution, interpolated to token rows."""
    r = x.block_size
    q = ref.to_blocks(coarse["q"], r)  # (B, Hq, n, q, D)
    k = _term_keys(coarse["k"], term, r, xp)  # (B, Hq, n, k, D)
    v = _term_keys(coarse["v"], term, r, xp)  # (B, Hq, n, k, Dv)
    weight = ref.term_keys(coarse["counts"][None, None], term, r)[0, 0]  # (n, k): counts, the coarsened ones
    if x.coarse_denominator == "ones":
        weight = (weight > 0).astype(np.float64)
    allowed = xp.asarray(ref.term_allowed(x, term, coarse["counts"]))  # (n, q, k)
    # (3) Coarse scores of the kept blocks: s = scale · q kᵀ.
    scores = x.scale * xp.matmul(q, xp.swapaxes(k, -1, -2))  # (B, Hq, n, q, k)
    # (4) Each block row's exponentials under its shift, E = exp(s - shift): the row's log-sum-exp (one
    # softmax) or its maximum (per_level).
    masked = xp.where(allowed, scores, -np.inf)
    row_max = masked.max(axis=-1)  # (B, Hq, n, q)
    seen = xp.isfinite(row_max)
    exps = xp.exp(masked - xp.where(seen, row_max, 0.0)[..., None])
    shift = row_max
    if x.row_max == "shared":
        total = exps.sum(axis=-1)
        exps = exps / xp.where(seen, total, 1.0)[..., None]
        with np.errstate(divide="ignore"):
            shift = xp.where(seen, row_max + xp.log(xp.where(seen, total, 1.0)), -np.inf)
    weight = xp.asarray(weight, dtype=dtype)
    y = xp.matmul(exps, v)  # (B, Hq, n, q, Dv)
    a = (exps * weight[:, None, :]).sum(axis=-1)  # (B, Hq, n, q)
    # (5) Interpolate to token rows; rows the term does not reach get shift -inf and nothing.
    reach = xp.asarray(ref.contributes(x, term))[None, None]  # (1, 1, P)
    flat = lambda t: _interpolated(t.reshape(t.shape[0], t.shape[1], -1, *t.shape[4:]), term.level, xp)  # noqa: E731
    return dict(term=term, scores=scores, allowed=allowed, exps=exps, weight=weight,
                shift=xp.where(reach, flat(shift), -np.inf),
                y=flat(y) * reach[..., None], a=flat(a) * reach)  # fmt: skip


def vjp(x: H1DInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (7')-(1'); the forward is recomputed (its intermediates are the hierarchy's terms)."""
    f = _forward_steps(x, xp)
    p, n, dtype = x.padded_len, x.shape.q_len, compute_dtype(x.q.dtype)
    dout = _padded(xp.asarray(cotangents.dout, dtype=dtype), p, xp)  # (B, Hq, P, Dv)
    # (7') out = Y / (A + eps); lse = shift + log A.
    denominator = xp.where(f["has_key"], f["denominator"], 1.0)
    d_numerator = xp.where(f["has_key"][..., None], dout / denominator[..., None], 0.0)  # (B, Hq, P, Dv)
    d_denominator = -(d_numerator * f["out"]).sum(axis=-1)  # (B, Hq, P)
    if cotangents.dlse is not None:
        dlse = xp.pad(xp.asarray(cotangents.dlse, dtype=dtype), ((0, 0), (0, 0), (0, p - n)))
        d_denominator = d_denominator + xp.where(f["has_key"], dlse / denominator, 0.0)
    coarse_grads = [dict(q=0.0, k=0.0, v=0.0) for _ in range(x.num_levels)]
    for t in f["terms"]:
        # (6') Y = Σ_t factor_t P(y_t): each token row's share goes back to its coarse row (a shared shift
        # passes no gradient: the result does not depend on it).
        level = t["term"].level
        dy = ref.group_sums(t["factor"][..., None] * d_numerator, level)  # (B, Hq, P / 2**l, Dv)
        da = ref.group_sums(t["factor"] * d_denominator, level)  # (B, Hq, P / 2**l)
        coarse = f["levels"][level]
        dq, dk, dv = _term_vjp(x, t, coarse, ref.to_blocks(dy, x.block_size), ref.to_blocks(da, x.block_size), xp)
        grads = coarse_grads[level]
        grads["q"], grads["k"], grads["v"] = grads["q"] + dq, grads["k"] + dk, grads["v"] + dv
    # (2') Means pass 1 / count of the gradient to each real token, sums all of it, a first token's query all
    # of it to that token.
    real = xp.asarray((np.arange(p) < n)[None, None, :, None])
    dq, dk, dv = 0.0, 0.0, 0.0
    for level, grads in enumerate(coarse_grads):
        per_token = xp.asarray(np.maximum(f["levels"][level]["counts"], 1.0)[None, None, :, None], dtype=dtype)
        if x.coarse_queries == "first":
            first = xp.asarray((np.arange(p) % (1 << level) == 0)[None, None, :, None])
            dq = dq + _interpolated(grads["q"], level, xp) * (first & real)
        else:
            dq = dq + _interpolated(grads["q"] / per_token, level, xp) * real
        dk = dk + _interpolated(grads["k"] / per_token, level, xp) * real
        dv = dv + _interpolated(grads["v"], level, xp) * real
    group = x.shape.group
    # (1') Unpad; GQA: a kv head's gradient is the sum over the query heads that read it.
    return Grads(q=dq[:, :, :n], k=sum_kv_heads(dk[:, :, :n], group), v=sum_kv_heads(dv[:, :, :n], group))


def _term_vjp(x: H1DInputs, t: dict, coarse: dict, dy, da, xp):
    """(5')-(3') for one term: gradients of its coarse q, k, v (B, Hq, P / 2**l, .) from dy (B, Hq, n, q, Dv), da."""
    r, term = x.block_size, t["term"]
    q = ref.to_blocks(coarse["q"], r)  # (B, Hq, n, q, D)
    k = _term_keys(coarse["k"], term, r, xp)  # (B, Hq, n, k, D)
    v = _term_keys(coarse["v"], term, r, xp)  # (B, Hq, n, k, Dv)
    exps = t["exps"]  # (B, Hq, n, q, k)
    # (4') y = E v, a = E w with E = exp(s - shift).
    d_exps = xp.matmul(dy, xp.swapaxes(v, -1, -2)) + da[..., None] * t["weight"][:, None]
    dv = xp.matmul(xp.swapaxes(exps, -1, -2), dy)  # (B, Hq, n, k, Dv)
    d_scores = exps * d_exps  # (B, Hq, n, q, k)
    if x.row_max == "per_level":  # the shift is the row's maximum: -Σ E dE goes to its first argmax
        first = xp.argmax(xp.where(t["allowed"], t["scores"], -np.inf), axis=-1)  # (B, Hq, n, q)
        at_first = xp.arange(r) == first[..., None]  # (B, Hq, n, q, k)
        d_scores = d_scores - at_first * d_scores.sum(axis=-1, keepdims=True)
    # (3') s = scale · q kᵀ; the key blocks' gradients return to their own blocks.
    dq = x.scale * xp.matmul(d_scores, k)  # (B, Hq, n, q, D)
    dk = x.scale * xp.matmul(xp.swapaxes(d_scores, -1, -2), q)  # (B, Hq, n, k, D)
    unblock = lambda g: g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])  # noqa: E731
    return unblock(dq), unblock(_own_blocks(dk, term, xp)), unblock(_own_blocks(dv, term, xp))
