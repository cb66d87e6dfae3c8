"""Hypothesis strategies of multi-level attention problems: nested unit boundaries, per-level projections,
every aggregation G with its parameters, both outputs and both token rules.

Sizes shrink toward one batch element, one token, one level, one unit per
level, one feature and the simplest G (mean). Unit boundaries are drawn level
by level, one flag per gap between the elements of the level below, so they
shrink toward a single unit; units have uneven sizes (one element included).
Projections have standard deviation ``1/sqrt(C)`` and the tokens one of the
value scales, so logits range from tiny to huge.

Max pooling (``aggregate="max"``) takes a feature-wise argmax in every unit: a
discrete decision. Draws are redrawn, then rejected, until every such
decision has a margin (:func:`max_pool_margins`) of at least
:func:`refattn.strategies.tie_margin` of the precision under test.
"""

from __future__ import annotations

import numpy as np
from hypothesis import reject
from hypothesis import strategies as st

from ...core.checks import scale as default_scale
from ...strategies import VALUE_SCALES, MechanismProblem, generators, tie_margin
from .inputs import OUTPUTS, TOKEN_RULES

MAX_LEN = 16
MAX_LEVELS = 3
FEATURES = (1, 3, 8)
HEAD_DIMS = (1, 3, 8, 17)
POOL_DIMS = (1, 3, 4)
#: G, simplest first.
AGGREGATES = ("mean", "first", "weights", "attention_pool", "max")
#: Redraws of the arrays before a draw whose maxima are too close to ties is rejected.
MAX_DRAWS = 20


@st.composite
def segment_ids(draw, n: int) -> np.ndarray:
    """(L, N) nested unit ids: at each level a flag per gap between consecutive elements starts a new unit."""
    levels = draw(st.integers(1, MAX_LEVELS))
    rows, element_of_token = [], np.arange(n)  # level 0's elements are the tokens
    for _ in range(levels):
        elements = int(element_of_token[-1]) + 1
        starts = draw(st.lists(st.booleans(), min_size=elements - 1, max_size=elements - 1))
        unit_of_element = np.concatenate([[0], np.cumsum(starts)]).astype(np.int64)
        element_of_token = unit_of_element[element_of_token]  # the next level's elements are these units
        rows.append(element_of_token)
    return np.stack(rows)


def level_units(segments: np.ndarray, level: int) -> np.ndarray:
    """(M,) the level-``level`` unit of each element of that level (tokens at 0, the units of level - 1 above)."""
    if level == 0:
        return segments[0]
    first_token = np.flatnonzero(np.diff(segments[level - 1], prepend=-1))
    return segments[level][first_token]


def max_pool_margins(x, segments, wq, wk, wv, scale=None, **_) -> np.ndarray:
    """How far each max-pooling decision is from a tie, relative to its rounding scale (1-d, float64).

    At every level, unit of two or more elements, batch element and feature
    ``c``: the gap between the largest and the second-largest output ``o_ic``
    of the unit's elements, divided by the largest ``|v_ic|`` of the unit times
    ``Π (1 + max |logit|)`` over the levels so far (an output's rounding error
    is a few unit roundoffs of its values, amplified by the logits of its
    level and of the levels its inputs came through).
    """
    scale = default_scale(scale, wq.shape[2])
    h, growth, margins = x, 1.0, [np.zeros(0)]
    for level in range(segments.shape[0]):
        units = level_units(segments, level)  # (M,)
        same = units[:, None] == units[None, :]  # (M, M)
        q, k, v = h @ wq[level], h @ wk[level], h @ wv[level]  # (B, M, D), (B, M, D), (B, M, C)
        logits = np.where(same, scale * q @ k.transpose(0, 2, 1), -np.inf)  # (B, M, M)
        growth *= 1.0 + np.max(np.abs(np.where(same, logits, 0.0)))
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        o = (weights / weights.sum(axis=-1, keepdims=True)) @ v  # (B, M, C)
        pooled = []
        for unit in range(int(units[-1]) + 1):
            members = o[:, units == unit]  # (B, m, C)
            if members.shape[1] > 1:
                top_two = np.sort(members, axis=1)[:, -2:]
                size = np.abs(v[:, units == unit]).max(axis=1) * growth
                margins.append(((top_two[:, 1] - top_two[:, 0]) / np.maximum(size, np.finfo(float).tiny)).ravel())
            pooled.append(members.max(axis=1))
        h = np.stack(pooled, axis=1)  # (B, U, C)
    return np.concatenate(margins)


def draw_arrays(rng, b: int, segments: np.ndarray, c: int, d: int, a: int, aggregate: str, value_scale: float) -> dict:
    """Tokens, per-level projections and G's parameters."""
    levels, n = segments.shape
    arrays = {"x": value_scale * rng.standard_normal((b, n, c))}
    for name, width in (("wq", d), ("wk", d), ("wv", c)):
        arrays[name] = rng.standard_normal((levels, c, width)) / np.sqrt(c)
    if aggregate == "attention_pool":
        arrays.update(pool_w=rng.standard_normal((levels, c, a)) / np.sqrt(c), pool_b=rng.standard_normal((levels, a)),
                      context=rng.standard_normal((levels, a)))  # fmt: skip
    if aggregate == "weights":
        arrays["pool_weights"] = rng.uniform(0.0, 1.0, (levels, n))
    return arrays


@st.composite
def _problems(draw, precision: str, aggregates: tuple[str, ...]) -> MechanismProblem:
    b, n = draw(st.integers(1, 2)), draw(st.integers(1, MAX_LEN))
    segments = draw(segment_ids(n))
    c, d, a = draw(st.sampled_from(FEATURES)), draw(st.sampled_from(HEAD_DIMS)), draw(st.sampled_from(POOL_DIMS))
    aggregate = draw(st.sampled_from(aggregates))
    params = dict(segments=segments, aggregate=aggregate, output=draw(st.sampled_from(OUTPUTS)),
                  token_rule=draw(st.sampled_from(TOKEN_RULES)))  # fmt: skip
    if draw(st.booleans()):
        params["scale"] = draw(st.sampled_from((0.3, 2.0)))
    value_scale = draw(st.sampled_from(VALUE_SCALES))
    rng = draw(generators())
    for _ in range(MAX_DRAWS):
        arrays = draw_arrays(rng, b, segments, c, d, a, aggregate, value_scale)
        if aggregate != "max" or np.min(max_pool_margins(**arrays, **params), initial=np.inf) >= tie_margin(precision):
            return MechanismProblem("multilevel", {**arrays, **params})
    reject()


def problems(precision: str = "float64", aggregates: tuple[str, ...] = AGGREGATES) -> st.SearchStrategy:
    """Multi-level problems with G among ``aggregates``; max-pooling decisions far from ties at ``precision``."""
    tie_margin(precision)  # a bad precision fails here, not at the first draw
    return _problems(precision, aggregates)
