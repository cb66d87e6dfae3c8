"""The numba backends of soft routing, hybrid layers and the centroid update against closed forms.

The agreement with the reference on every conformance case is tests/test_registry_contract.py's; here
each kernel's particular part is checked on its own: the mixture (uniform and one-hot routing, and its
VJP by finite differences), the placement of the head groups, and the two centroid updates transcribed
from spec/routing.md's (E1)-(E5) and (L1)-(L4) as loops.
"""

import numpy as np
import pytest

from refattn import SpecError
from refattn.core.presets import FROM_PRESET
from refattn.core.results import Cotangents
from refattn.dense.reference import dense_attention
from refattn.routing.centroids import numba as centroids_numba
from refattn.routing.centroids.reference import check_centroid_ema_inputs
from refattn.routing.hybrid import numba as hybrid_numba
from refattn.routing.hybrid.reference import ROUTING_PARAMETERS, check_hybrid_inputs
from refattn.routing.reference import routing_attention
from refattn.routing.soft import numba as soft_numba
from refattn.routing.soft.reference import check_soft_routing_inputs

RNG = np.random.default_rng(11)
Q, K, V = (RNG.standard_normal((2, 2, 6, 4)) for _ in range(3))  # (B, H, N, D)
PATHS = dict(path_causal=[False, True, True], path_window=[None, None, [2, 0]])


def _soft(x, weights, dtype=np.float64):
    q, k, v = (a.astype(dtype) for a in (Q, K, V))
    return check_soft_routing_inputs(q, k, v, x=x.astype(dtype), routing_weights=weights.astype(dtype), scale=None, **PATHS)


def _dense_paths():
    """Each path's output by the dense reference, (P, B, H, N, Dv)."""
    return np.stack([dense_attention(Q, K, V, causal=c, window=w).out for c, w in zip(*PATHS.values())])


def test_soft_routing_with_zero_weights_is_the_mean_of_the_paths():
    x = RNG.standard_normal((2, 6, 3))
    out = soft_numba.forward(_soft(x, np.zeros((3, 3)))).out
    np.testing.assert_allclose(out, _dense_paths().mean(axis=0), atol=1e-12)


def test_soft_routing_with_one_dominant_path_is_that_path():
    x = np.ones((2, 6, 1))
    weights = np.array([[0.0, 200.0, 0.0]])  # path 1's probability is 1 - 2e-87
    out = soft_numba.forward(_soft(x, weights)).out
    np.testing.assert_allclose(out, _dense_paths()[1], atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_routing_computes_in_its_compute_dtype(dtype):
    x, weights = RNG.standard_normal((2, 6, 3)), RNG.standard_normal((3, 3))
    inputs = _soft(x, weights, dtype)
    grads = soft_numba.vjp(inputs, Cotangents(dout=np.ones(Q.shape), dlse=None))
    assert soft_numba.forward(inputs).out.dtype == dtype
    assert {g.dtype for g in grads.values()} == {np.dtype(dtype)}


def test_soft_routing_vjp_matches_finite_differences_of_the_kernel():
    x, weights = RNG.standard_normal((2, 6, 3)), RNG.standard_normal((3, 3))
    dout = RNG.standard_normal(Q.shape)
    grads = soft_numba.vjp(_soft(x, weights), Cotangents(dout=dout, dlse=None))

    def loss(x, weights):
        return float(np.sum(dout * soft_numba.forward(_soft(x, weights)).out))

    h = 1e-6
    for name, value, shift in (("x", x, lambda u: (x + u, weights)), ("routing_weights", weights, lambda u: (x, weights + u))):
        u = RNG.standard_normal(value.shape)
        numeric = (loss(*shift(h * u)) - loss(*shift(-h * u))) / (2 * h)
        assert abs(np.sum(grads[name] * u) - numeric) <= 1e-7 * max(1.0, abs(numeric)), name


@pytest.mark.parametrize("head_order, local", [("local_first", slice(0, 1)), ("routing_first", slice(2, 3))])
def test_hybrid_places_local_heads_by_head_order(head_order, local):
    q, k, v = (RNG.standard_normal((1, 3, 8, 4)) for _ in range(3))
    centroids = RNG.standard_normal((2, 2, 4))
    options = dict(cluster_size=4, local_window=[2, 0], causal=True, preset="lucidrains")
    inputs = check_hybrid_inputs(q, k, v, num_local_heads=1, centroids=centroids, local_causal=None, head_order=head_order,
                                 shared_qk=False, key_padding_mask=None, mem_k=None, mem_v=None,
                                 **_routing_defaults(options))  # fmt: skip
    out = hybrid_numba.forward(inputs).out
    routing = slice(1, 3) if head_order == "local_first" else slice(0, 2)
    want_local = dense_attention(q[:, local], k[:, local], v[:, local], causal=True, window=[2, 0]).out
    want_routing = routing_attention(q[:, routing], k[:, routing], v[:, routing], centroids=centroids, cluster_size=4,
                                     causal=True, preset="lucidrains").out  # fmt: skip
    np.testing.assert_allclose(out[:, local], want_local, atol=1e-12)
    np.testing.assert_allclose(out[:, routing], want_routing, atol=1e-12)


def _routing_defaults(options: dict) -> dict:
    """``options`` with every routing preset parameter left to the preset."""
    return {**{name: FROM_PRESET for name in ROUTING_PARAMETERS}, **options}


# Centroid updates: two heads, two centroids along the axes, one token per row with an obvious nearest one.
CENTROIDS = np.array([[[1.0, 0.0], [0.0, 1.0]]] * 2)  # (H, K, D)
# Head 0's tokens all go to centroid 0, head 1's to centroid 1: the per-head counts are (3, 0) and (0, 3),
# google-research's head-mixed ones (2, 1) and (1, 2); centroid 1 of head 0 and 0 of head 1 get no vector.
TOKENS = np.array([[[[2.0, 0.1], [3.0, 0.2], [1.0, 0.2]], [[0.2, 1.0], [0.1, 2.0], [0.3, 3.0]]]])  # (1, 2, 3, 2)
ASSIGNED = np.array([[0, 0, 0], [1, 1, 1]])  # (H, N): by the largest coordinate


def _ema_inputs(update: str, count_rule: str, decay: float):
    return check_centroid_ema_inputs(
        TOKENS, TOKENS, TOKENS, centroids=CENTROIDS, shared_qk=True, key_padding_mask=None, ema_counts=None,
        ema_sums=None, preset=None, centroid_update=update, count_rule=count_rule, decay=decay, ema_eps=1e-5,
        routing_norm="l2", norm_eps=1e-12, query_prescale=1.0,
    )  # fmt: skip


def _ema(update: str, count_rule: str, decay: float):
    return centroids_numba.forward(_ema_inputs(update, count_rule, decay))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_normalized_mean_update_is_the_blend_toward_normalised_sums():
    result = _ema("normalized_mean_ema", "per_head", 0.25)
    np.testing.assert_array_equal(result.aux["assignment"], ASSIGNED[None])
    vectors = _unit(TOKENS[0])  # (H, N, D)
    for h in range(2):
        for c in range(2):
            members = vectors[h][ASSIGNED[h] == c]
            mean = _unit(members.sum(axis=0)) if len(members) else CENTROIDS[h, c]  # (L3) empty: unchanged
            np.testing.assert_allclose(result.out[h, c], 0.25 * CENTROIDS[h, c] + 0.75 * mean, atol=1e-12)


@pytest.mark.parametrize("count_rule", ["per_head", "google_research"])
def test_vq_update_with_zero_decay_is_sums_over_smoothed_counts(count_rule):
    result = _ema("vq_ema", count_rule, 0.0)
    np.testing.assert_array_equal(result.aux["assignment"], ASSIGNED[None])
    vectors = _unit(TOKENS[0])  # (H, N, D)
    counts = np.zeros((2, 2))
    for h in range(2):
        for n in range(3):
            # google-research reshapes the (B, H, N, K) one-hot to (-1, H, K): row h·N + n goes to head (h·N + n) mod H.
            counts[(h * 3 + n) % 2 if count_rule == "google_research" else h, ASSIGNED[h, n]] += 1
    for h in range(2):
        total = counts[h].sum()
        for c in range(2):
            smoothed = (counts[h, c] + 1e-5) / (total + 2e-5) * total
            want = vectors[h][ASSIGNED[h] == c].sum(axis=0) / smoothed
            np.testing.assert_allclose(result.out[h, c], want, rtol=1e-12)


def test_centroid_ema_numba_has_no_vjp():
    inputs = _ema_inputs("vq_ema", "per_head", 0.5)
    with pytest.raises(SpecError, match="centroid_ema"):
        centroids_numba.vjp(inputs, Cotangents(dout=np.zeros(CENTROIDS.shape), dlse=None))
