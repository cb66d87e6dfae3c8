"""Hypothesis strategies of H-Transformer-1D problems: block sizes, depths, level counts, causal, padding, the
lucidrains preset and each of its parameters on its own (row maxima, coarse denominators, the finest level's
neighbours, coarse queries, the denominator's eps, siblings or tridiagonal neighbours).

Sizes shrink toward one batch element, one head, blocks of one token, one
block, the default level count and the paper's normalisation. Lengths are
``block_size · 2**k``, or any length with ``padding`` (padded to the next
one). ``Nq == Nk`` (one hierarchy over one sequence), GQA allowed. With
tridiagonal neighbours an odd block size has a single level (the coarse
levels leave out pairs of adjacent half-blocks).

With ``row_max="per_level"`` each block row of each level is shifted by its
maximum coarse score, and the gradient of that maximum goes to the first key
attaining it: a discrete decision. Draws are redrawn, then rejected, until
every such decision has a margin (:func:`row_max_margins`) of at least
:func:`refattn.strategies.tie_margin` of the precision under test.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import reject
from hypothesis import strategies as st

from ...core.presets import FROM_PRESET
from ...strategies import VALUE_SCALES, MechanismProblem, generators, random_qkv, shapes, tie_margin
from .inputs import (COARSE_DENOMINATORS, COARSE_QUERIES, NEIGHBOURS, PRESET_NAMES, ROW_MAXIMA, check_h1d_inputs,
                     preset_levels, preset_values)  # fmt: skip
from .reference import coarse_queries, group_sums, term_allowed, term_keys, to_blocks

HEAD_DIMS = (1, 3, 8, 17)
MAX_BLOCK = 4
MAX_DEPTH = 3  # at most 2**3 blocks
#: With ``padding``, any length up to this (padded to at most 32 tokens).
MAX_PADDED_LEN = 24
#: ``denominator_eps`` with ``row_max="per_level"``: none, lucidrains' 1e-8, one that shows.
EPSILONS = (0.0, 1e-8, 0.5)
#: Redraws of q and k before a draw whose maxima are too close to ties is rejected.
MAX_DRAWS = 20
#: The parameters a preset sets (inputs.preset_values).
PRESET_PARAMETERS = ("row_max", "coarse_denominator", "finest_sibling", "coarse_queries", "denominator_eps",
                     "neighbours")  # fmt: skip


def row_max_margins(q, k, v, **params) -> np.ndarray:
    """How far each per-level row maximum is from a tie, relative to its rounding scale (1-d, float64).

    For every level, block row and real coarse query, the gap between the
    largest and the second-largest kept coarse score, divided by the largest
    ``scale · Σ_d |q|_d mean|k|_d`` over the row's kept keys (``|q|`` coarsened
    as the queries are, means of absolute values for the keys: a bound on how
    far rounding the inputs and the means can move a score, in unit
    roundoffs). Rows with one kept key hold no decision and give no margin;
    nor does ``row_max="shared"``.
    """
    arguments = {name: FROM_PRESET for name in PRESET_PARAMETERS}
    arguments.update(num_levels=None, causal=False, scale=None, padding=False, preset=None)
    x = check_h1d_inputs(q, k, v, **{**arguments, **params})
    if x.row_max != "per_level":
        return np.zeros(0)
    p, r = x.padded_len, x.block_size
    group = x.shape.group
    padded = lambda a: np.pad(a, ((0, 0), (0, 0), (0, p - a.shape[2]), (0, 0)))  # noqa: E731
    q, k = padded(x.q), np.repeat(padded(x.k), group, axis=1)  # (B, Hq, P, D)
    margins = [np.zeros(0)]
    for term in x.terms() if r > 1 else ():  # blocks of one token: one key per row, no decision
        real = (np.arange(p) < x.shape.q_len).astype(np.float64).reshape(-1, 1 << term.level).sum(axis=1)
        per_token = np.maximum(real, 1.0)[None, None, :, None]
        coarse_q, size_q = (coarse_queries(x, a, term.level, per_token) for a in (q, np.abs(q)))
        coarse_k, size_k = (group_sums(a, term.level) / per_token for a in (k, np.abs(k)))
        scores = x.scale * np.einsum("bhnqd,bhnkd->bhnqk", to_blocks(coarse_q, r), term_keys(coarse_k, term, r))
        sizes = x.scale * np.einsum("bhnqd,bhnkd->bhnqk", to_blocks(size_q, r), term_keys(size_k, term, r))
        allowed = term_allowed(x, term, real)  # (n, q, k)
        decided = (allowed.sum(axis=-1) >= 2) & (to_blocks(real[None, None, :, None], r)[0, 0, :, :, 0] > 0)
        top_two = np.sort(np.where(allowed, scores, -np.inf), axis=-1)[..., -2:]  # (B, Hq, n, q, 2)
        size = np.max(np.where(allowed, sizes, 0.0), axis=-1)
        with np.errstate(invalid="ignore"):  # rows with fewer than two kept keys: inf - inf, left out below
            gap = (top_two[..., 1] - top_two[..., 0]) / np.maximum(size, np.finfo(float).tiny)
        margins.append(gap[:, :, decided])
    return np.concatenate([m.ravel() for m in margins])


def padded_blocks(n: int, block_size: int) -> int:
    """Blocks of the padded sequence: the smallest power of two with ``block_size · blocks >= n``."""
    blocks = 1
    while blocks * block_size < n:
        blocks *= 2
    return blocks


@st.composite
def preset_parameters(draw) -> dict:
    """Every parameter a preset sets, given explicitly (consistent: an eps only with per-level maxima)."""
    row_max = draw(st.sampled_from(ROW_MAXIMA))
    return dict(row_max=row_max, coarse_denominator=draw(st.sampled_from(COARSE_DENOMINATORS)),
                finest_sibling=draw(st.booleans()), coarse_queries=draw(st.sampled_from(COARSE_QUERIES)),
                denominator_eps=0.0 if row_max == "shared" else draw(st.sampled_from(EPSILONS)),
                neighbours=draw(st.sampled_from(NEIGHBOURS)))  # fmt: skip


@st.composite
def _problems(draw, precision: str) -> MechanismProblem:
    preset = draw(st.sampled_from(PRESET_NAMES))
    causal = draw(st.booleans())
    padding = draw(st.booleans()) and preset is None  # lucidrains pads with tokens that attend: not this padding
    block_size = draw(st.integers(1, MAX_BLOCK))
    n = draw(st.integers(1, MAX_PADDED_LEN)) if padding else block_size << draw(st.integers(0, MAX_DEPTH))
    blocks = padded_blocks(n, block_size)
    params = dict(block_size=block_size, causal=causal, padding=padding, preset=preset)
    if draw(st.booleans()):  # each preset parameter given on its own, overriding the preset's
        params.update(draw(preset_parameters()))
    deepest = max(1, int(np.log2(blocks)))
    tridiagonal = {**preset_values(preset, causal), **params}["neighbours"] == "tridiagonal"
    if tridiagonal and block_size % 2:  # coarse levels exclude adjacent half-blocks: odd blocks have one level
        params["num_levels"] = 1
    elif preset_levels(preset, causal, blocks) < 1 or draw(st.booleans()):
        params["num_levels"] = draw(st.integers(1, deepest))
    if draw(st.booleans()):
        params["scale"] = draw(st.sampled_from((0.3, 2.0)))
    shape = replace(draw(shapes(max_len=1, head_dims=HEAD_DIMS)), q_len=n, kv_len=n)
    value_scale = draw(st.sampled_from(VALUE_SCALES))
    rng = draw(generators())
    for _ in range(MAX_DRAWS):
        q, k, v = random_qkv(shape, int(rng.integers(0, 2**32)), value_scale)
        margins = row_max_margins(q, k, v, **params)
        if margins.size == 0 or margins.min() >= tie_margin(precision):
            return MechanismProblem("h1d", dict(q=q, k=k, v=v, **params))
    reject()


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """H-Transformer-1D problems whose per-level row maxima are far from ties at ``precision``."""
    tie_margin(precision)  # a bad precision fails here, not at the first draw
    return _problems(precision)
