"""The hand-derived dense VJP against central finite differences, in float64,
for every combination of the options that change the backward."""

import itertools

import numpy as np
import pytest

from refattn import dense_attention, dense_attention_vjp
from tests.finite_differences import finite_differences

B, HQ, HKV, NQ, NK, D, DV = 1, 4, 2, 3, 4, 3, 2  # GQA 4:2, Nq != Nk
def _finite_differences(params, dout, dlse, arrays, name):
    return finite_differences(dense_attention, arrays, params, dout, dlse, name)


def _problem(seed, causal, window, softcap, bias, mask, dropout):
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=rng.standard_normal((B, HQ, NQ, D)),
        k=rng.standard_normal((B, HKV, NK, D)),
        v=rng.standard_normal((B, HKV, NK, DV)),
    )
    params = dict(softcap=softcap)
    if causal:
        params.update(causal=True, causal_alignment=causal)
    if window:
        params.update(window=window)
    if bias == "full":
        arrays["bias"] = rng.standard_normal((B, HQ, NQ, NK))
    elif bias == "broadcast":
        arrays["bias"] = rng.standard_normal((HQ, 1, NK))
    if mask:
        params["mask"] = rng.random((B, HQ, NQ, NK)) < 0.7
        params["mask"][0, 1, 2] = False  # a fully masked row
    if dropout:
        params.update(dropout_p=0.3, dropout_keep=rng.random((B, HQ, NQ, NK)) >= 0.3)
    dout = rng.standard_normal((B, HQ, NQ, DV))
    dlse = rng.standard_normal((B, HQ, NQ))
    return arrays, params, dout, dlse


COMBINATIONS = list(
    itertools.product(
        [None, "bottom_right", "top_left"],  # causal
        [None, (1, 1)],  # window
        [0.0, 0.8],  # softcap
        [None, "full", "broadcast"],  # bias
        [False, True],  # mask with a fully masked row
        [False, True],  # dropout
    )
)


@pytest.mark.parametrize("causal, window, softcap, bias, mask, dropout", COMBINATIONS)
def test_vjp_matches_finite_differences(causal, window, softcap, bias, mask, dropout):
    arrays, params, dout, dlse = _problem(7, causal, window, softcap, bias, mask, dropout)
    lse = dense_attention(**arrays, **params).lse
    dlse = np.where(np.isfinite(lse), dlse, 0.0)
    grads = dense_attention_vjp(dout, **arrays, dlse=dlse, **params)
    assert set(grads) == set(arrays)
    for name in arrays:
        numeric = _finite_differences(params, dout, dlse, arrays, name)
        assert grads[name].shape == arrays[name].shape
        scale = max(np.max(np.abs(numeric)), 1e-3)
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * scale, name


@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_vjp_without_dlse(causal):
    arrays, params, dout, _ = _problem(8, causal, None, 0.0, "full", True, False)
    grads = dense_attention_vjp(dout, **arrays, **params)
    for name in arrays:
        numeric = _finite_differences(params, dout, None, arrays, name)
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-3), name


def test_fully_masked_rows_have_zero_gradient():
    arrays, params, dout, dlse = _problem(9, None, None, 0.0, None, True, False)
    params["mask"][:] = False
    grads = dense_attention_vjp(dout, **arrays, dlse=np.zeros_like(dlse), **params)
    for name, grad in grads.items():
        assert np.all(grad == 0), name


def test_lse_gradient_is_softmax_times_scale_times_keys():
    # d lse_i / d q_i = scale * sum_j p_ij k_j: a closed form for the dlse path alone.
    arrays, params, _, _ = _problem(10, None, None, 0.0, None, False, False)
    q, k = arrays["q"], np.repeat(arrays["k"], HQ // HKV, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dlse = np.ones((B, HQ, NQ))
    grads = dense_attention_vjp(np.zeros((B, HQ, NQ, DV)), **arrays, dlse=dlse, **params)
    np.testing.assert_allclose(grads.q, np.einsum("bhqk,bhkd->bhqd", p, k) / np.sqrt(D), rtol=1e-13)
    np.testing.assert_array_equal(grads.v, 0.0)
