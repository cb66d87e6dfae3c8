"""H-Transformer-1D hierarchical attention: the executable specification.

Zhu & Soricut 2021, "H-Transformer-1D: Fast One-Dimensional Hierarchical
Attention for Sequences" (arXiv 2107.11906), sections 5-6: the attention
matrix as a hierarchical matrix. Level 0 is exact on the block-tridiagonal
band of ``block_size``-token blocks; level ``l`` covers the neighbouring
blocks of ``block_size · 2**l`` tokens that the finer levels leave out, with
coarsened queries and keys (means over ``2**l`` tokens) and coarsened values
(sums); the levels' products are
interpolated back to tokens and summed, and normalised by the same recursion
applied to a vector of ones (the paper's eqs. 31-32).

Equations, the coverage proof and the step numbers below are in
spec/hierarchical.md, "H-Transformer-1D".

Einsum letters: b batch, h query head, n block, q query in its block,
k key in its block, d head dim (of q and k), e value dim.
"""

from __future__ import annotations

import numpy as np

from ...core import registry
from ...core.precision import Numerics
from ...core.presets import FROM_PRESET
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads, sum_kv_heads
from ...core.softmax import masked_softmax
from .inputs import H1DInputs, Term


def h1d_attention(
    q, k, v, *,
    block_size, num_levels=None, causal=False, scale=None, padding=False, preset=None, row_max=FROM_PRESET,
    coarse_denominator=FROM_PRESET, finest_sibling=FROM_PRESET, coarse_queries=FROM_PRESET,
    denominator_eps=FROM_PRESET, neighbours=FROM_PRESET, precision=None, backend="reference") -> Result:
    """H-Transformer-1D attention: a hierarchical (H-)matrix approximation of softmax attention.

    Parameters
    ----------
    q : ndarray (B, Hq, N, D)
    k : ndarray (B, Hkv, N, D)
        ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
    v : ndarray (B, Hkv, N, Dv)
    block_size : int >= 1
        ``Nr``, tokens per level-0 block (and coarse tokens per block at every
        level). ``N`` must be ``block_size · 2**k`` unless ``padding``; even
        with ``neighbours="tridiagonal"`` and more than one level.
    num_levels : int >= 1, optional
        Levels, level 0 included. Default: until the coarsest level has two
        blocks, ``log2(N / block_size)`` (every pair covered); the
        ``"lucidrains"`` preset's non-causal default is one fewer.
    causal : bool
        Keep keys ``j <= i``: the diagonal blocks are masked triangular and
        only the neighbouring blocks before a block are kept.
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.
    padding : bool
        Pad the sequence at its end to ``block_size · 2**k`` with tokens that
        take no part: not in any mean, sum or count; their rows are dropped.
    preset : {None, "lucidrains"}
        ``"lucidrains"``: h-transformer-1d 0.1.9's ``HAttention1D`` (non-causal)
        or ``CausalHAttention1D`` (causal), defects included.
    row_max : {"shared", "per_level"}
        ``"shared"``: one softmax over the implied matrix (the paper);
        ``"per_level"``: each level's block rows are shifted by their own
        maximum before the levels are summed (lucidrains), so the result is not
        one softmax.
    coarse_denominator : {"counts", "ones"}
        What a coarse key adds to the normaliser: its token count ``2**l``,
        the coarsened vector of ones (the paper), or 1 (lucidrains).
    finest_sibling : bool
        Whether level 0 also covers each block's neighbours (the paper; lucidrains'
        causal class leaves its sibling out).
    coarse_queries : {"all", "last", "first"}
        What stands for a group of ``2**l`` queries at a level ``l >= 1``:
        its mean, for every token of it (``"all"``, the paper non-causal);
        its mean, for its last token only (``"last"``, lucidrains causal); its
        first token's query, for every token of it (``"first"``, the paper's
        authors' causal code: no later query is read).
    denominator_eps : float >= 0
        Added to the normaliser (lucidrains 1e-8); needs ``row_max="per_level"``.
    neighbours : {"tridiagonal", "siblings"}
        The blocks each block meets at every level: the blocks before and
        after it, less the pairs of adjacent half-blocks that the finer level
        covers (the paper); or only its sibling (lucidrains).

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv) float64; ``lse`` (B, Hq, N), the log-sum-exp of
        the implied logits, when the normalisation is the paper's (else None).
        ``aux`` is empty.
    """
    return registry.call_forward("h1d", locals())


# --------------------------------------------------------------------------
# Steps (1)-(7) of spec/hierarchical.md.
# --------------------------------------------------------------------------


def padded(x: np.ndarray, length: int) -> np.ndarray:
    """(1) ``x`` (B, H, N, D) with zero rows appended up to ``length``."""
    return np.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def group_sums(x: np.ndarray, level: int) -> np.ndarray:
    """(2) Sums of ``x`` (B, H, P, ...) over consecutive groups of ``2**level`` rows: (B, H, P / 2**level, ...)."""
    b, h, p = x.shape[:3]
    return x.reshape(b, h, p >> level, 1 << level, *x.shape[3:]).sum(axis=3)


def token_counts(x: H1DInputs, level: int) -> np.ndarray:
    """(2) Real (unpadded) tokens under each coarse token of ``level``: (P / 2**level,)."""
    real = (np.arange(x.padded_len) < x.shape.q_len).astype(np.float64)
    return real.reshape(-1, 1 << level).sum(axis=1)


def interpolated(x: np.ndarray, level: int) -> np.ndarray:
    """(5) The interpolation P: each coarse row of ``x`` (B, H, P / 2**level, ...) repeated for its ``2**level`` tokens."""
    return np.repeat(x, 1 << level, axis=2)


def to_blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    """(B, H, Pc, ...) -> (B, H, Pc / block_size, block_size, ...)."""
    return x.reshape(x.shape[0], x.shape[1], -1, block_size, *x.shape[3:])


def siblings(x: np.ndarray) -> np.ndarray:
    """Blocks (B, H, n, ...) reordered so that block ``2m`` holds block ``2m+1`` and vice versa (an involution)."""
    b, h, n = x.shape[:3]
    return x.reshape(b, h, n // 2, 2, *x.shape[3:])[:, :, :, ::-1].reshape(x.shape)


#: How far a term's key blocks are moved along the block axis (np.roll): block m holds block m - shift.
ROLLS = {"left": 1, "right": -1}


def term_keys(x: np.ndarray, term: Term, block_size: int) -> np.ndarray:
    """(3) The key-side blocks a term pairs with each query block: itself, its sibling, the block before or after.

    Before the first block and after the last, the blocks wrap around; :func:`term_allowed` masks them.
    """
    blocks = to_blocks(x, block_size)
    if term.keys == "sibling":
        return siblings(blocks)
    return np.roll(blocks, ROLLS[term.keys], axis=2) if term.keys in ROLLS else blocks


def own_blocks(g: np.ndarray, term: Term) -> np.ndarray:
    """(3') The inverse of :func:`term_keys` on blocks (B, H, n, ...): each key block's gradient back to its block."""
    if term.keys == "sibling":
        return siblings(g)
    return np.roll(g, -ROLLS[term.keys], axis=2) if term.keys in ROLLS else g


def term_allowed(x: H1DInputs, term: Term, key_counts: np.ndarray) -> np.ndarray:
    """(3) (n, q, k) bool: which pairs of a term's blocks are kept (a real key, a block that exists, causality,
    and at levels >= 1 not a pair of adjacent half-blocks, which level l - 1 covers)."""
    r = x.block_size
    allowed = term_keys(key_counts[None, None], term, r)[0, 0][:, None, :] > 0  # (n, 1, k)
    blocks = allowed.shape[0]
    allowed = np.broadcast_to(allowed, (blocks, r, r))
    block = np.arange(blocks)[:, None, None]
    rows, cols = np.arange(r)[:, None] < r // 2, np.arange(r)[None, :] < r // 2  # first halves
    coarse = term.level > 0
    if term.keys == "own" and x.causal:
        allowed = allowed & np.tri(r, dtype=bool)[None]
    elif term.keys == "sibling" and x.causal:  # only an odd block's sibling lies before it
        allowed = allowed & (block % 2 == 1)
    elif term.keys == "left":
        allowed = allowed & (block > 0) & ~(coarse & rows & ~cols)[None]
    elif term.keys == "right":
        allowed = allowed & (block < blocks - 1) & ~(coarse & ~rows & cols)[None]
    return allowed


def contributes(x: H1DInputs, term: Term) -> np.ndarray:
    """(5) (P,) bool: the tokens a term's coarse rows reach (all, or the last of each group for "last")."""
    if x.coarse_queries == "last" and term.level > 0:
        return (np.arange(x.padded_len) + 1) % (1 << term.level) == 0
    return np.ones(x.padded_len, dtype=bool)


def coarse_queries(x: H1DInputs, q: np.ndarray, level: int, per_token: np.ndarray) -> np.ndarray:
    """(2) The query standing for each group of ``2**level`` tokens: the group's mean, or its first token's."""
    return q[:, :, :: 1 << level] if x.coarse_queries == "first" else group_sums(q, level) / per_token


def forward(x: H1DInputs, num: Numerics) -> Result:
    """The reference backend: steps (1)-(7) in precision ``num``."""
    f = _forward_steps(x, num)
    n = x.shape.q_len
    return Result(out=f["out"][:, :, :n], lse=None if f["lse"] is None else f["lse"][:, :, :n], aux={})


def _forward_steps(x: H1DInputs, num: Numerics) -> dict:
    """Steps (1)-(7); returns every intermediate the VJP needs (rows up to the padded length P)."""
    group, p = x.shape.group, x.padded_len
    # (1) Pad to P = block_size · 2**k; padded rows are zero and are counted by no level.
    q = padded(num.load(x.q), p)  # (B, Hq, P, D)
    k = repeat_kv_heads(padded(num.load(x.k), p), group)  # (B, Hq, P, D)
    v = repeat_kv_heads(padded(num.load(x.v), p), group)  # (B, Hq, P, Dv)
    levels = []
    for level in range(x.num_levels):
        # (2) Coarsen: queries and keys are means over 2**level tokens, values (and ones) are sums.
        counts = token_counts(x, level)  # (P / 2**l,)
        per_token = np.maximum(counts, 1.0)[None, None, :, None]
        levels.append(dict(counts=counts,
                           q=num.store(coarse_queries(x, q, level, per_token)),  # (B, Hq, P / 2**l, D)
                           k=num.store(group_sums(k, level) / per_token),
                           v=num.store(group_sums(v, level))))  # (B, Hq, P / 2**l, Dv)  # fmt: skip
    terms = [_term_forward(x, term, levels[term.level], num) for term in x.terms()]
    # (6) Sum the interpolated levels under one shift per token row (shared), or as they are (per_level).
    shifts = np.stack([t["shift"] for t in terms])  # (T, B, Hq, P)
    top = shifts.max(axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    numerator, denominator = 0.0, 0.0
    for t in terms:
        factor = np.exp(t["shift"] - top) if x.row_max == "shared" else np.isfinite(t["shift"]).astype(float)
        t["factor"] = num.store(factor)  # (B, Hq, P)
        numerator = numerator + t["factor"][..., None] * t["y"]
        denominator = denominator + t["factor"] * t["a"]
    numerator, denominator = num.store(numerator), num.store(denominator + x.denominator_eps)
    # (7) Normalise: out = Y / (A + eps); a row that sees no key has out 0 (and lse -inf).
    has_key = denominator > 0
    out = num.store(numerator / np.where(has_key, denominator, 1.0)[..., None])  # (B, Hq, P, Dv)
    lse = None
    if x.defines_lse:
        with np.errstate(divide="ignore"):
            lse = num.store(np.where(has_key, top + np.log(np.where(has_key, denominator, 1.0)), -np.inf))
    return dict(v=v, levels=levels, terms=terms, denominator=denominator, has_key=has_key, out=out, lse=lse)


def _term_forward(x: H1DInputs, term: Term, coarse: dict, num: Numerics) -> dict:
    """Steps (3)-(5) for one term: its block products at coarse resolution, interpolated to token rows."""
    r = x.block_size
    q = to_blocks(coarse["q"], r)  # (B, Hq, n, q, D)
    k = term_keys(coarse["k"], term, r)  # (B, Hq, n, k, D)
    v = term_keys(coarse["v"], term, r)  # (B, Hq, n, k, Dv)
    weight = term_keys(coarse["counts"][None, None], term, r)[0, 0]  # (n, k): counts, the coarsened ones
    if x.coarse_denominator == "ones":
        weight = (weight > 0).astype(np.float64)
    allowed = term_allowed(x, term, coarse["counts"])  # (n, q, k)
    # (3) Coarse scores of the kept blocks.
    scores = num.store(x.scale * np.einsum("bhnqd,bhnkd->bhnqk", q, k, optimize=True))  # (B, Hq, n, q, k)
    # (4) Each block row's exponentials under its shift: E = exp(s - shift), from the masked softmax.
    weights, row_lse = masked_softmax(scores, allowed, num)  # (B, Hq, n, q, k), (B, Hq, n, q)
    shift = row_lse
    if x.row_max == "per_level":
        shift = np.max(np.where(allowed, scores, -np.inf), axis=-1)
    seen = np.isfinite(shift)
    exps = num.store(weights * np.where(seen, np.exp(row_lse - np.where(seen, shift, 0.0)), 0.0)[..., None])
    y = num.store(np.einsum("bhnqk,bhnke->bhnqe", exps, v, optimize=True))  # (B, Hq, n, q, Dv)
    a = num.store(np.einsum("bhnqk,nk->bhnq", exps, weight, optimize=True))  # (B, Hq, n, q)
    # (5) Interpolate to token rows; rows the term does not reach get shift -inf and nothing.
    reach = contributes(x, term)[None, None]  # (1, 1, P)
    flat = lambda t: interpolated(t.reshape(t.shape[0], t.shape[1], -1, *t.shape[4:]), term.level)  # noqa: E731
    return dict(term=term, scores=scores, allowed=allowed, exps=exps, weight=weight, shift_blocks=shift,
                shift=np.where(reach, flat(shift), -np.inf), y=flat(y) * reach[..., None], a=flat(a) * reach)  # fmt: skip


h1d_attention_vjp = registry.vjp_function(
    h1d_attention, "h1d", grads="""    ``q``, ``k``, ``v`` (shapes of the inputs). With ``row_max="per_level"``
    a block row's maximum passes its gradient to the first key attaining it.
    Padded rows contribute 0.""",
)


def vjp(x: H1DInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (7')-(1') in precision ``num``."""
    f = _forward_steps(x, num)
    p, n = x.padded_len, x.shape.q_len
    dout = padded(num.load(cotangents.dout), p)  # (B, Hq, P, Dv)
    # (7') out = Y / (A + eps); lse = shift + log A.
    denominator = np.where(f["has_key"], f["denominator"], 1.0)
    d_numerator = num.store(np.where(f["has_key"][..., None], dout / denominator[..., None], 0.0))  # (B, Hq, P, Dv)
    d_denominator = -np.sum(d_numerator * f["out"], axis=-1)  # (B, Hq, P)
    if cotangents.dlse is not None:
        dlse = np.pad(num.load(cotangents.dlse), ((0, 0), (0, 0), (0, p - n)))
        d_denominator = d_denominator + np.where(f["has_key"], dlse / denominator, 0.0)
    d_denominator = num.store(d_denominator)
    coarse_grads = [dict(q=0.0, k=0.0, v=0.0) for _ in range(x.num_levels)]
    for t in f["terms"]:
        # (6') Y = sum_t factor_t P(y_t): each token row's share goes back to its coarse row.
        # (With one shared shift the result does not depend on the shift, so it passes no gradient.)
        level = t["term"].level
        dy = group_sums(t["factor"][..., None] * d_numerator, level)  # (B, Hq, P / 2**l, Dv)
        da = group_sums(t["factor"] * d_denominator, level)  # (B, Hq, P / 2**l)
        dq, dk, dv = _term_vjp(x, t, f["levels"][level], to_blocks(dy, x.block_size), to_blocks(da, x.block_size), num)
        grads = coarse_grads[level]
        grads["q"], grads["k"], grads["v"] = grads["q"] + dq, grads["k"] + dk, grads["v"] + dv
    # (2') Means pass 1 / count of the gradient to each real token, sums pass all of it, a first token's query all
    # of it to that token.
    real = (np.arange(p) < n)[None, None, :, None]
    first = (np.arange(p) % (1 << np.arange(x.num_levels))[:, None] == 0)[:, None, None, :, None]  # (L, 1, 1, P, 1)
    dq, dk, dv = 0.0, 0.0, 0.0
    for level, grads in enumerate(coarse_grads):
        per_token = np.maximum(f["levels"][level]["counts"], 1.0)[None, None, :, None]
        if x.coarse_queries == "first":
            dq = dq + interpolated(grads["q"], level) * first[level] * real
        else:
            dq = dq + interpolated(grads["q"] / per_token, level) * real
        dk = dk + interpolated(grads["k"] / per_token, level) * real
        dv = dv + interpolated(grads["v"], level) * real
    group = x.shape.group
    # (1') Unpad; GQA: a kv head's gradient is the sum over the query heads that read it.
    return Grads(q=np.asarray(dq, np.float64)[:, :, :n],
                 k=sum_kv_heads(np.asarray(dk, np.float64)[:, :, :n], group),
                 v=sum_kv_heads(np.asarray(dv, np.float64)[:, :, :n], group))  # fmt: skip


def _term_vjp(x: H1DInputs, t: dict, coarse: dict, dy: np.ndarray, da: np.ndarray, num: Numerics):
    """(5')-(3') for one term: gradients of its coarse q, k, v (B, Hq, P / 2**l, .) from dy (B, Hq, n, q, Dv), da."""
    r, term = x.block_size, t["term"]
    q = to_blocks(coarse["q"], r)  # (B, Hq, n, q, D)
    k = term_keys(coarse["k"], term, r)  # (B, Hq, n, k, D)
    v = term_keys(coarse["v"], term, r)  # (B, Hq, n, k, Dv)
    exps = t["exps"]  # (B, Hq, n, q, k)
    # (4') y = E v, a = E w with E = exp(s - shift).
    d_exps = num.store(np.einsum("bhnqe,bhnke->bhnqk", dy, v, optimize=True) + da[..., None] * t["weight"][:, None])
    dv = num.store(np.einsum("bhnqk,bhnqe->bhnke", exps, dy, optimize=True))  # (B, Hq, n, k, Dv)
    d_scores = exps * d_exps  # (B, Hq, n, q, k)
    if x.row_max == "per_level":  # the shift is the row's maximum: -sum(E dE) goes to its first argmax
        first = np.argmax(np.where(t["allowed"], t["scores"], -np.inf), axis=-1)[..., None]  # (B, Hq, n, q, 1)
        d_shift = -d_scores.sum(axis=-1, keepdims=True)
        np.put_along_axis(d_scores, first, np.take_along_axis(d_scores, first, -1) + d_shift, -1)
    d_scores = num.store(d_scores)
    # (3') s = scale · q kᵀ; the key blocks' gradients return to their own blocks.
    dq = num.store(x.scale * np.einsum("bhnqk,bhnkd->bhnqd", d_scores, k, optimize=True))
    dk = num.store(x.scale * np.einsum("bhnqk,bhnqd->bhnkd", d_scores, q, optimize=True))
    unblock = lambda g: g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])  # noqa: E731
    return unblock(dq), unblock(own_blocks(dk, term)), unblock(own_blocks(dv, term))
