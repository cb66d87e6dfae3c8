"""Hypothesis strategies of Memory-token (RMT) problems.

A stream (:func:`refattn.memory.xl_recurrence.strategies.streams`, head dims
2, 3, 8 and 17: RoPE rotates pairs of dims) cut into segments of any divisor
of ``N`` (every wrapped segment has ``2m + L`` tokens), up to
:data:`MAX_MEMORY_TOKENS` memory tokens of width ``Hq · Dv``, projections that
give the first memory tokens' q and k the stream's value scale, both position
conventions, both masks, a rotary dim (RoPE options as
:func:`refattn.memory.sinks.strategies.rope_options`, layout ``"half"``) and a
logit scale. Everything shrinks toward one head, few tokens, one memory token,
the paper's positions and mask. There is no discrete decision: the precision
changes nothing.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...strategies import MechanismProblem
from ..sinks.strategies import HEAD_DIMS, rope_options
from ..xl_recurrence.strategies import optional_scale, streams
from .reference import MEMORY_MASKS, POSITIONS

MAX_MEMORY_TOKENS = 4


@st.composite
def _problems(draw) -> MechanismProblem:
    stream = draw(streams(head_dims=HEAD_DIMS))
    s = stream.shape
    n, width = s.q_len, s.q_heads * s.value_dim
    tokens = draw(st.integers(1, MAX_MEMORY_TOKENS))
    # Memory vectors ~ N(0, 1), so projections of std value_scale / sqrt(E) give q and k of std value_scale.
    projection = lambda heads, dim, std: std / np.sqrt(width) * stream.rng.standard_normal((width, heads, dim))  # noqa: E731
    arguments = dict(
        stream.arguments(), segment_len=draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])),
        memory=stream.rng.standard_normal((s.batch, tokens, width)),
        w_q=projection(s.q_heads, s.head_dim, stream.value_scale),
        w_k=projection(s.kv_heads, s.head_dim, stream.value_scale), w_v=projection(s.kv_heads, s.value_dim, 1.0),
        positions=draw(st.sampled_from(POSITIONS)), memory_mask=draw(st.sampled_from(MEMORY_MASKS)),
        **draw(rope_options(s.head_dim, layouts=("half",))),
    )  # fmt: skip
    return MechanismProblem("memory_tokens", {**arguments, **optional_scale(draw)})


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Memory-token problems (no discrete decision: the precision changes nothing)."""
    return _problems()
