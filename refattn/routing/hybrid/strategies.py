"""Hypothesis strategies of hybrid layers: routing heads beside local (sliding-window) heads, for every preset.

The routing heads are drawn as :mod:`refattn.routing.strategies` draws them
(sizes, centroids, shared-QK, causal, padding, memory key/values, value
scales, preset overrides), with 0 to H - 1 local heads, a local window
(either side None, 0 or a few tokens), ``local_causal`` and ``head_order``
overrides, and mask values the precision holds
(:func:`refattn.routing.strategies.held_mask_value`). The routing heads' decisions keep
:func:`refattn.strategies.tie_margin` of the precision under test
(:func:`refattn.routing.strategies.redraw_ties`); local heads take none.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, tie_margin
from ..presets import preset_value
from ..strategies import held_mask_value, memory, redraw_ties, routed_problem

MAX_HEADS = 3


@st.composite
def local_windows(draw) -> list | None:
    """None (no window) or ``[left, right]``, each side None (unbounded) or 0 to 5 tokens."""
    if not draw(st.booleans()):
        return None
    side = st.one_of(st.integers(0, 5), st.none())
    return [draw(side), draw(side)]


@st.composite
def _problems(draw, precision: str) -> MechanismProblem:
    heads = draw(st.integers(2, MAX_HEADS))
    arrays, params, rng, std = draw(routed_problem(heads))
    num_local_heads = draw(st.integers(0, heads - 1))
    routing_count = heads - num_local_heads
    params.update(num_local_heads=num_local_heads, local_window=draw(local_windows()), causal=draw(st.booleans()),
                  cluster_size=draw(st.integers(1, arrays["q"].shape[2])))  # fmt: skip
    if draw(st.booleans()):
        params["local_causal"] = draw(st.sampled_from([None, True, False]))
    if draw(st.booleans()):
        params["head_order"] = draw(st.sampled_from(["routing_first", "local_first"]))
    head_dim = arrays["q"].shape[-1]
    params = held_mask_value(params, head_dim, precision)
    first = preset_value(params, "head_order", head_dim) == "routing_first"
    routing_heads = slice(0, routing_count) if first else slice(num_local_heads, heads)
    centroids = arrays["centroids"][routing_heads]  # (H - L, K, D): the routing heads' own
    if draw(st.booleans()):
        slots = draw(st.integers(1, 2))
        arrays.update(memory(rng, routing_count, centroids.shape[1], slots, head_dim, arrays["v"].shape[-1]))
    arrays = redraw_ties(rng, dict(arrays, centroids=centroids), centroids, params, std=std,
                         min_margin=tie_margin(precision), cluster_size=params["cluster_size"],
                         heads=routing_heads)  # fmt: skip
    return MechanismProblem("routing_hybrid", {**arrays, **params})


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Hybrid-layer problems whose routing decisions are far from ties at ``precision``."""
    return _problems(precision)
