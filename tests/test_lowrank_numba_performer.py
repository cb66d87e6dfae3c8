"""Performer's tiled Numba kernel across tile boundaries, against the reference's explicit matrix Â.

The reference forms the (Nq, Nk) matrix Â from the features and multiplies;
the kernel never forms it (key sums over tiles of TILE rows, causal prefix sums
over tiles of CAUSAL_TILE rows with the levels carried between them), so the
two are different formulations of the same steps. Lengths here span several
tiles, with grouped heads, every stabiliser and ε option, and keys whose
largest projections sit in a late tile (the global level then grows during
the key pass, and the prefix level inside a causal tile).
"""

import numpy as np
import pytest

from refattn.lowrank import orthogonal_features, performer_attention, performer_attention_vjp
from refattn.lowrank.performer.numba import CAUSAL_TILE, TILE

OPTIONS = [
    dict(preset=None),
    dict(preset="lucidrains"),
    dict(preset="google"),
    dict(feature_eps=0.1, key_stabilizer="none", query_stabilizer="none", denominator_feature_eps=0.05, denominator_guard=1e-3),
]


def _problem(seed, n, d=8, dv=5):
    """q (2, 2, n, d) and k, v on one kv head, the keys' norms growing along the sequence."""
    rng = np.random.default_rng(seed)
    growth = np.linspace(0.5, 1.5, n)[:, None]
    q = 0.8 * rng.standard_normal((2, 2, n, d))
    k = 0.8 * growth * rng.standard_normal((2, 1, n, d))
    v = rng.standard_normal((2, 1, n, dv))
    return q, k, v, rng.standard_normal((2, 2, n, dv))


def _check(causal, options, n, dtype, rtol):
    q, k, v, dout = _problem(3, n)
    params = dict(omega=orthogonal_features(np.random.default_rng(4), 12, 8), causal=causal, **options)
    want = performer_attention(q, k, v, **params).out
    want_grads = performer_attention_vjp(dout, q, k, v, **params)
    cast = [a.astype(dtype) for a in (q, k, v)]
    got = performer_attention(*cast, **params, backend="numba").out
    got_grads = performer_attention_vjp(dout.astype(dtype), *cast, **params, backend="numba")
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max())
    for name in "qkv":
        np.testing.assert_allclose(got_grads[name], want_grads[name], rtol=0, atol=rtol * np.abs(want_grads[name]).max())


@pytest.mark.parametrize("options", OPTIONS)
def test_causal_tiles_agree_in_float64(options):
    _check(True, options, 2 * CAUSAL_TILE + 44, np.float64, 1e-12)


@pytest.mark.parametrize("options", OPTIONS[:2] + OPTIONS[3:])
def test_key_tiles_agree_in_float64(options):
    _check(False, options, TILE + 76, np.float64, 1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_agrees_to_float32_rounding(causal):
    """Computed in float32 throughout: agreement to a few hundred float32 ulps of the largest entry."""
    _check(causal, OPTIONS[1], TILE + 76 if not causal else 2 * CAUSAL_TILE + 44, np.float32, 5e-5)


def test_prefix_levels_keep_large_logits_finite_in_float32():
    """Key projections near 100 overflow exp in float32 without the prefix level; with it the kernel stays finite and agrees."""
    q, k, v, _ = _problem(5, CAUSAL_TILE + 30)
    k[..., -40:, :] *= 12.0  # the level grows inside the second tile
    params = dict(omega=orthogonal_features(np.random.default_rng(6), 12, 8), causal=True)
    want = performer_attention(q, k, v, **params).out
    got = performer_attention(*(a.astype(np.float32) for a in (q, k, v)), **params, backend="numba").out
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5 * np.abs(want).max())
