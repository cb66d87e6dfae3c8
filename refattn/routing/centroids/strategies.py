"""Hypothesis strategies of centroid updates (registry name "centroid_ema"), for every preset and update rule.

q, k, v and centroids are drawn as :mod:`refattn.routing.strategies` draws
them (sizes, shared-QK, key padding, value scales, routing normalisation and
prescale overrides), with the update's own options: the rule
(``"vq_ema"``, ``"normalized_mean_ema"``), the count rule, decays from 0 to 1,
the EMA epsilon, and a warm ``(ema_counts, ema_sums)`` state or none (a cold
state only where every head's count is above 0: decay below 1, and each head
credited with a real token by the count rule). Every
routing vector's nearest centroid (the update's one decision, in
``aux["assignment"]``) keeps a margin of :func:`refattn.strategies.tie_margin`
of the precision under test (:func:`refattn.routing.strategies.redraw_ties`).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...strategies import MechanismProblem, tie_margin
from ..presets import preset_value
from ..strategies import redraw_ties, routed_problem
from .reference import batch_counts

#: The update's own options, the simplest first.
UPDATE_OPTIONS = {
    "centroid_update": ("vq_ema", "normalized_mean_ema"),
    "count_rule": ("per_head", "google_research"),
    "decay": (0.999, 0.0, 0.5, 0.9, 1.0),
    "ema_eps": (1e-5, 1e-12, 1e-2),
}
#: The routing options an update reads (how routing vectors are made).
ROUTING_OPTIONS = ("routing_norm", "query_prescale")


def cold_state_counts(arrays: dict, params: dict) -> bool:
    """Whether ``"vq_ema"`` from zero counts gives every head a count above 0 (it divides by it, step (E4)):
    a decay below 1 and, under the count rule, a real token credited to every head."""
    head_dim = arrays["q"].shape[-1]
    if preset_value(params, "centroid_update", head_dim) != "vq_ema":
        return True
    batch, heads, length = arrays["q"].shape[:3]
    real = arrays.get("key_padding_mask", np.ones((batch, length), dtype=bool))  # (B, N)
    calls = 1 if params["shared_qk"] else 2
    one_hot = np.broadcast_to(np.tile(real, calls)[:, None, :, None], (batch, heads, calls * length, 1)).astype(float)
    counts = batch_counts(one_hot, preset_value(params, "count_rule", head_dim), calls)  # (H, 1)
    return preset_value(params, "decay", head_dim) < 1.0 and bool(np.all(counts > 0))


@st.composite
def _problems(draw, precision: str) -> MechanismProblem:
    arrays, params, rng, std = draw(routed_problem(draw(st.integers(1, 2)), override_names=ROUTING_OPTIONS))
    params.update({name: draw(st.sampled_from(values)) for name, values in UPDATE_OPTIONS.items()
                   if draw(st.booleans())})  # fmt: skip
    if draw(st.booleans()) or not cold_state_counts(arrays, params):  # a warm (counts, sums) state near the centroids
        centroids = arrays["centroids"]
        counts = rng.uniform(0.5, 12.0, centroids.shape[:2])  # (H, K)
        arrays["ema_counts"] = counts
        arrays["ema_sums"] = counts[..., None] * (centroids + 0.1 * rng.standard_normal(centroids.shape))
    arrays = redraw_ties(rng, arrays, arrays["centroids"], params, std=std, min_margin=tie_margin(precision),
                         cluster_size=None)  # fmt: skip
    return MechanismProblem("centroid_ema", {**arrays, **params})


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Centroid-update problems whose nearest-centroid assignments are far from ties at ``precision``."""
    return _problems(precision)
