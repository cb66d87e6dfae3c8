"""The soft-cap derivative is formed without cancellation, in the reference and the kernels."""

import numpy as np
import pytest

from refattn import dense_attention_vjp
from refattn.conformance.tolerance import normwise_error
from refattn.core.softcap import softcap, softcap_slope


def test_slope_matches_sech_squared_to_a_few_roundoffs():
    x = np.concatenate([np.linspace(-300.0, 300.0, 60001), [0.0, 1e-300, 700.0, -2000.0]])
    with np.errstate(over="ignore"):
        sech2 = 1.0 / np.cosh(x) ** 2  # an independent formula: cosh is accurate, 1/inf = 0
    slope = softcap_slope(x, 1.0)
    finite = sech2 > 0
    assert np.all(np.abs(slope[finite] - sech2[finite]) <= 8 * 2.0**-53 * sech2[finite])
    assert np.all(slope[~finite] < 1e-300)
    assert softcap_slope(np.array([0.0]), 3.0)[0] == 1.0


def test_slope_is_the_derivative_of_the_cap():
    s, cap, h = np.linspace(-40.0, 40.0, 81), 7.0, 1e-5
    central = (softcap(s + h, cap) - softcap(s - h, cap)) / (2 * h)  # truncation ~h², rounding ~u·cap/h
    np.testing.assert_allclose(softcap_slope(s, cap), central, rtol=1e-8, atol=1e-10)


def test_cancellation_of_one_minus_tanh_squared_is_gone():
    """At |s / c| = 19, 1 - tanh² is 0 (tanh rounds to 1); sech² keeps every digit."""
    x = np.array([19.0])
    naive = 1.0 - np.tanh(x) ** 2
    exact = 4.0 * np.exp(-38.0)  # sech²(19) = 4e^(-38) (1 + e^(-38))^(-2), the last factor 1 - 6e-17
    assert naive[0] == 0.0
    assert softcap_slope(x, 1.0)[0] == pytest.approx(exact, rel=1e-12)


def saturated_problem(seed):
    """q_i = a_i u, k_j = b_j u with |a_i|, |b_j| in [2, 4]: every score q·k/4 has |s| >= 1, so with
    cap 0.1 every |s / c| >= 10, where 1 - tanh² has lost half its digits."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(16)
    u /= np.linalg.norm(u)
    size = lambda n: rng.choice([-1.0, 1.0], n) * rng.uniform(2.0, 4.0, n)  # noqa: E731
    q = size(2 * 19)[:, None] * u
    k = size(2 * 23)[:, None] * u
    v = rng.standard_normal((1, 2, 23, 8))
    return q.reshape(1, 2, 19, 16), k.reshape(1, 2, 23, 16), v, rng.standard_normal((1, 2, 19, 8))


def test_numba_and_reference_agree_in_float64_on_saturated_scores():
    """Every score saturates the cap, so dq and dk hinge on sech² alone."""
    q, k, v, dout = saturated_problem(7)
    params = dict(softcap=0.1)
    want = dense_attention_vjp(dout, q, k, v, **params)
    got = dense_attention_vjp(dout, q, k, v, **params, backend="numba")
    for name in ("q", "k", "v"):
        assert normwise_error(got[name], want[name]) <= 1e-10, name


def test_the_saturated_problem_exposes_the_naive_derivative(monkeypatch):
    """The check above can fail: with 1 - tanh² the reference's dq moves by far more than 1e-10."""
    import refattn.dense.reference as reference

    q, k, v, dout = saturated_problem(7)
    stable = dense_attention_vjp(dout, q, k, v, softcap=0.1)
    monkeypatch.setattr(reference, "softcap_slope", lambda s, c: 1.0 - np.tanh(s / c) ** 2)
    naive = dense_attention_vjp(dout, q, k, v, softcap=0.1)
    assert normwise_error(naive.q, stable.q) > 1e-8
