"""Hypothesis strategies of segmented-attention problems: every last-segment rule, pooling, integration and
causal summary rule, with explicit gates, projections and pooling matrices.

Sizes shrink toward one batch element, one head, one token, segments of one
token and no integration. Lengths are not multiples of the segment length
(a short last segment, or ``last_segment="pad"`` with segments longer than
the sequence); a given pooling matrix is a one-hot selection (max pooling by
a given argmax) or convex weights, with no weight after its segment when
causal. The gate is drawn in every broadcastable shape. Pooling is explicit,
so there is no discrete decision: the precision changes nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, generators, random_qkv, seeds, shapes
from .reference import INTEGRATIONS, LAST_SEGMENTS

HEAD_DIMS = (1, 3, 8, 17)
MAX_LEN = 24
#: Pooling as drawn: the two named ones, then a given one-hot selection or given convex weights.
POOLINGS = ("mean", "first", "selection", "weights")
#: The gate's axes of (B, Hq, N, Dv) that are broadcast (1) or full (0): one number first, the full shape last.
GATE_FORMS = ((1, 1, 1, 1), (1, 1, 0, 1), (0, 0, 0, 1), (0, 0, 0, 0))
PROJECTION_WIDTHS = (1, 3, 5)


def given_pooling(rng, form: str, num_segments: int, n: int, segment_len: int, causal: bool) -> np.ndarray:
    """(S, N) pooling matrix: row s a one-hot selection inside segment s, or convex weights (causal: on tokens
    before the end of segment s)."""
    pooling = np.zeros((num_segments, n))
    for s in range(num_segments):
        start, end = s * segment_len, min((s + 1) * segment_len, n)
        if form == "selection":
            pooling[s, rng.integers(start, end)] = 1.0
        else:
            reach = end if causal else n
            weights = rng.random(reach) * (rng.random(reach) < 0.5)
            weights[rng.integers(start, end)] += 1.0  # never an empty row
            pooling[s, :reach] = weights / weights.sum()
    return pooling


def gate_shape(form: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The gate's shape: axis a of ``out_shape`` where ``form[a]`` is 0, 1 (broadcast) where it is 1."""
    return tuple(1 if broadcast else size for broadcast, size in zip(form, out_shape))


@st.composite
def _problems(draw) -> MechanismProblem:
    n = draw(st.integers(1, MAX_LEN))
    shape = replace(draw(shapes(max_len=1, head_dims=HEAD_DIMS)), q_len=n, kv_len=n)
    q, k, v = random_qkv(shape, draw(seeds()), draw(st.sampled_from(VALUE_SCALES)))
    last_segment = draw(st.sampled_from(LAST_SEGMENTS))
    segment_len = draw(st.integers(1, n if last_segment == "short" else n + 4))
    causal = draw(st.booleans())
    integration = draw(st.sampled_from(INTEGRATIONS))
    pooling = draw(st.sampled_from(POOLINGS))
    given = pooling in ("selection", "weights")
    if integration == "concat" and causal:
        current_summary = "prefix"
        pooling = "mean" if given else pooling  # prefix pooling is defined for the named poolings only
    else:
        current_summary = "exclude" if given and causal else draw(st.sampled_from(("exclude", "prefix")))
    rng = draw(generators())
    arguments = dict(q=q, k=k, v=v, segment_len=segment_len, causal=causal, last_segment=last_segment,
                     integration=integration, current_summary=current_summary)  # fmt: skip
    num_segments = -(-n // segment_len)
    given = pooling in ("selection", "weights")
    arguments["pooling"] = given_pooling(rng, pooling, num_segments, n, segment_len, causal) if given else pooling
    out_shape = (shape.batch, shape.q_heads, n, shape.value_dim)
    if integration == "gate":
        arguments["gate"] = rng.random(gate_shape(draw(st.sampled_from(GATE_FORMS)), out_shape))
    if integration == "concat":
        arguments["projection"] = rng.standard_normal((2 * shape.value_dim, draw(st.sampled_from(PROJECTION_WIDTHS))))
    if draw(st.booleans()):
        arguments["scale"] = draw(st.sampled_from((0.3, 2.0)))
    return MechanismProblem("segmented", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Segmented-attention problems (no discrete decision: the precision changes nothing)."""
    return _problems()
