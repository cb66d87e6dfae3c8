"""Generic low-rank attention: the explicit n × n form, finite differences, the kernel, bad input."""

from functools import partial

import numpy as np
import pytest

from refattn import SpecError
from refattn.lowrank import lowrank_attention, lowrank_attention_vjp
from refattn.lowrank.generic.properties import matches_explicit_matrix
from tests.finite_differences import finite_differences


def _factors(seed, b=1, h=2, nq=4, nk=5, r=3, dv=2):
    rng = np.random.default_rng(seed)
    return dict(u=rng.random((b, h, nq, r)) + 0.1, w=rng.random((b, h, r, nk)) + 0.1, v=rng.standard_normal((b, h, nk, dv)))


@pytest.mark.parametrize("normalized", [True, False])
def test_equals_the_explicit_matrix(normalized):
    a = _factors(0)
    matches_explicit_matrix(lowrank_attention, a["u"], a["w"], a["v"], {"normalized": normalized})
    matches_explicit_matrix(partial(lowrank_attention, backend="numba"), a["u"], a["w"], a["v"], {"normalized": normalized})


def test_exact_softmax_factors_reproduce_dense_attention():
    """r = Nk with U = exp(scores), W = I: the normalised form is softmax attention."""
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 1, 4, 3)), rng.standard_normal((1, 1, 6, 3)), rng.standard_normal((1, 1, 6, 2))
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(3)
    out = lowrank_attention(np.exp(scores), np.eye(6)[None, None], v).out
    weights = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    np.testing.assert_allclose(out, weights @ v, rtol=1e-13)


@pytest.mark.parametrize("normalized", [True, False])
def test_vjp_matches_finite_differences(normalized):
    a = _factors(2)
    dout = np.random.default_rng(3).standard_normal((1, 2, 4, 2))
    grads = lowrank_attention_vjp(dout, **a, normalized=normalized)
    for name in ("u", "w", "v"):
        want = finite_differences(lowrank_attention, a, {"normalized": normalized}, dout, None, name)
        np.testing.assert_allclose(grads[name], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numba_agrees(dtype):
    a = _factors(4, b=2, nq=9, nk=70, r=5, dv=7)
    dout = np.random.default_rng(5).standard_normal((2, 2, 9, 7))
    tol = 1e-12 if dtype == "float64" else 2e-5
    cast = {n: x.astype(dtype) for n, x in a.items()}
    for normalized in (True, False):
        ref = lowrank_attention(**a, normalized=normalized)
        fast = lowrank_attention(**cast, normalized=normalized, backend="numba")
        assert fast.out.dtype == np.dtype(dtype)
        np.testing.assert_allclose(fast.out, ref.out, rtol=tol, atol=tol * np.abs(ref.out).max())
        ref_g = lowrank_attention_vjp(dout, **a, normalized=normalized)
        fast_g = lowrank_attention_vjp(dout.astype(dtype), **cast, normalized=normalized, backend="numba")
        for name in ref_g:
            np.testing.assert_allclose(fast_g[name], ref_g[name], rtol=tol, atol=tol * np.abs(ref_g[name]).max())


@pytest.mark.parametrize(
    "change, argument",
    [
        (lambda a: a.update(w=a["w"][:, :, :2]), "w"),  # rank 2 against u's 3: does not chain
        (lambda a: a.update(v=a["v"][:, :, :3]), "v"),  # 3 values for 5 keys
        (lambda a: a.update(u=a["u"][0]), "u"),  # 3 dimensions
        (lambda a: a.update(w=np.zeros_like(a["w"])), "u, w"),  # a zero row sum when normalised
    ],
)
def test_bad_input(change, argument):
    a = _factors(6)
    change(a)
    with pytest.raises(SpecError, match=f"argument `{argument}`"):
        lowrank_attention(**a)
