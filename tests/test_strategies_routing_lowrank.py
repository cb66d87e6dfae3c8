"""The Hypothesis strategies of routing (routing, routing_hybrid, soft_routing, centroid_ema), differential
attention and the low-rank family (lowrank, linformer, nystrom, performer).

Each strategy's draws are accepted by its mechanism's public function; every
important option is reachable and its minimal example is small (the sizes
``hypothesis.find`` shrinks to are stated); the routing decisions of drawn
problems keep the tie margin of the precision they were drawn for, measured
here from the routing vectors with a rule written out in the test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

import refattn
from refattn.routing import routing_vectors
from refattn.routing.presets import get_preset
from refattn.strategies import problems, tie_margin

from .strategy_checks import draws_are_accepted

MECHANISMS = ("routing", "routing_hybrid", "soft_routing", "centroid_ema", "differential", "lowrank", "linformer",
              "nystrom", "performer")  # fmt: skip
FIND = settings(database=None, max_examples=300, suppress_health_check=list(HealthCheck))


def shape(problem, name="q"):
    return problem.arrays[name].shape


# --- draws are accepted ----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_draws_are_accepted_by_the_public_function(mechanism, precision):
    draws_are_accepted(mechanism, precision, settings(max_examples=40, deadline=None, database=None))


# --- options are reachable and shrink small -------------------------------------------


def params_of(problem, name, default=None):
    return problem.params.get(name, default)


def routing_preset_value(problem, name):
    value = problem.params.get(name, refattn.core.presets.FROM_PRESET)
    return getattr(get_preset(problem.preset), name) if value is refattn.core.presets.FROM_PRESET else value


#: (mechanism, what is reached, condition, the minimal example's sizes: {array: shape}).
REACHABLE = [
    ("routing", "causal", lambda p: params_of(p, "causal"), {"q": (1, 1, 1, 3), "centroids": (1, 1, 3)}),
    ("routing", "google_research", lambda p: p.preset == "google_research", {"q": (1, 1, 1, 3)}),
    ("routing", "lucidrains", lambda p: p.preset == "lucidrains", {"q": (1, 1, 1, 3)}),
    ("routing", "shared_qk with memory", lambda p: params_of(p, "shared_qk") and "mem_k" in p.arrays,
     {"q": (1, 1, 1, 3), "mem_k": (1, 1, 1, 3)}),
    ("routing", "similarity order with a selection",
     lambda p: routing_preset_value(p, "order") == "similarity" and p.params["cluster_size"] < shape(p)[2],
     {"q": (1, 1, 2, 3)}),
    ("routing", "unrouted tokens",
     lambda p: shape(p, "centroids")[1] * p.params["cluster_size"] < shape(p)[2], {"q": (1, 1, 2, 3)}),
    ("routing", "key padding", lambda p: "key_padding_mask" in p.arrays, {"key_padding_mask": (1, 1)}),
    ("routing_hybrid", "local heads first", lambda p: routing_preset_value(p, "head_order") == "local_first"
     and p.params["num_local_heads"] > 0, {"q": (1, 2, 1, 3), "centroids": (1, 1, 3)}),
    ("routing_hybrid", "a local window", lambda p: params_of(p, "local_window") is not None, {"q": (1, 2, 1, 3)}),
    ("soft_routing", "Nq != Nk, two paths", lambda p: shape(p)[2] != shape(p, "k")[2]
     and shape(p, "routing_weights")[1] > 1, {"q": (1, 1, 1, 1), "routing_weights": (1, 2)}),
    ("centroid_ema", "normalized_mean_ema", lambda p: params_of(p, "centroid_update") == "normalized_mean_ema",
     {"q": (1, 1, 1, 3)}),
    ("centroid_ema", "a warm state", lambda p: "ema_counts" in p.arrays, {"ema_counts": (1, 1)}),
    ("differential", "GQA repeat_kv", lambda p: params_of(p, "gqa_keys") == "repeat_kv"
     and shape(p)[1] > shape(p, "k")[1], {"q": (1, 4, 1, 1), "k": (1, 2, 1, 1)}),
    ("differential", "Nq != Nk, causal", lambda p: params_of(p, "causal") and shape(p)[2] != shape(p, "k")[2],
     {"q": (1, 2, 1, 1), "k": (1, 2, 2, 1)}),
    ("differential", "no norm", lambda p: params_of(p, "apply_norm") is False, {"q": (1, 2, 1, 1)}),
    ("lowrank", "unnormalised, rank above Nk", lambda p: params_of(p, "normalized") is False
     and shape(p, "u")[3] > shape(p, "w")[3], {"u": (1, 1, 1, 2), "w": (1, 1, 2, 1)}),
    ("linformer", "headwise sliced projections", lambda p: params_of(p, "slice_projections")
     and p.arrays["e"].ndim == 3 and p.arrays["e"].shape[-1] > shape(p, "k")[2], {"e": (1, 1, 2)}),
    ("linformer", "Nq != Nk", lambda p: shape(p)[2] != shape(p, "k")[2], {"q": (1, 1, 1, 1), "k": (1, 1, 2, 1)}),
    ("nystrom", "front padding of a length m does not divide",
     lambda p: shape(p)[2] % p.params["num_landmarks"] != 0, {"q": (1, 1, 3, 1)}),
    ("nystrom", "hf", lambda p: p.preset == "hf", {"q": (1, 1, 1, 1)}),
    ("nystrom", "lucidrains with a conv", lambda p: p.preset == "lucidrains" and "conv_kernel" in p.arrays,
     {"conv_kernel": (1, 1)}),
    ("performer", "causal prefix stabiliser", lambda p: params_of(p, "causal")
     and params_of(p, "key_stabilizer") == "prefix", {"q": (1, 1, 1, 1), "omega": (1, 1)}),
    ("performer", "google", lambda p: p.preset == "google", {"q": (1, 1, 1, 1)}),
    ("performer", "Nq != Nk", lambda p: shape(p)[2] != shape(p, "k")[2], {"q": (1, 1, 1, 1), "k": (1, 1, 2, 1)}),
]  # fmt: skip


@pytest.mark.parametrize("mechanism, what, condition, sizes", REACHABLE, ids=[f"{m}: {w}" for m, w, *_ in REACHABLE])
def test_option_is_reachable_and_shrinks_small(mechanism, what, condition, sizes):
    smallest = find(problems(mechanism), condition, settings=FIND)
    assert {name: shape(smallest, name) for name in sizes} == sizes, smallest.describe()


def test_minimal_routing_problem_has_default_parameters():
    smallest = find(problems("routing"), lambda p: True, settings=FIND)
    assert shape(smallest) == (1, 1, 1, 3) and shape(smallest, "centroids") == (1, 1, 3)
    assert smallest.params == {"preset": None, "shared_qk": False, "cluster_size": 1, "causal": False}


# --- routing decisions keep the tie margin ---------------------------------------------


def decision_margins(vectors: np.ndarray, centroids: np.ndarray, cluster_size: int | None, order: str) -> float:
    """The smallest margin of every decision on routing vectors (B, H, N, D), written out with loops:
    each gap between two similarities r·μ over the larger Σ|r||μ| of the two."""
    smallest = np.inf
    batch, heads, length, _ = vectors.shape
    for b in range(batch):
        for h in range(heads):
            r, mu = vectors[b, h], centroids[h]  # (N, D), (K, D)
            similarity, size = r @ mu.T, np.abs(r) @ np.abs(mu).T  # (N, K)
            for n in range(length):  # nearest centroid: best against second best
                best, second = np.argsort(-similarity[n], kind="stable")[:2] if mu.shape[0] > 1 else (0, None)
                if second is not None:
                    gap = similarity[n, best] - similarity[n, second]
                    smallest = min(smallest, gap / max(size[n, best], size[n, second]))
            if cluster_size is None:
                continue
            for c in range(mu.shape[0]):  # membership: last member against first left out; similarity order
                ranked = sorted(range(length), key=lambda n: -similarity[n, c])
                pairs = [(cluster_size - 1, cluster_size)] if cluster_size < length else []
                pairs += [(i, i + 1) for i in range(cluster_size - 1)] if order == "similarity" else []
                for i, j in pairs:
                    a, z = ranked[i], ranked[j]
                    smallest = min(smallest, (similarity[a, c] - similarity[z, c]) / max(size[a, c], size[z, c]))
    return smallest


def routed_inputs(problem) -> list[tuple[np.ndarray, float]]:
    """The routed vectors of a problem, each with its prescale: q (by the query prescale), and k unless shared-QK."""
    head_dim = shape(problem)[-1]
    prescale = routing_preset_value(problem, "query_prescale")
    prescale = 1 / np.sqrt(head_dim) if prescale is None else prescale
    routed = [(problem.arrays["q"], prescale)]
    return routed if problem.params.get("shared_qk") else routed + [(problem.arrays["k"], 1.0)]


def routing_heads(problem) -> slice:
    if problem.mechanism != "routing_hybrid":
        return slice(None)
    heads, local = shape(problem)[1], problem.params["num_local_heads"]
    first = routing_preset_value(problem, "head_order") == "routing_first"
    return slice(0, heads - local) if first else slice(local, heads)


@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mechanism", ["routing", "routing_hybrid", "centroid_ema"])
def test_routing_decisions_are_far_from_ties(mechanism, precision):
    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.filter_too_much])
    @given(data=st.data())
    def far(data):
        problem = data.draw(problems(mechanism, precision))
        cluster_size = None if mechanism == "centroid_ema" else problem.params["cluster_size"]
        order = routing_preset_value(problem, "order") if cluster_size else "position"
        norm, eps = routing_preset_value(problem, "routing_norm"), routing_preset_value(problem, "norm_eps")
        for x, prescale in routed_inputs(problem):
            vectors = routing_vectors(x[:, routing_heads(problem)], routing_norm=norm, norm_eps=eps, prescale=prescale)
            assert decision_margins(vectors, problem.arrays["centroids"], cluster_size, order) >= tie_margin(precision)

    far()


def test_margin_rule_sees_a_tie():
    """The rule above can fail: two tokens with equal similarity to one centroid, at the cluster's edge or in
    its similarity order."""
    vectors = np.array([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # (1, 1, 3, 2)
    centroids = np.array([[[1.0, 1.0]]])  # (1, 1, 2): similarities 1, 1, 2; rounding sizes 1, 1, 2
    assert decision_margins(vectors, centroids, 1, "position") == 0.5  # token 2 ahead of the others by 1 / 2
    assert decision_margins(vectors, centroids, 2, "position") == 0.0  # tokens 0 and 1 tie at the edge
    assert decision_margins(vectors, centroids, 3, "position") == np.inf  # every token, one centroid: no decision
    assert decision_margins(vectors, centroids, 3, "similarity") == 0.0  # their order ties
