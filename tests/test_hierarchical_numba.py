"""The Numba backends of h1d and multilevel against their references."""

import numpy as np
import pytest

from refattn.hierarchical import h1d_attention, h1d_attention_vjp, multilevel_attention, multilevel_attention_vjp
from tests.agreement import check_numba_agreement
from tests.test_hierarchical_multilevel import SEGMENTS, problem

H1D_PROBLEMS = [
    (16, 2, {"block_size": 4}),
    (24, 1, {"block_size": 6, "causal": True}),
    (24, 2, {"block_size": 3, "neighbours": "siblings"}),
    (64, 2, {"block_size": 2, "causal": True}),
    (13, 2, {"block_size": 4, "padding": True}),
    (32, 2, {"block_size": 4, "num_levels": 2}),
]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("n, hkv, params", H1D_PROBLEMS, ids=lambda p: str(p))
def test_h1d_numba_agrees_within_the_budgets(n, hkv, params, precision):
    rng = np.random.default_rng(n)
    q, k, v = rng.standard_normal((2, 4, n, 8)), rng.standard_normal((2, hkv, n, 8)), rng.standard_normal((2, hkv, n, 5))
    check_numba_agreement(h1d_attention, h1d_attention_vjp, q, k, v, params, precision, seed=n)


@pytest.mark.parametrize("causal", [False, True])
def test_h1d_numba_lucidrains_preset(causal):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 32, 8)) for _ in range(3))
    params = {"block_size": 4, "causal": causal, "preset": "lucidrains"}
    want = h1d_attention(q, k, v, **params)
    got = h1d_attention(q, k, v, **params, backend="numba")
    assert got.lse is None
    np.testing.assert_allclose(got.out, want.out, atol=1e-12)
    dout = rng.standard_normal(want.out.shape)
    want_grads = h1d_attention_vjp(dout, q, k, v, **params)
    got_grads = h1d_attention_vjp(dout, q, k, v, **params, backend="numba")
    for name in "qkv":
        np.testing.assert_allclose(got_grads[name], want_grads[name], atol=1e-12, err_msg=name)


@pytest.mark.parametrize("aggregate", ["attention_pool", "mean", "max", "first", "weights"])
@pytest.mark.parametrize("output", ["per_token", "per_unit"])
def test_multilevel_numba_equals_the_reference(aggregate, output):
    rng = np.random.default_rng(2)
    arrays = problem(rng, SEGMENTS, aggregate)
    params = {"segments": SEGMENTS, "aggregate": aggregate, "output": output}
    want = multilevel_attention(**arrays, **params)
    dout = rng.standard_normal(want.out.shape)
    want_grads = multilevel_attention_vjp(dout, **arrays, **params)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-5)):
        cast = {name: value.astype(dtype) for name, value in arrays.items()}
        got = multilevel_attention(**cast, **params, backend="numba")
        assert got.out.dtype == dtype
        np.testing.assert_allclose(got.out, want.out, atol=tol * np.abs(want.out).max())
        for name, value in want.aux.items():
            if value.dtype.kind == "i":
                np.testing.assert_array_equal(got.aux[name], value)
        got_grads = multilevel_attention_vjp(dout.astype(dtype), **cast, **params, backend="numba")
        for name in want_grads:
            np.testing.assert_allclose(got_grads[name], want_grads[name], atol=tol * np.abs(want_grads[name]).max() * 10,
                                       err_msg=name)  # fmt: skip
