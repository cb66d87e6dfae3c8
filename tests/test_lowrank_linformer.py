"""Linformer: dense attention over projected keys, finite differences, the kernel, bad input."""

from functools import partial

import numpy as np
import pytest

from refattn import SpecError, dense_attention
from refattn.lowrank import linformer_attention, linformer_attention_vjp
from refattn.lowrank.linformer.properties import equals_dense_over_projections
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences


def _problem(seed, b=2, hq=4, hkv=2, nq=5, nk=7, d=3, dv=2, p=3, nmax=None, headwise=False):
    rng = np.random.default_rng(seed)
    shape = (hkv, p, nmax or nk) if headwise else (p, nmax or nk)
    return dict(q=rng.standard_normal((b, hq, nq, d)), k=rng.standard_normal((b, hkv, nk, d)),
                v=rng.standard_normal((b, hkv, nk, dv)), e=rng.standard_normal(shape), f=rng.standard_normal(shape))  # fmt: skip


@pytest.mark.parametrize("headwise", [False, True])
def test_equals_dense_attention_over_projected_keys(headwise):
    a = _problem(0, headwise=headwise)
    e, f = (x if x.ndim == 3 else x[None] for x in (a["e"], a["f"]))
    k_proj = np.stack([e[h % e.shape[0]] @ a["k"][:, h] for h in range(2)], axis=1)  # per kv head, by hand
    v_proj = np.stack([f[h % f.shape[0]] @ a["v"][:, h] for h in range(2)], axis=1)
    want = dense_attention(a["q"], k_proj, v_proj)
    got = linformer_attention(a["q"], a["k"], a["v"], e=a["e"], f=a["f"])
    np.testing.assert_allclose(got.out, want.out, rtol=1e-13)
    np.testing.assert_allclose(got.lse, want.lse, rtol=1e-13)


def test_property_dense_over_projections_holds_for_both_backends():
    a = _problem(7)
    params = dict(e=a["e"], f=a["f"])
    equals_dense_over_projections(linformer_attention, a["q"], a["k"], a["v"], params)
    equals_dense_over_projections(partial(linformer_attention, backend="numba"), a["q"], a["k"], a["v"], params, rtol=1e-10)


def test_padding_zeroes_keys_before_projecting_and_slicing_uses_leading_columns():
    a = _problem(1, nmax=10)
    mask = np.ones((2, 7), bool)
    mask[1, 4:] = False
    got = linformer_attention(a["q"], a["k"], a["v"], e=a["e"], f=a["f"], key_padding_mask=mask, slice_projections=True)
    k, v = a["k"] * mask[:, None, :, None], a["v"] * mask[:, None, :, None]
    want = dense_attention(a["q"], np.einsum("pn,bhnd->bhpd", a["e"][:, :7], k), np.einsum("pn,bhnd->bhpd", a["f"][:, :7], v))
    np.testing.assert_allclose(got.out, want.out, rtol=1e-13)


@pytest.mark.parametrize("share, headwise, padded", [(False, False, False), (True, False, True), (False, True, True)])
def test_vjp_matches_finite_differences(share, headwise, padded):
    a = _problem(2, b=1, headwise=headwise, nmax=9)
    if share:
        del a["f"]
    params = {"slice_projections": True}
    if padded:
        params["key_padding_mask"] = np.array([[True] * 5 + [False] * 2])
    rng = np.random.default_rng(3)
    dout, dlse = rng.standard_normal((1, 4, 5, 2)), rng.standard_normal((1, 4, 5))
    grads = linformer_attention_vjp(dout, **a, dlse=dlse, **params)
    assert set(grads) == set(a)
    for name in a:
        want = finite_differences(linformer_attention, a, params, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("precision", ["float64", "float32", "bfloat16"])
def test_numba_agrees(precision):
    a = _problem(4, nq=33, nk=70, d=16, dv=8, p=9, nmax=80)
    params = dict(e=a["e"], f=a["f"], slice_projections=True, key_padding_mask=np.arange(70)[None] < np.array([[70], [41]]))
    check_numba_agreement(linformer_attention, linformer_attention_vjp, a["q"], a["k"], a["v"], params, precision, seed=5)


@pytest.mark.parametrize(
    "params, argument",
    [
        (dict(causal=True), "causal"),
        (dict(e=np.ones((3, 6))), "e"),  # fewer columns than Nk = 7
        (dict(e=np.ones((3, 9))), "e"),  # more columns, slicing off
        (dict(f=np.ones((4, 7))), "f"),  # not e's shape
        (dict(e=np.ones((3, 3, 7))), "e"),  # 3 heads of projections for 2 kv heads
        (dict(key_padding_mask=np.ones((2, 6), bool)), "key_padding_mask"),
    ],
)
def test_bad_input(params, argument):
    a = _problem(6)
    a.update(params)
    with pytest.raises(SpecError, match=f"argument `{argument}`") as error:
        linformer_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)
    if argument == "causal":
        assert "mix every position" in str(error.value)
