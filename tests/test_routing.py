"""Routing attention (refattn/routing): closed forms on hand-sized examples, the
preset constants against the published sources, the invariants of
properties.py under Hypothesis, the hand-derived VJPs against central finite
differences (routing held fixed by the problems' decision margins), centroid
updates, hybrid layers, soft routing, bad input, and the conformance cases'
decisions at every precision."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import SpecError, dense_attention
from refattn.conformance.export import rounding_trials
from refattn.core import registry
from refattn.routing import (
    PRESETS,
    centroid_ema,
    centroid_ema_normalized_mean,
    centroid_ema_vq,
    commitment_loss,
    decision_margins,
    get_preset,
    hybrid_attention,
    hybrid_attention_vjp,
    kmeans_init,
    properties,
    routed_attention,
    routed_attention_vjp,
    routing_attention,
    routing_attention_vjp,
    routing_vectors,
    soft_routing_attention,
    soft_routing_attention_vjp,  # fmt: skip
)
from refattn.routing.cases import cases as routing_cases
from refattn.routing.centroids import properties as centroid_properties
from refattn.routing.centroids.cases import cases as centroid_cases
from refattn.routing.hybrid.cases import cases as hybrid_cases
from refattn.routing.soft import properties as soft_properties
from refattn.routing.soft.cases import cases as soft_cases
from refattn.routing.problems import MIN_RELATIVE_MARGIN, routed_problem
from refattn.routing.reference import (
    cluster_similarity,
    normalize,
    normalize_vjp,
    scatter_mean,
    top_members,
)
from tests.finite_differences import STEP, finite_differences

PRESET_NAMES = (None, "google_research", "lucidrains")


def _problem(seed, preset=None, *, b=1, h=2, n=16, d=8, dv=None, clusters=2, shared_qk=False, empty_cluster=False):
    chosen = get_preset(preset)
    prescale = 1 / math.sqrt(d) if chosen.query_prescale is None else chosen.query_prescale
    return routed_problem(np.random.default_rng(seed), batch=b, heads=h, length=n, head_dim=d, value_dim=dv,
                          clusters=clusters, routing_norm=chosen.routing_norm, query_prescale=prescale,
                          shared_qk=shared_qk, empty_cluster=empty_cluster)  # fmt: skip


# --- closed forms ---------------------------------------------------------------


def test_top_members_is_balanced_with_ties_to_the_lower_position():
    similarity = np.array([[0.9, 0.1], [0.5, 0.8], [0.5, 0.7], [0.2, 0.9], [0.7, 0.0]])[None, None]  # (1, 1, N=5, K=2)
    by_similarity = top_members(similarity, 3, "similarity")[0, 0]
    # Cluster 0: 0.9 (token 0), 0.7 (token 4), then tokens 1 and 2 tie at 0.5: token 1 wins.
    np.testing.assert_array_equal(by_similarity, [[0, 4, 1], [3, 1, 2]])
    np.testing.assert_array_equal(top_members(similarity, 3, "position")[0, 0], [[0, 1, 4], [1, 2, 3]])
    # Token 1 is in cluster 0 although cluster 1 is its nearest: balanced selection, not assignment.
    margins = decision_margins(similarity, 3, "similarity")
    assert margins["selection"] == 0.0  # the tie at cluster 0's boundary
    assert margins["order"] == pytest.approx(0.1) and margins["assignment"] == pytest.approx(0.2)


def test_layer_norm_routing_vectors_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(routing_vectors(x, norm_eps=1e-6), (x - 2.5) / math.sqrt(1.25 + 1e-6), rtol=1e-15)
    # google-research's 1/sqrt(D) before the layer norm acts only through eps: eps / s² = 4e-6 here.
    np.testing.assert_allclose(routing_vectors(x, norm_eps=1e-6, prescale=0.5), (x - 2.5) / math.sqrt(1.25 + 4e-6),
                               rtol=1e-15)  # fmt: skip
    np.testing.assert_allclose(routing_vectors(x, routing_norm="l2", norm_eps=1e-12), x / math.sqrt(30), rtol=1e-15)


def test_scatter_mean_by_hand():
    membership = np.array([[[[0, 1], [1, 2]]]])  # (1, 1, K=2, W=2): token 1 in both clusters, token 3 in none
    slot_out = np.array([[[[[1.0], [2.0]], [[4.0], [8.0]]]]])  # (1, 1, 2, 2, 1)
    for eps in (0.0, 1e-2):
        out, counts = scatter_mean(slot_out, membership, 4, eps)
        np.testing.assert_array_equal(counts[0, 0], [1, 2, 1, 0])
        np.testing.assert_allclose(out[0, 0, :, 0], [1 / (1 + eps), 6 / (2 + eps), 8 / (1 + eps), 0.0], rtol=1e-15)


def _two_cluster_problem():
    """N = 4, D = 2, L2 routing: tokens 0, 1 point along centroid 0, tokens 2, 3 along centroid 1."""
    q = np.array([[2.0, 0.2], [1.0, -0.3], [0.1, 3.0], [-0.4, 1.0]])[None, None]
    k = np.array([[1.5, -0.2], [0.5, 0.4], [0.3, 2.0], [0.2, 1.0]])[None, None]
    v = np.arange(8.0).reshape(1, 1, 4, 2)
    centroids = np.eye(2)[None]  # (H=1, K=2, D=2)
    return q, k, v, centroids


def test_two_clusters_by_hand():
    q, k, v, centroids = _two_cluster_problem()
    result = routing_attention(q, k, v, centroids=centroids, cluster_size=2, preset="lucidrains")
    np.testing.assert_array_equal(result.aux["membership"][0, 0], [[0, 1], [2, 3]])  # by similarity: 2/|q0| > 1/|q1|
    out = np.empty((4, 2))
    for cluster in ((0, 1), (2, 3)):
        for i in cluster:
            s = [q[0, 0, i] @ k[0, 0, j] / math.sqrt(2) for j in cluster]
            w = 1 / (1 + math.exp(s[1] - s[0]))  # two-key softmax
            out[i] = (w * v[0, 0, cluster[0]] + (1 - w) * v[0, 0, cluster[1]]) / (1 + 1e-5)
    np.testing.assert_allclose(result.out[0, 0], out, rtol=1e-14)
    np.testing.assert_array_equal(result.aux["counts"][0, 0], [1, 1, 1, 1])


def test_unrouted_tokens_give_exactly_zero_without_nan():
    p = _problem(1, n=12, clusters=2)
    result = routing_attention(p["q"], p["k"], p["v"], centroids=p["centroids"], cluster_size=3)  # 6 slots, 12 tokens
    unrouted = result.aux["unrouted"]
    assert unrouted.sum(axis=-1).min() >= 6 and np.all(np.isfinite(result.out))
    assert np.all(result.out[unrouted] == 0.0)
    grads = routing_attention_vjp(np.ones_like(result.out), p["q"], p["k"], p["v"], centroids=p["centroids"], cluster_size=3)
    assert np.all(grads.q[unrouted] == 0.0)


def test_self_mask_rules_under_shared_qk():
    """A token alone with itself attends to itself (canonical: its own logit; lucidrains: -5e4); one with
    an earlier key never does; google-research attends to itself like to any key."""
    p = _problem(2, n=16, clusters=2, shared_qk=True)
    q, v = p["q"], p["v"]
    params = dict(centroids=p["centroids"], cluster_size=8, shared_qk=True, causal=True)
    for preset in (None, "lucidrains", "google_research"):
        result = routing_attention(q, q, v, preset=preset, **params)
        membership = result.aux["membership"][0, 0]  # (K, W), position order for canonical and google
        first = np.array([row.min() for row in membership])
        for c, token in enumerate(first):
            slot = list(membership[c]).index(token)
            expected = 0.0 if preset is None else -5e4 if preset == "lucidrains" else None
            if expected is not None:
                lse = result.aux["slot_lse"][0, 0, c, slot]
                own = routing_vectors(q[0, 0, token]) @ routing_vectors(q[0, 0, token]) / math.sqrt(8)
                assert lse == pytest.approx(own if preset is None else -5e4, rel=1e-12)
        # Changing the value of a token that has earlier keys in every cluster it is in changes its
        # output only under google-research (no self mask).
        later = [t for t in range(16) if result.aux["counts"][0, 0, t] and all(
            t != first[c] for c in range(2) if t in membership[c])]  # fmt: skip
        moved_v = v.copy()
        moved_v[0, 0, later[0]] += 1.0
        moved = routing_attention(q, q, moved_v, preset=preset, **params)
        changed = moved.out[0, 0, later[0]] != result.out[0, 0, later[0]]
        assert np.any(changed) == (preset == "google_research")


def test_memory_slots_come_first_and_are_always_visible():
    q, k, v, centroids = _two_cluster_problem()
    mem_k, mem_v = np.zeros((1, 2, 1, 2)), np.full((1, 2, 1, 2), 100.0)  # memory logit 0, value 100
    result = routing_attention(q, k, v, centroids=centroids, cluster_size=2, preset="lucidrains", causal=True, mem_k=mem_k,
                               mem_v=mem_v)  # fmt: skip
    # Token 1 sits before every key of its cluster's key list that is later than it; the memory is always there.
    assert np.all(np.isfinite(result.aux["slot_lse"])) and np.all(result.out[0, 0] > 0)


def test_hybrid_layer_is_its_head_groups_in_preset_order():
    p = _problem(3, h=3, n=12, clusters=2)
    q, k, v = p["q"], p["k"], p["v"]
    for preset, routing_heads, local_heads in (("google_research", [0, 1], [2]), ("lucidrains", [1, 2], [0])):
        centroids = p["centroids"][routing_heads]
        result = hybrid_attention(q, k, v, num_local_heads=1, centroids=centroids, cluster_size=4, local_window=(2, 0),
                                  preset=preset)  # fmt: skip
        routed = routing_attention(q[:, routing_heads], k[:, routing_heads], v[:, routing_heads], centroids=centroids,
                                   cluster_size=4, preset=preset)  # fmt: skip
        # lucidrains' local heads are causal even in a non-causal layer.
        local = dense_attention(q[:, local_heads], k[:, local_heads], v[:, local_heads], window=(2, 0),
                                causal=preset == "lucidrains")  # fmt: skip
        np.testing.assert_array_equal(result.out[:, routing_heads], routed.out)
        np.testing.assert_array_equal(result.out[:, local_heads], local.out)


def test_soft_routing_by_hand():
    rng = np.random.default_rng(4)
    x, weights = rng.standard_normal((1, 3, 2)), rng.standard_normal((2, 2))
    paths = [rng.standard_normal((1, 2, 3, 4)) for _ in range(2)]
    logits = x[0] @ weights  # (N, P)
    pi = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    expected = pi[None, None, :, 0, None] * paths[0] + pi[None, None, :, 1, None] * paths[1]
    np.testing.assert_allclose(routed_attention(x, weights, paths).out, expected, rtol=1e-14)
    # Callable paths are called with q, k, v.
    q = rng.standard_normal((1, 2, 3, 4))
    called = routed_attention(x, weights, [lambda q, k, v: dense_attention(q, k, v), paths[1]], q=q, k=q, v=q)
    np.testing.assert_allclose(called.out, routed_attention(x, weights, [dense_attention(q, q, q).out, paths[1]]).out)


# --- presets against the published code -----------------------------------------------


def test_preset_constants_are_the_sources():
    g, l = PRESETS["google_research"], PRESETS["lucidrains"]
    # google-research routing_transformer/utils.py and sparse_transformer.py (sparse_transformer_local).
    assert (g.routing_norm, g.norm_eps, g.query_prescale) == ("layer", 1e-6, None)  # layer_norm(epsilon=1e-6), q *= d**-0.5
    assert (g.attend_on, g.scale) == ("normalized", 1.0)  # q, k replaced by their layer norms; matmul without scale
    assert (g.causal_by, g.order, g.mask_value) == ("slot", "position", -1e9)  # lower triangle, tf.sort, -1e9 bias
    assert (g.self_mask, g.query_padding, g.scatter_eps) == (False, "none", 1e-2)  # scatter_cluster_items + 1e-2
    assert (g.head_order, g.local_causal) == ("routing_first", None)
    assert (g.centroid_update, g.decay, g.ema_eps, g.commitment, g.loss_reduction) == (
        "vq_ema", 0.999, 1e-5, 1e-4, "sum_of_means")  # online_kmeans epsilon=1e-5; hparams decay, beta
    # lucidrains routing_transformer/routing_transformer.py.
    assert (l.routing_norm, l.norm_eps, l.query_prescale) == ("l2", 1e-12, 1.0)  # F.normalize
    assert (l.attend_on, l.normalize_shared_keys, l.scale) == ("raw", True, None)  # dots * d ** -0.5
    assert (l.causal_by, l.order, l.mask_value) == ("position", "similarity", -float(np.finfo(np.float32).max))
    assert (l.self_mask, l.self_mask_value, l.query_padding, l.scatter_eps) == (True, -5e4, "mask_window", 1e-5)
    assert (l.head_order, l.local_causal) == ("local_first", None)  # LocalAttention(causal = causal), since 57b1573
    assert (l.centroid_update, l.decay, l.ema_eps, l.commitment, l.loss_reduction) == (
        "normalized_mean_ema", 0.999, 1e-12, 1e-4, "mean")
    assert get_preset("google-research") is g
    with pytest.raises(SpecError, match="preset"):
        get_preset("trax")


def test_explicit_parameters_override_the_preset():
    p = _problem(5)
    base = dict(centroids=p["centroids"], cluster_size=4, preset="google_research")
    exact = routing_attention(p["q"], p["k"], p["v"], **base, scatter_eps=0.0)
    default = routing_attention(p["q"], p["k"], p["v"], **base)
    routed = exact.aux["counts"] > 0
    np.testing.assert_allclose(default.out[routed] * (exact.aux["counts"][routed][:, None] + 1e-2),
                               exact.out[routed] * exact.aux["counts"][routed][:, None], rtol=1e-13)  # fmt: skip


# --- invariants under Hypothesis --------------------------------------------------------


@st.composite
def routing_problems(draw, causal=None, one_cluster=False):
    preset = draw(st.sampled_from(PRESET_NAMES))
    n = draw(st.sampled_from([8, 12, 16, 24]))
    clusters = 1 if one_cluster else draw(st.integers(2, 4))
    cluster_size = n if one_cluster else draw(st.integers(1, n // 2))
    shared = False if one_cluster else draw(st.booleans())
    p = _problem(draw(st.integers(0, 2**16)), preset, b=draw(st.integers(1, 2)), n=n, d=8, dv=draw(st.sampled_from([3, 8])),
                 clusters=clusters, shared_qk=shared)  # fmt: skip
    params = dict(centroids=p["centroids"], cluster_size=cluster_size, preset=preset, shared_qk=shared,
                  causal=draw(st.booleans()) if causal is None else causal)  # fmt: skip
    if draw(st.booleans()) and (get_preset(preset).mask_value is None or not one_cluster):
        params["key_padding_mask"] = np.random.default_rng(n).random((p["q"].shape[0], n)) > 0.3
    return p["q"], p["q"] if shared else p["k"], p["v"], params


@given(routing_problems(one_cluster=True))
def test_one_cluster_over_the_whole_sequence_is_dense_attention(problem):
    properties.one_cluster_is_dense(routing_attention, *problem)


@given(routing_problems(causal=False), st.integers(0, 100))
def test_permuting_tokens_permutes_outputs(problem, seed):
    properties.permutation_equivariance(routing_attention, *problem, seed=seed)


@given(routing_problems())
def test_outputs_are_convex_combinations_of_cluster_values(problem):
    properties.convex_combination(routing_attention, *problem)


@given(routing_problems(causal=True), st.integers(0, 100))
def test_causal_outputs_ignore_later_tokens_when_routing_is_fixed(problem, seed):
    q, k, v, params = problem
    if params["preset"] == "google_research":
        # The slot mask is causal only for shared lists, and a row left empty by the mask is filled with
        # -1e9: uniform over its whole window, later tokens included.
        params = dict(params, causal_by="position", mask_value=None)
    if params["preset"] == "lucidrains" and not params["shared_qk"]:
        rng = np.random.default_rng(seed)  # lucidrains needs a memory slot: an empty row attends its whole window
        clusters = params["centroids"].shape[1]
        params = dict(params, mem_k=rng.standard_normal((2, clusters, 1, 8)),
                      mem_v=rng.standard_normal((2, clusters, 1, v.shape[-1])))  # fmt: skip
    properties.causal_with_fixed_routing(routing_attention, q, k, v, params, position=seed % (q.shape[2] - 1), seed=seed)


def test_slot_causal_mask_lets_later_tokens_in():
    """The flagged google-research case: its outputs change when later tokens move, the routing fixed."""
    case = next(c for c in routing_cases() if c.id == "routing/google_slot_causal")
    arrays = case.arrays(np.random.default_rng(case.seed))
    with pytest.raises(AssertionError, match="normwise error"):
        properties.causal_with_fixed_routing(routing_attention, arrays.pop("q"), arrays.pop("k"), arrays.pop("v"),
                                             {**arrays, **case.params}, position=0)  # fmt: skip


@given(st.sampled_from(PRESET_NAMES), st.integers(0, 2**16), st.booleans())
def test_ema_with_decay_one_keeps_centroids(preset, seed, shared):
    p = _problem(seed, preset, clusters=3, shared_qk=shared)
    counts = np.random.default_rng(seed).uniform(1, 5, (2, 3))
    centroid_properties.ema_decay_one_keeps_centroids(centroid_ema, p["q"], p["k"], p["v"],
                                             dict(centroids=p["centroids"], preset=preset, ema_counts=counts))  # fmt: skip


@given(st.integers(0, 2), st.integers(0, 2**16))
def test_one_hot_soft_routing_is_the_chosen_path(path, seed):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((3, 1, 2, 7, 4))
    params = dict(x=rng.standard_normal((1, 7, 3)), routing_weights=rng.standard_normal((3, 3)),
                  path_causal=[False, True, False], path_window=[None, None, [2, 2]])  # fmt: skip
    soft_properties.one_hot_routing_selects_a_path(soft_routing_attention, q, k, v, params, path)


# --- gradients against finite differences ------------------------------------------------

def _directional_check(forward, vjp, arrays, params, rng, directions=3, rtol=1e-6):
    """<grad, u> against (L(x + h u) - L(x - h u)) / 2h for random u, L = <dout, out> (none of the four
    routing mechanisms has a log-sum-exp), the routing checked not to move."""
    base = forward(**arrays, **params)
    assert base.lse is None
    dout = rng.standard_normal(base.out.shape)
    grads = vjp(dout, **arrays, **params)
    integer_aux = [name for name, value in base.aux.items() if value.dtype.kind in "biu"]

    def loss(moved):
        result = forward(**moved, **params)
        for name in integer_aux:
            assert np.array_equal(result.aux[name], base.aux[name]), "the step moved the routing"
        return np.sum(dout * result.out)

    for name in grads:
        for _ in range(directions):
            u = rng.standard_normal(arrays[name].shape)
            plus, minus = dict(arrays), dict(arrays)
            plus[name], minus[name] = arrays[name] + STEP * u, arrays[name] - STEP * u
            numeric = (loss(plus) - loss(minus)) / (2 * STEP)
            analytic = np.sum(grads[name] * u)
            assert analytic == pytest.approx(numeric, rel=rtol, abs=rtol * np.abs(grads[name]).sum()), name


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("shared_qk, causal, extras", [(False, False, ""), (False, True, "memory"),
                                                        (True, True, "padding"), (False, False, "memory padding")])
def test_routing_vjp_matches_finite_differences(preset, shared_qk, causal, extras):
    p = _problem(11, preset, b=2, n=12, d=6, dv=5, clusters=3, shared_qk=shared_qk)
    rng = np.random.default_rng(12)
    arrays = dict(q=p["q"], k=p["q"] if shared_qk else p["k"], v=p["v"])
    params = dict(centroids=p["centroids"], cluster_size=5, preset=preset, shared_qk=shared_qk, causal=causal)
    if "memory" in extras:
        arrays.update(mem_k=rng.standard_normal((2, 3, 2, 6)), mem_v=rng.standard_normal((2, 3, 2, 5)))
    if "padding" in extras:
        params["key_padding_mask"] = rng.random((2, 12)) > 0.3
    if preset == "google_research":  # mask_mode "add": -1e9 + s keeps s to 1.2e-7, too coarse for the differences
        params["mask_value"] = -1e4
    _directional_check(routing_attention, routing_attention_vjp, arrays, params, rng)


def test_routing_vjp_entrywise_on_a_tiny_problem():
    p = _problem(13, n=6, d=4, clusters=2)
    arrays = dict(q=p["q"], k=p["k"], v=p["v"])
    params = dict(centroids=p["centroids"], cluster_size=3, causal=True)
    dout = np.random.default_rng(0).standard_normal(p["v"].shape)
    grads = routing_attention_vjp(dout, **arrays, **params)
    for name in arrays:
        numeric = finite_differences(routing_attention, arrays, params, dout, None, name)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8)


def test_routing_has_no_per_token_lse_and_its_vjp_refuses_dlse():
    """A token's slots have overlapping key lists: the log-sum-exps are per slot, in aux, not differentiable."""
    p = _problem(14, n=8, clusters=2)
    arrays, params = dict(q=p["q"], k=p["k"], v=p["v"]), dict(centroids=p["centroids"], cluster_size=6)
    result = routing_attention(**arrays, **params)
    assert result.lse is None and result.aux["slot_lse"].shape == (1, 2, 2, 6)
    for backend in ("reference", "numba"):
        _bad(lambda b=backend: routing_attention_vjp(np.zeros_like(result.out), **arrays, **params, backend=b,
                                                     dlse=np.zeros(result.aux["slot_lse"].shape)), "dlse", "None")  # fmt: skip


def test_normalisation_vjps_by_finite_differences():
    rng = np.random.default_rng(6)
    x, dr = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    for norm, eps in (("layer", 1e-6), ("l2", 1e-12), ("l2", 10.0)):  # eps 10 clamps every norm
        r, stat = normalize(x, norm=norm, eps=eps)
        analytic = normalize_vjp(dr, r, stat, norm=norm, eps=eps)
        numeric = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[index] += STEP
            minus[index] -= STEP
            numeric[index] = np.sum(dr * (normalize(plus, norm=norm, eps=eps)[0] - normalize(minus, norm=norm, eps=eps)[0]))
        np.testing.assert_allclose(analytic, numeric / (2 * STEP), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_hybrid_vjp_matches_finite_differences(preset):
    p = _problem(7, preset, h=3, n=10, d=6, clusters=2)
    heads = [0, 1] if get_preset(preset).head_order == "routing_first" else [1, 2]
    params = dict(num_local_heads=1, centroids=p["centroids"][heads], cluster_size=4, local_window=(3, 1), preset=preset,
                  causal=True)  # fmt: skip
    _directional_check(hybrid_attention, hybrid_attention_vjp, dict(q=p["q"], k=p["k"], v=p["v"]), params,
                       np.random.default_rng(8))  # fmt: skip


def test_soft_routing_vjp_matches_finite_differences():
    rng = np.random.default_rng(9)
    arrays = dict(q=rng.standard_normal((2, 2, 5, 3)), k=rng.standard_normal((2, 1, 6, 3)), v=rng.standard_normal((2, 1, 6, 4)),
                  x=rng.standard_normal((2, 5, 3)), routing_weights=rng.standard_normal((3, 3)))  # fmt: skip
    params = dict(path_causal=[False, True, True], path_window=[None, None, [1, 0]])
    _directional_check(soft_routing_attention, soft_routing_attention_vjp, arrays, params, rng)
    # The plain function returns each path's output cotangent pi_p * dout.
    paths = [rng.standard_normal((2, 2, 5, 4)) for _ in range(3)]
    dout = rng.standard_normal((2, 2, 5, 4))
    grads = routed_attention_vjp(dout, arrays["x"], arrays["routing_weights"], paths)
    logits = arrays["x"] @ arrays["routing_weights"]
    pi = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(grads["paths"][1], pi[:, None, :, 1, None] * dout, rtol=1e-14)


# --- centroid updates ---------------------------------------------------------------------


def test_vq_ema_by_hand():
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])[None, None]  # (1, 1, 3, 2)
    centroids = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    padding = np.array([[True, True, False]])  # the third vector does not count
    update = centroid_ema_vq(x, centroids, ema_counts=np.array([[2.0, 1.0]]), decay=0.5, eps=1e-5, key_padding_mask=padding)
    counts = 0.5 * np.array([2.0, 1.0]) + 0.5 * np.array([2.0, 0.0])  # both real vectors are nearest centroid 0
    sums = 0.5 * centroids[0] + 0.5 * np.array([[1.8, 0.6], [0.0, 0.0]])
    n = counts.sum()
    smoothed = (counts + 1e-5) / (n + 2e-5) * n
    np.testing.assert_allclose(update.ema_counts[0], counts, rtol=1e-15)
    np.testing.assert_allclose(update.centroids[0], sums / smoothed[:, None], rtol=1e-14)
    np.testing.assert_array_equal(update.assignment[0, 0], [0, 0, 1])


def test_normalized_mean_ema_and_kmeans_init_by_hand():
    x = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 4.0]])[None, None]
    centroids = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])  # the third is nobody's nearest
    update = centroid_ema_normalized_mean(x, centroids, decay=0.75)
    means = np.array([[1.0, 0.25], [0.0, 1.0], [-1.0, -1.0]])  # token 2 ties at 1 and goes to centroid 0
    means[0] /= np.linalg.norm(means[0])
    means[2] = centroids[0, 2]  # empty: keeps its centroid
    np.testing.assert_allclose(update.centroids[0], 0.75 * centroids[0] + 0.25 * means, rtol=1e-15)
    np.testing.assert_allclose(centroid_ema_normalized_mean(x, centroids, decay=1.0).centroids, centroids)
    # k-means init: samples (batch and tokens flattened), then iterations of the normalised mean.
    np.testing.assert_array_equal(kmeans_init(x, np.array([0, 1]), iterations=0)[0], x[0, 0, [0, 1]])
    one = kmeans_init(x, np.array([0, 1]), iterations=1)[0]
    np.testing.assert_allclose(one, [[4 / math.hypot(4, 1), 1 / math.hypot(4, 1)], [0.0, 1.0]], rtol=1e-15)
    assert kmeans_init(x, np.array([0, 1])).shape == (1, 2, 2)


def test_commitment_loss_of_each_preset():
    p = _problem(10, clusters=3)
    q, k, centroids = p["q"], p["k"], p["centroids"]

    def mse(x):
        r = normalize(x, norm="layer", eps=1e-6)[0]
        nearest = np.argmax(cluster_similarity(r, centroids), axis=-1)
        return np.mean((r - np.take_along_axis(centroids[None], nearest[..., None], axis=2)) ** 2)

    assert commitment_loss(q, k, centroids) == pytest.approx(1e-4 * (mse(q) + mse(k)), rel=1e-13)
    assert commitment_loss(q, k, centroids, loss_reduction="mean") == pytest.approx(1e-4 * (mse(q) + mse(k)) / 2, rel=1e-13)
    assert commitment_loss(q, q, centroids, shared_qk=True) == pytest.approx(2e-4 * mse(q), rel=1e-13)  # k = q
    lucid = _problem(10, "lucidrains", clusters=3)
    assert commitment_loss(lucid["q"], lucid["k"], lucid["centroids"], preset="lucidrains") > 0


# --- bad input --------------------------------------------------------------------------------


def _bad(call, argument, expected_words):
    with pytest.raises(SpecError) as info:
        call()
    assert info.value.argument == argument
    assert expected_words in info.value.expected, info.value
    assert info.value.given


def test_bad_input_names_argument_expected_and_given():
    p = _problem(0)
    q, k, v, c = p["q"], p["k"], p["v"], p["centroids"]
    attend = lambda **kw: routing_attention(**{"q": q, "k": k, "v": v, "centroids": c, "cluster_size": 4, **kw})
    _bad(lambda: attend(cluster_size=17), "cluster_size", "[1, 16]")
    _bad(lambda: attend(cluster_size=0), "cluster_size", "[1, 16]")
    _bad(lambda: attend(cluster_size=True), "cluster_size", "integer")
    _bad(lambda: attend(centroids=np.zeros((2, 0, 8))), "centroids", "num_clusters K >= 1")
    _bad(lambda: attend(centroids=np.zeros((3, 2, 8))), "centroids", "(2, K, 8)")
    _bad(lambda: attend(centroids=np.zeros((2, 2, 7))), "centroids", "(2, K, 8)")
    bad = c.copy()
    bad[1, 0, 3] = np.nan
    _bad(lambda: attend(centroids=bad), "centroids", "finite")
    _bad(lambda: attend(k=k[:, :1], v=v[:, :1]), "k", "heads")
    _bad(lambda: attend(k=k[:, :, :8], v=v[:, :, :8]), "k", "tokens")
    _bad(lambda: attend(key_padding_mask=np.ones((1, 16))), "key_padding_mask", "bool")
    _bad(lambda: attend(mem_k=np.zeros((2, 2, 1, 8))), "mem_k, mem_v", "both")
    _bad(lambda: attend(mem_k=np.zeros((2, 3, 1, 8)), mem_v=np.zeros((2, 3, 1, 8))), "mem_k", "(H, K, M, D)")
    _bad(lambda: attend(causal_by="row"), "causal_by", "position")
    _bad(lambda: attend(scatter_eps=-1.0), "scatter_eps", "[0.0")
    _bad(lambda: attend(norm_eps=0.0), "norm_eps", "(0.0")
    _bad(lambda: attend(preset="trax"), "preset", "lucidrains")
    _bad(lambda: routing_attention_vjp(np.zeros((1, 2, 16, 7)), q, k, v, centroids=c, cluster_size=4), "dout", "shape")
    for decay in (1.5, -0.1, math.nan):
        _bad(lambda d=decay: centroid_ema_vq(q, c, decay=d), "decay", "[0.0, 1.0]")
        _bad(lambda d=decay: centroid_ema_normalized_mean(q, c, decay=d), "decay", "[0.0, 1.0]")
        _bad(lambda d=decay: centroid_ema(q, k, v, centroids=c, decay=d), "decay", "[0.0, 1.0]")
    _bad(lambda: centroid_ema_vq(q, c, key_padding_mask=np.zeros((1, 16), bool), decay=0.5), "ema_counts", "n > 0")
    _bad(lambda: kmeans_init(q, np.array([], dtype=np.int64)), "sample_indices", "num_clusters K >= 1")
    _bad(lambda: kmeans_init(q, np.array([0, 16])), "sample_indices", "[0, 16)")
    _bad(lambda: hybrid_attention(q, k, v, num_local_heads=2, centroids=c, cluster_size=4), "num_local_heads", "[0, 1]")
    _bad(lambda: hybrid_attention(q, k, v, num_local_heads=1, centroids=c, cluster_size=4), "centroids", "(1, K, D)")
    _bad(lambda: hybrid_attention(q, k, v, num_local_heads=1, centroids=c[:1], cluster_size=4, causal_by="x"), "causal_by", "position")
    x, w = np.zeros((1, 16, 3)), np.zeros((3, 2))
    _bad(lambda: routed_attention(x, w, [v]), "paths", "2 paths")
    _bad(lambda: routed_attention(x, np.zeros((4, 2)), [v, v]), "routing_weights", "(3, P >= 1)")
    _bad(lambda: routed_attention(x, w, [v, v[:, :, :8]]), "paths[1]", "(B, N) = (1, 16)")
    _bad(lambda: soft_routing_attention(q, k, v, x=x, routing_weights=w, path_causal=[True], path_window=[None, None]),
         "path_causal, path_window", "same length")  # fmt: skip


# --- the conformance cases ----------------------------------------------------------------------


def test_the_four_mechanisms_are_registered():
    for name in ("routing", "routing_hybrid", "soft_routing", "centroid_ema"):
        mechanism = registry.get(name)
        expected = ("reference", "numba", "cupy")
        assert mechanism.spec == "spec/routing.md" and mechanism.backends == expected
        assert mechanism.cases() and all(case.id.startswith(f"{name}/") for case in mechanism.cases())


ALL_CASES = routing_cases() + hybrid_cases() + soft_cases() + centroid_cases()


def test_cases_are_small_and_their_routing_has_the_recorded_margin():
    for case in ALL_CASES:
        arrays = case.arrays(np.random.default_rng(case.seed))
        assert all(a.nbytes < 32 * 1024 for a in arrays.values()), case.id
        assert arrays["q"].shape[2] <= 64
        if case.mechanism not in ("routing", "routing_hybrid"):
            continue
        preset = get_preset(case.params["preset"])
        d = arrays["q"].shape[-1]
        prescale = 1 / math.sqrt(d) if preset.query_prescale is None else preset.query_prescale
        radius = math.sqrt(d) if preset.routing_norm == "layer" else 1.0
        heads = slice(None)
        if case.mechanism == "routing_hybrid":
            local = case.params["num_local_heads"]
            heads = slice(None, -local) if preset.head_order == "routing_first" else slice(local, None)
        routed = ((arrays["q"], prescale),) + (() if case.params.get("shared_qk") else ((arrays["k"], 1.0),))
        for x, scale in routed:  # under shared-QK only q is routed
            r = normalize(scale * x[:, heads], norm=preset.routing_norm, eps=preset.norm_eps)[0]
            similarity = cluster_similarity(r, arrays["centroids"])
            margins = decision_margins(similarity, case.params["cluster_size"], preset.order)
            zero = ~np.any(x[:, heads], axis=-1)  # google's padded tokens: similarity exactly 0, exact ties
            if zero.any():
                real = similarity[~zero][None, None]  # (1, 1, tokens, K)
                margins["assignment"] = decision_margins(real, 1, preset.order)["assignment"]
                w = case.params["cluster_size"]
                ranked = -np.sort(-np.moveaxis(similarity, -1, -2), axis=-1)  # (B, H, K, N), descending
                if w < ranked.shape[-1]:  # a cut between two zero tokens is an exact tie, to the lower position
                    both_zero = (ranked[..., w - 1] == 0) & (ranked[..., w] == 0)
                    margins["selection"] = float(np.min(np.where(both_zero, np.inf, ranked[..., w - 1] - ranked[..., w])))
            if case.exact_ties and not zero.any():  # copied tokens: drop the exact ties between copies
                margins["selection"] = _selection_margin_between_distinct_values(similarity, case.params["cluster_size"])
            assert min(margins.values()) >= MIN_RELATIVE_MARGIN * radius, (case.id, margins)


def _selection_margin_between_distinct_values(similarity, cluster_size):
    """Each cluster's gap between its last member and the best token it leaves out, over distinct similarities:
    a cut between copies (equal values) is an exact tie, decided by position."""
    ranked = -np.sort(-np.moveaxis(similarity, -1, -2), axis=-1)  # (B, H, K, N), descending
    distinct = [np.unique(row)[::-1] for row in ranked.reshape(-1, ranked.shape[-1])]
    last = ranked[..., cluster_size - 1].reshape(-1)
    gaps = [row[row < value][0] if np.any(row < value) else np.inf for row, value in zip(distinct, last)]
    return float(np.min(last - np.array(gaps)))


def test_every_precision_reproduces_the_decisions_of_every_case():
    """The recorded margins at work: the evaluations that set the budgets in float32, float16 and bfloat16
    (plain, randomly rounded, or for a tie case tie-preserving) make exactly the float64 decisions, so their
    errors are rounding errors."""
    for case in ALL_CASES:
        mechanism = registry.get(case.mechanism)
        arrays = case.arrays(np.random.default_rng(case.seed))
        expected = {name: value for name, value in mechanism.forward(**arrays, **case.params).aux.items()
                    if value.dtype.kind in "biu"}  # the decisions, not slot_lse
        for precision in ("float32", "float16", "bfloat16"):
            for trial, (moved, _, numerics) in enumerate(rounding_trials(case, arrays, {}, precision)):
                got = mechanism.forward(**moved, **case.params, precision=numerics).aux
                for name, value in expected.items():
                    assert np.array_equal(got[name], value), (case.id, precision, trial, name)


@pytest.mark.parametrize("case", registry.get("routing_hybrid").cases(), ids=lambda c: c.id)
def test_hybrid_layer_properties_hold_on_every_case_and_catch_a_wrong_local_window(case):
    from refattn.routing.hybrid import properties as hybrid_properties

    arrays = case.arrays(np.random.default_rng(case.seed))
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    params = {**arrays, **case.params}
    hybrid = registry.get("routing_hybrid").forward
    hybrid_properties.local_heads_are_dense_attention(hybrid, q, k, v, params)
    hybrid_properties.routing_heads_ignore_local_options(hybrid, q, k, v, params)

    def local_window_ignored(q, k, v, **params):
        return hybrid(q, k, v, **{**params, "local_window": (1, 0)})

    with pytest.raises(AssertionError, match="local heads"):
        hybrid_properties.local_heads_are_dense_attention(local_window_ignored, q, k, v, {**params, "local_window": (3, 0)})


def test_google_count_rule_leaving_a_head_without_tokens_is_a_spec_error():
    """google-research credits head h with the tokens at (h·S + s) mod H: with one real token of two, head 1
    gets none, and a cold EMA state would divide by zero (inf before the check counted per head)."""
    from refattn.routing import centroid_ema

    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 2, 2, 3)), rng.standard_normal((1, 2, 2, 3))
    with pytest.raises(SpecError, match="ema_counts"):
        centroid_ema(q, k, q, centroids=rng.standard_normal((2, 1, 3)), key_padding_mask=np.array([[True, False]]),
                     preset="google_research")  # fmt: skip
