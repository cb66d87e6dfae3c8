"""Hypothesis strategies of Attention-sink (StreamingLLM) problems.

A stream (:func:`refattn.memory.xl_recurrence.strategies.streams`, head dims
2, 3, 8 and 17: RoPE rotates pairs of dims, so a head dim of 1 has none) with
up to :data:`MAX_SINKS` sinks and :data:`MAX_RECENT` recent tokens (either may
be 0, and both: a cache of nothing), a segment length anywhere in ``[1, N + 1]``,
RoPE at cache slots or stream positions, a rotary dim below an odd head dim or
any even one up to an even head dim, both layouts, two bases, a logit scale,
and sometimes a cache from a previous stream: up to ``s + w`` unrotated keys and
values at increasing positions with gaps (evicted tokens), the stream going on
after the last. Everything shrinks toward one head, few tokens, token-by-token
decoding, an empty cache, no sinks and the defaults. Eviction depends on
counts alone: there is no discrete decision of values, and the precision
changes nothing.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...strategies import MechanismProblem
from ..xl_recurrence.strategies import optional_scale, streams
from .reference import POSITIONS

#: Head dims of q and k: even rotary dims need a head dim of 2 at least.
HEAD_DIMS = (2, 3, 8, 17)
MAX_SINKS = 4
MAX_RECENT = 8
#: The largest gap between the positions of a given cache's tokens, in tokens.
MAX_POSITION_GAP = 20
ROPE_BASES = (10000.0, 100.0)
ROPE_LAYOUTS = ("half", "interleaved")


@st.composite
def rope_options(draw, head_dim: int, layouts=ROPE_LAYOUTS) -> dict:
    """``rotary_dim`` (omitted: the whole head dim, when it is even), ``rope_base`` and ``rope_layout``
    (each omitted when it is the first of its list, the default)."""
    options = {}
    base = draw(st.sampled_from(ROPE_BASES))
    if base != ROPE_BASES[0]:
        options["rope_base"] = base
    even_dims = st.integers(1, head_dim // 2).map(lambda half: 2 * half)
    rotary_dim = draw(st.none() | even_dims if head_dim % 2 == 0 else even_dims)
    if rotary_dim is not None:
        options["rotary_dim"] = rotary_dim
    layout = draw(st.sampled_from(layouts))
    if layout != layouts[0]:
        options["rope_layout"] = layout
    return options


@st.composite
def _problems(draw) -> MechanismProblem:
    stream = draw(streams(head_dims=HEAD_DIMS))
    s = stream.shape
    sink_count, recent_size = draw(st.integers(0, MAX_SINKS)), draw(st.integers(0, MAX_RECENT))
    arguments = dict(
        stream.arguments(), sink_count=sink_count, recent_size=recent_size,
        segment_len=draw(st.integers(1, s.q_len + 1)), positions=draw(st.sampled_from(POSITIONS)),
    )  # fmt: skip
    if sink_count + recent_size and draw(st.booleans()):
        cached = draw(st.integers(1, sink_count + recent_size))
        span = cached + draw(st.integers(0, MAX_POSITION_GAP))
        arguments.update(
            cache_k=stream.keys(cached), cache_v=stream.values(cached),
            cache_positions=np.sort(stream.rng.choice(span, size=cached, replace=False)).astype(np.int64),
        )  # fmt: skip
    arguments.update(draw(rope_options(s.head_dim)))
    return MechanismProblem("sinks", {**arguments, **optional_scale(draw)})


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Attention-sink problems (no discrete decision of values: the precision changes nothing)."""
    return _problems()
