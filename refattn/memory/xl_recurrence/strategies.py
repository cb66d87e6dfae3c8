"""Hypothesis strategies of Transformer-XL recurrence problems, and the stream every memory mechanism draws.

A stream (:func:`streams`) is q, k, v with as many keys as queries: one or
two batch elements, the head layouts of :data:`refattn.strategies.HEAD_LAYOUTS`
(MHA, GQA, MQA), head dims 1, 3, 8 and 17 (value dims independently), up to
:data:`MAX_LEN` tokens, q and k at one of :data:`refattn.strategies.VALUE_SCALES`.

A recurrence problem adds a segment length anywhere in ``[1, N + 2]`` (so the
last segment is usually short, and may be the only one), a memory length up to
:data:`MAX_MEMORY` (0 included), ``same_length``, a start from an empty memory,
from a given memory of any length up to ``mem_len`` (0 included), or from HF's
zero memory, Transformer-XL relative scores (tables of ``L + M`` rows or a few
more) and a logit scale. Everything shrinks toward one head, few tokens,
segments of one token, no memory and no options. There is no discrete
decision: the precision changes nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, Shape, generators, random_qkv, seeds, shapes

#: Head dims of q and k (value dims are drawn from the same list).
HEAD_DIMS = (1, 3, 8, 17)
#: The longest stream drawn.
MAX_LEN = 24
#: The longest memory drawn.
MAX_MEMORY = 8
#: Logit scales a problem may set (None: the default ``1 / sqrt(D)``).
SCALES = (None, 0.05, 1.0, 3.0)
#: How the stream starts.
STARTS = ("empty", "given", "hf_zero")


@dataclasses.dataclass(frozen=True)
class Stream:
    """One drawn stream: its sizes, q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), the standard
    deviation of q and k, and a generator for the rest of the problem's arrays."""

    shape: Shape
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    value_scale: float
    rng: np.random.Generator

    def keys(self, length: int) -> np.ndarray:
        """``length`` more keys (B, Hkv, length, D), drawn as ``k`` (a memory's keys)."""
        s = self.shape
        return self.value_scale * self.rng.standard_normal((s.batch, s.kv_heads, length, s.head_dim))

    def values(self, length: int) -> np.ndarray:
        """``length`` more values (B, Hkv, length, Dv), drawn as ``v``."""
        s = self.shape
        return self.rng.standard_normal((s.batch, s.kv_heads, length, s.value_dim))

    def arguments(self) -> dict:
        return {"q": self.q, "k": self.k, "v": self.v}


@st.composite
def streams(draw, head_dims=HEAD_DIMS, max_len: int = MAX_LEN, length: int | None = None) -> Stream:
    """q, k, v of one stream (as many keys as queries), shrinking toward one head and one token; ``length``
    tokens when given."""
    shape = draw(shapes(max_len=max_len, head_dims=head_dims))
    length = shape.q_len if length is None else length
    shape = dataclasses.replace(shape, q_len=length, kv_len=length)
    value_scale = draw(st.sampled_from(VALUE_SCALES))
    q, k, v = random_qkv(shape, draw(seeds()), value_scale)
    return Stream(shape, q, k, v, value_scale, draw(generators()))


def optional_scale(draw) -> dict:
    """``{"scale": s}`` for a drawn logit scale, or nothing (the default)."""
    scale = draw(st.sampled_from(SCALES))
    return {} if scale is None else {"scale": scale}


@st.composite
def _problems(draw) -> MechanismProblem:
    stream = draw(streams())
    s = stream.shape
    segment_len = draw(st.integers(1, s.q_len + 2))
    mem_len = draw(st.integers(0, MAX_MEMORY))
    arguments = dict(stream.arguments(), segment_len=segment_len, mem_len=mem_len)
    if mem_len >= 1 and draw(st.booleans()):
        arguments["same_length"] = True
    start = draw(st.sampled_from(STARTS))
    if start == "given":
        length = draw(st.integers(0, mem_len))
        arguments.update(memory_k=stream.keys(length), memory_v=stream.values(length))
    elif start == "hf_zero":
        arguments["hf_zero_memory"] = True
    if draw(st.booleans()):
        rows = min(segment_len, s.q_len) + mem_len + draw(st.integers(0, 2))
        arguments.update(
            r=stream.value_scale * stream.rng.standard_normal((s.q_heads, rows, s.head_dim)),
            u=stream.value_scale * stream.rng.standard_normal((s.q_heads, s.head_dim)),
            v_bias=stream.value_scale * stream.rng.standard_normal((s.q_heads, s.head_dim)),
        )  # fmt: skip
    return MechanismProblem("xl_recurrence", {**arguments, **optional_scale(draw)})


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Transformer-XL recurrence problems (no discrete decision: the precision changes nothing)."""
    return _problems()
