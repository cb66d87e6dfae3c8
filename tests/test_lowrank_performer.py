"""Performer: the features by hand, prefix sums by hand, unbiasedness, causality, finite differences, the kernel, bad input."""

from functools import partial

import numpy as np
import pytest

from refattn import SpecError
from refattn.lowrank import orthogonal_features, performer_attention, performer_attention_vjp
from refattn.lowrank.performer.properties import causal_independence
from tests.finite_differences import finite_differences


def _qkv(seed, b=1, hq=2, hkv=1, n=7, d=4, dv=3, std=0.7):
    rng = np.random.default_rng(seed)
    return tuple(std * rng.standard_normal(s) for s in ((b, hq, n, d), (b, hkv, n, d), (b, hkv, n, dv)))


def _phi(x, omega, eps=0.0):
    """φ(x) = m^−½ (exp(ωᵀx' − ‖x'‖²/2) + ε), x' = d^−¼ x, with no stabiliser."""
    x = x * x.shape[-1] ** -0.25
    return (np.exp(x @ omega.T - 0.5 * np.sum(x * x, -1, keepdims=True)) + eps) / np.sqrt(omega.shape[0])


@pytest.mark.parametrize("causal", [False, True])
def test_canonical_equals_the_paper_formula(causal):
    """Stabilisers cancel exactly when ε = 0: D⁻¹ φ(Q)(φ(K)ᵀV), causal by explicit prefix sums."""
    q, k, v = _qkv(0, hq=1)
    omega = orthogonal_features(np.random.default_rng(1), 6, 4)
    fq, fk = _phi(q[0, 0], omega), _phi(k[0, 0], omega)
    if causal:
        want = np.stack([fq[i] @ (fk[: i + 1].T @ v[0, 0, : i + 1]) / (fq[i] @ fk[: i + 1].sum(0)) for i in range(7)])
    else:
        want = fq @ (fk.T @ v[0, 0]) / (fq @ fk.sum(0))[:, None]
    got = performer_attention(q, k, v, omega=omega, causal=causal).out[0, 0]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_lucidrains_preset_equals_its_formula():
    """performer-pytorch causal: φ(k) with one max over all keys and features, ε 1e-4, +1e-6 per cumulative feature."""
    q, k, v = _qkv(2, hq=1)
    omega = orthogonal_features(np.random.default_rng(3), 8, 4)
    d, m = 4, 8
    qs, ks = q[0, 0] * d**-0.25, k[0, 0] * d**-0.25
    qp, kp = qs @ omega.T, ks @ omega.T
    fq = (np.exp(qp - 0.5 * (qs**2).sum(-1, keepdims=True) - qp.max(-1, keepdims=True)) + 1e-4) / np.sqrt(m)
    fk = (np.exp(kp - 0.5 * (ks**2).sum(-1, keepdims=True) - kp.max()) + 1e-4) / np.sqrt(m)
    want = np.stack([fq[i] @ (fk[: i + 1].T @ v[0, 0, : i + 1]) / (fq[i] @ (fk[: i + 1].sum(0) + 1e-6)) for i in range(7)])
    got = performer_attention(q, k, v, omega=omega, causal=True, preset="lucidrains").out[0, 0]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_estimator_is_unbiased():
    """E_ω[φ(q)ᵀφ(k)] = exp(qᵀk/√d) (Lemma 1). Over 4000 independent Gaussian ω (m = 1 each, seed 0) the mean
    of the unnormalised kernel matrix must be within 4 standard errors of the softmax kernel for every entry
    (a two-sided bound failing with probability below 1e-4 per entry under the CLT)."""
    q, k, _ = _qkv(4, n=3, d=4, std=0.5)
    rng = np.random.default_rng(0)
    samples = np.stack([_phi(q[0, 0], w) @ _phi(k[0, 0], w).T for w in rng.standard_normal((4000, 1, 4))])
    exact = np.exp(q[0, 0] @ k[0, 0].T / 2.0)
    standard_error = samples.std(axis=0) / np.sqrt(len(samples))
    assert np.all(np.abs(samples.mean(axis=0) - exact) <= 4 * standard_error)


def test_many_features_approach_softmax_attention():
    """The mechanism itself: with m = 4096 orthogonal features the output is within 0.05 of softmax attention."""
    q, k, v = _qkv(5, n=6, d=4, std=0.5)
    omega = orthogonal_features(np.random.default_rng(6), 4096, 4)
    logits = q[0, 0] @ k[0, 0].T / 2.0
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    got = performer_attention(q[:, :1], k, v, omega=omega).out[0, 0]
    assert np.abs(got - weights @ v[0, 0]).max() < 0.05


@pytest.mark.parametrize("preset, leaks", [(None, False), ("lucidrains", True), ("google", True)])
def test_causal_outputs_do_not_depend_on_later_keys(preset, leaks):
    q, k, v = _qkv(7, n=10, d=8, std=1.0)
    params = dict(omega=orthogonal_features(np.random.default_rng(8), 16, 8), causal=True, preset=preset)
    if leaks:
        with pytest.raises(AssertionError):
            causal_independence(performer_attention, q, k, v, params)
    else:
        causal_independence(performer_attention, q, k, v, params)
        causal_independence(partial(performer_attention, backend="numba"), q, k, v, params)


PARAMS = [dict(), dict(causal=True), dict(causal=True, feature_eps=0.1, key_stabilizer="none", query_stabilizer="none",
                                            denominator_feature_eps=0.05, denominator_guard=1e-3)]  # fmt: skip


@pytest.mark.parametrize("params", PARAMS)
def test_vjp_matches_finite_differences(params):
    """With ε = 0 the stabilisers cancel; with ε > 0 finite differences would move the maxima the VJP holds fixed,
    so that case runs without stabilisers."""
    q, k, v = _qkv(9, n=5, d=3, dv=2)
    arrays = dict(q=q, k=k, v=v)
    params = dict(params, omega=orthogonal_features(np.random.default_rng(10), 4, 3))
    dout = np.random.default_rng(11).standard_normal((1, 2, 5, 2))
    grads = performer_attention_vjp(dout, **arrays, **params)
    for name in arrays:
        want = finite_differences(performer_attention, arrays, params, dout, None, name)
        np.testing.assert_allclose(grads[name], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "params, argument",
    [
        (dict(omega=np.ones((8, 3))), "omega"),  # D = 4
        (dict(omega=np.ones(4)), "omega"),
        (dict(key_stabilizer="prefix"), "key_stabilizer"),  # not causal
        (dict(key_stabilizer="batch"), "key_stabilizer"),
        (dict(feature_eps=-1.0), "feature_eps"),
        (dict(preset="fairseq"), "preset"),
    ],
)
def test_bad_input(params, argument):
    q, k, v = _qkv(12)
    params = {"omega": np.ones((8, 4)), **params}
    with pytest.raises(SpecError, match=f"argument `{argument}`"):
        performer_attention(q, k, v, **params)


def test_causal_needs_equal_lengths():
    q, k, v = _qkv(13)
    with pytest.raises(SpecError, match="argument `k`"):
        performer_attention(q, k[:, :, :5], v[:, :, :5], omega=np.ones((8, 4)), causal=True)
