"""Hypothesis strategies of LSH attention problems (Reformer), for every preset.

Sizes shrink toward one batch element, one head, one round, few tokens and
the canonical preset; lengths follow each preset's length rule (HF and
lucidrains reshape the sorted rounds into chunks, trax asserts N divisible
by two chunks) and are otherwise not multiples of the chunk length. Buckets
are single or factorised (unequal factors), rounds up to four, causal or not,
with key padding sometimes. ``qk`` is drawn token by token until every
hashing decision has a margin (:func:`refattn.lsh.bucket_margins`) of at least
:func:`refattn.strategies.tie_margin` of the precision under test, so an
implementation in that precision must reproduce every bucket.
"""

from __future__ import annotations

import math

from hypothesis import reject
from hypothesis import strategies as st

from ..strategies import VALUE_SCALES, MechanismProblem, generators, tie_margin
from .cases import draw_qk
from .inputs import bucket_factors
from .presets import PRESETS

#: Presets in shrinking order: canonical first.
PRESET_NAMES = (None, "hf", "trax", "lucidrains")
BUCKETS = (2, 4, 6, 8, [2, 2], [4, 2], [2, 4], [4, 6])
MAX_LEN = 32


@st.composite
def lengths(draw, rule: str, num_hashes: int, chunk_len: int) -> int:
    """A sequence length the preset's ``length_rule`` accepts (refattn/lsh/presets.py)."""
    if rule == "double_chunk":
        step = 2 * chunk_len
    elif rule == "rounds_multiple":
        step = chunk_len // math.gcd(chunk_len, num_hashes)
    else:
        step = 1
    return step * draw(st.integers(1, max(1, MAX_LEN // step)))


@st.composite
def _problems(draw, precision: str) -> MechanismProblem:
    preset = draw(st.sampled_from(PRESET_NAMES))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    head_dim, value_dim = draw(st.sampled_from((1, 3, 8, 17))), draw(st.sampled_from((1, 3, 8)))
    num_hashes, num_buckets = draw(st.integers(1, 4)), draw(st.sampled_from(BUCKETS))
    chunk_len = draw(st.integers(1, 16))
    length = draw(lengths(PRESETS[preset].length_rule, num_hashes, chunk_len))
    std = draw(st.sampled_from(VALUE_SCALES))
    rng = draw(generators())
    rotations = rng.standard_normal((heads, num_hashes, head_dim, sum(bucket_factors(num_buckets)) // 2))
    try:
        qk = draw_qk(rng, rotations, num_buckets, (batch, heads, length, head_dim), std=std,
                     min_margin=tie_margin(precision), max_draws=100)  # fmt: skip
    except RuntimeError:  # these rotations leave no room for margins (a head dim of 1 with four-way factors)
        reject()
    arguments = dict(
        qk=qk, v=rng.standard_normal((batch, heads, length, value_dim)), rotations=rotations,
        num_buckets=num_buckets, num_hashes=num_hashes, chunk_len=chunk_len, causal=draw(st.booleans()), preset=preset,
    )  # fmt: skip
    if draw(st.booleans()):
        valid = rng.random((batch, length)) >= 0.25
        valid[:, 0] = True
        arguments["key_padding_mask"] = valid
    return MechanismProblem("lsh", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """LSH problems whose bucket decisions are far from ties at ``precision``."""
    return _problems(precision)
