"""Differential attention (refattn/dilution/differential): λ_init and the key-head map
against hand tables, closed forms on tiny inputs, the authors' naive formulation
(weights subtracted before ``· v``, multihead_diffattn.py) in NumPy, the
hand-derived VJP against finite differences, bad input, properties under
Hypothesis, the Numba backend against the reference within the conformance
budgets, and the conformance cases (exported to a temporary folder) against a
PyTorch transcription of the authors' code and its wrong variants, one per flag."""

import math
from functools import partial

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import refattn.conformance.flags as flag_catalogue
from refattn import SpecError
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.tolerance import error
from refattn.conformance.verify import verify
from refattn.core import registry
from refattn.core.results import Result
from refattn.dilution.differential import (
    differential_attention,
    differential_attention_vjp,
    key_heads,
    lambda_init_from_depth,
    properties,
)
from refattn.dilution.differential.cases import FLAGS, cases
from tests import agreement
from tests.finite_differences import finite_differences

from .naive_dense import naive_dense

try:
    import torch
except ImportError:  # only the PyTorch transcription of the authors' code needs it
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

LAMBDA_NAMES = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def _problem(seed, sizes, *, lambda_std=0.5, norm_weight=False, bias=None, mask=False, **params):
    """Arrays and parameters: sizes (B, H, Hkv, Nq, Nk, D); ``bias`` "per_query_head" or "2d"."""
    b, h, hkv, nq, nk, d = sizes
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=1.2 * rng.standard_normal((b, 2 * h, nq, d)),
        k=1.2 * rng.standard_normal((b, 2 * hkv, nk, d)),
        v=rng.standard_normal((b, hkv, nk, 2 * d)),
        **{name: lambda_std * rng.standard_normal(d) for name in LAMBDA_NAMES},
    )
    if norm_weight:
        arrays["norm_weight"] = rng.uniform(0.5, 1.5, 2 * d)
    if bias == "per_query_head":
        arrays["bias"] = rng.standard_normal((1, 2 * h, 1, nk))
    elif bias == "2d":
        arrays["bias"] = rng.standard_normal((nq, nk))
    if mask:
        params["mask"] = rng.random((b, 2 * h, nq, nk)) < 0.7
    params.setdefault("depth", 3)
    return arrays, params, rng


# --- λ_init and the head maps --------------------------------------------------


def test_lambda_init_is_the_authors_schedule():
    assert lambda_init_from_depth(0) == pytest.approx(0.2, abs=1e-15)
    assert lambda_init_from_depth(1) == pytest.approx(0.355509, abs=1e-6)  # 0.8 - 0.6 e^-0.3
    assert lambda_init_from_depth(40) == pytest.approx(0.8, abs=1e-5)
    for depth in range(30):
        assert lambda_init_from_depth(depth) == 0.8 - 0.6 * math.exp(-0.3 * depth)  # bitwise lambda_init_fn


def test_depth_and_the_equivalent_lambda_init_agree_exactly():
    arrays, params, _ = _problem(1, (1, 2, 1, 4, 5, 3), causal=True)
    by_depth = differential_attention(**arrays, **params)
    given_init = differential_attention(**arrays, **dict(params, depth=None, lambda_init=lambda_init_from_depth(3)))
    np.testing.assert_array_equal(by_depth.out, given_init.out)


@pytest.mark.parametrize(
    "heads, kv_heads, paired, repeat_kv",
    [
        (2, 2, [[0, 2], [1, 3]], [[0, 2], [1, 3]]),  # MHA: both rules read key 2h + c
        (4, 2, [[0, 0, 2, 2], [1, 1, 3, 3]], [[0, 1, 2, 3], [0, 1, 2, 3]]),  # G = 2: repeat_kv gives both maps key h
        (3, 1, [[0, 0, 0], [1, 1, 1]], [[0, 0, 1], [0, 1, 1]]),  # G = 3
        (4, 1, [[0, 0, 0, 0], [1, 1, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]]),  # G = 4
    ],
)
def test_key_heads_match_the_hand_table(heads, kv_heads, paired, repeat_kv):
    assert key_heads(heads, kv_heads, "paired").tolist() == paired
    assert key_heads(heads, kv_heads, "repeat_kv").tolist() == repeat_kv


# --- closed forms ------------------------------------------------------------------


def _two_keys_by_hand():
    """One output head, one query, two keys, D = 1, scale 1: map 0 has logits (0, ln 3), weights (1/4, 3/4);
    map 1 has (ln 3, 0), weights (3/4, 1/4); v_0 = (1, 0), v_1 = (0, 1); λ vectors 0, so λ = λ_init = 0.5."""
    q = np.ones((1, 2, 1, 1))
    k = np.array([0.0, math.log(3.0), math.log(3.0), 0.0]).reshape(1, 2, 2, 1)
    v = np.eye(2).reshape(1, 1, 2, 2)
    zeros = {name: np.zeros(1) for name in LAMBDA_NAMES}
    return (q, k, v), dict(zeros, lambda_init=0.5, scale=1.0)


def test_two_keys_by_hand():
    arrays, params = _two_keys_by_hand()
    diff = np.array([1 / 4 - 0.5 * 3 / 4, 3 / 4 - 0.5 * 1 / 4])  # (-1/8, 5/8)
    raw = differential_attention(*arrays, **params, apply_norm=False)
    np.testing.assert_allclose(raw.out[0, 0, 0], diff, rtol=1e-15)
    assert raw.lse is None
    np.testing.assert_allclose(raw.aux["map_lse"][0, :, 0], [math.log(4.0)] * 2, rtol=1e-15)
    weight = np.array([2.0, -1.0])
    normed = differential_attention(*arrays, **params, norm_weight=weight)
    want = 0.5 * diff / math.sqrt(13 / 64 + 1e-5) * weight  # mean square (1/64 + 25/64) / 2 = 13/64
    np.testing.assert_allclose(normed.out[0, 0, 0], want, rtol=1e-14)


def test_a_single_key_gives_one_minus_lambda_times_its_value():
    arrays, params, _ = _problem(2, (1, 2, 2, 3, 1, 4), norm_weight=True, depth=6)
    result = differential_attention(**arrays, **params)
    lam = math.exp(arrays["lambda_q1"] @ arrays["lambda_k1"]) - math.exp(arrays["lambda_q2"] @ arrays["lambda_k2"])
    lam += lambda_init_from_depth(6)
    diff = np.broadcast_to((1 - lam) * arrays["v"][:, :, :1], (1, 2, 3, 8))  # every query, both heads: (1 - λ) v_0
    want = (1 - lambda_init_from_depth(6)) * diff / np.sqrt(np.mean(diff**2, -1, keepdims=True) + 1e-5) * arrays["norm_weight"]
    np.testing.assert_allclose(result.out, want, rtol=1e-13)
    logits = np.einsum("bgqd,bgd->bgq", arrays["q"], arrays["k"][:, :, 0]) / 2.0  # MHA: query head g reads key head g
    np.testing.assert_allclose(result.aux["map_lse"], logits, rtol=1e-14)  # one key: each map's lse is its logit


def test_fully_masked_rows_give_zero_output_infinite_map_lse_and_zero_gradients():
    arrays, params, rng = _problem(3, (1, 2, 1, 5, 3, 4), norm_weight=True, causal=True)  # queries 0, 1 see no key
    result = differential_attention(**arrays, **params)
    assert np.all(result.out[:, :, :2] == 0) and np.all(result.aux["map_lse"][:, :, :2] == -np.inf)
    dout = rng.standard_normal(result.out.shape)
    dout[:, :, 2:] = 0
    grads = differential_attention_vjp(dout, **arrays, **params)
    assert all(np.all(g == 0) for g in grads.values())


def test_lse_is_none_and_the_maps_lse_is_an_intermediate_without_a_cotangent():
    """An output head is a difference of two softmax maps and a norm: it has no log-sum-exp of its own."""
    arrays, params, rng = _problem(3, (1, 2, 1, 5, 3, 4), causal=True)
    for backend in ("reference", "numba"):
        result = differential_attention(**arrays, **params, backend=backend)
        assert result.lse is None and result.aux["map_lse"].shape == (1, 4, 5)
        with pytest.raises(SpecError) as info:
            differential_attention_vjp(result.out, **arrays, **params, dlse=np.zeros((1, 4, 5)), backend=backend)
        assert info.value.argument == "dlse"


# --- the authors' naive formulation --------------------------------------------------


def _authors_naive(q, k, v, *, lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init=None, depth=None,
                   norm_weight=None, norm_eps=1e-5, apply_norm=True, gqa_keys="paired", **dense):  # fmt: skip
    """multihead_diffattn.py in NumPy: weights of all 2H query heads (tests/naive_dense.py with one-hot
    values), viewed (B, H, 2, Nq, Nk), subtracted, times v, subln, times 1 - λ_init."""
    b, two_h, nq, d = q.shape
    kv_heads, nk = v.shape[1], v.shape[2]
    heads = two_h // 2
    group = heads // kv_heads
    if gqa_keys == "repeat_kv":
        keys = np.repeat(k, group, axis=1)  # repeat_kv(k, n_rep) over 2 Hkv heads
    else:  # the flash variants: k.reshape(B, N, Hkv, 2, D); kv head j's pair, for its G output heads
        keys = np.repeat(k.reshape(b, kv_heads, 2, nk, d), group, axis=1).reshape(b, two_h, nk, d)
    one_hot = np.broadcast_to(np.eye(nk), (b, two_h, nk, nk))
    weights, lse = naive_dense(q, keys, one_hot, **dense)  # (B, 2H, Nq, Nk): out of one-hot values is P
    lambda_init = lambda_init_from_depth(depth) if depth is not None else lambda_init
    lam = math.exp(lambda_q1 @ lambda_k1) - math.exp(lambda_q2 @ lambda_k2) + lambda_init
    weights = weights.reshape(b, heads, 2, nq, nk)
    attn = (weights[:, :, 0] - lam * weights[:, :, 1]) @ np.repeat(v, group, axis=1)
    if apply_norm:
        attn = attn / np.sqrt(np.mean(attn**2, axis=-1, keepdims=True) + norm_eps)
        attn = (attn if norm_weight is None else attn * norm_weight) * (1 - lambda_init)
    return attn, lse


NAIVE_OPTIONS = {
    "causal": dict(causal=True),
    "top_left_cross": dict(causal=True, causal_alignment="top_left"),
    "repeat_kv": dict(gqa_keys="repeat_kv", causal=True),
    "no_norm": dict(apply_norm=False, lambda_std=1.0),
    "weight_bias_softcap_window": dict(norm_weight=True, bias="per_query_head", softcap=1.5, window=(2, 1)),
    "mask_scale_2d_bias": dict(mask=True, scale=0.4, bias="2d", gqa_keys="repeat_kv"),
    "explicit_lambda_init": dict(depth=None, lambda_init=-0.3, norm_eps=1e-2),
}


@pytest.mark.parametrize("option", list(NAIVE_OPTIONS))
@pytest.mark.parametrize("sizes", [(2, 4, 2, 5, 7, 3), (1, 3, 1, 6, 6, 2), (1, 2, 2, 4, 4, 5)], ids=["gqa", "mqa", "mha"])
def test_matches_the_authors_naive_formulation(option, sizes):
    arrays, params, _ = _problem(4, sizes, **NAIVE_OPTIONS[option])
    result = differential_attention(**arrays, **params)
    out, lse = _authors_naive(**arrays, **params)
    np.testing.assert_allclose(result.out, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(result.aux["map_lse"]), np.isinf(lse))
    np.testing.assert_allclose(result.aux["map_lse"], lse, rtol=1e-12, atol=1e-12)
    assert result.lse is None and set(result.aux) == {"map_lse"}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_lower_precision_evaluation_stays_close(precision):
    arrays, params, _ = _problem(5, (1, 4, 2, 5, 7, 3), norm_weight=True, causal=True)
    exact = differential_attention(**arrays, **params)
    emulated = differential_attention(**arrays, **params, precision=precision)
    assert 0 < error("out", emulated.out, exact.out) < {"float32": 1e-5, "bfloat16": 0.1}[precision]


# --- gradients ------------------------------------------------------------------------

GRADIENT_SETTINGS = {
    "paired_causal_weight": dict(causal=True, norm_weight=True),
    "repeat_kv_top_left_bias": dict(gqa_keys="repeat_kv", causal=True, causal_alignment="top_left", bias="per_query_head"),
    "no_norm_softcap_2d_bias": dict(apply_norm=False, softcap=2.0, bias="2d"),
    "norm_without_weight_window": dict(window=(1, 1), gqa_keys="repeat_kv"),
    "fully_masked_rows_mask": dict(causal=True, sizes=(1, 2, 1, 5, 3, 2), mask=True, norm_weight=True),
    "explicit_lambda_init_large_eps": dict(depth=None, lambda_init=0.7, norm_eps=0.05, norm_weight=True),
}


@pytest.mark.parametrize("setting", list(GRADIENT_SETTINGS))
def test_vjp_matches_finite_differences(setting):
    options = dict(GRADIENT_SETTINGS[setting])
    sizes = options.pop("sizes", (1, 2, 1, 3, 4, 2))
    arrays, params, rng = _problem(6, sizes, **options)
    result = differential_attention(**arrays, **params)
    dout = rng.standard_normal(result.out.shape)
    grads = differential_attention_vjp(dout, **arrays, **params)
    assert list(grads)[:7] == ["q", "k", "v", *LAMBDA_NAMES] and set(grads) == set(arrays)
    for name in arrays:
        numeric = finite_differences(differential_attention, arrays, params, dout, None, name)
        assert grads[name].shape == arrays[name].shape
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-3), name


# --- bad input ---------------------------------------------------------------------------

rng0 = np.random.default_rng(0)
Q, K, V = rng0.standard_normal((1, 4, 3, 5)), rng0.standard_normal((1, 2, 6, 5)), rng0.standard_normal((1, 1, 6, 10))
GOOD = {name: rng0.standard_normal(5) for name in LAMBDA_NAMES} | dict(depth=2)

BAD = {
    "q rank": (dict(q=Q[0]), "q", "4 dimensions"),
    "q odd heads": (dict(q=Q[:, :3]), "q", "even number of heads"),
    "k odd heads": (dict(k=K[:, :1], v=V), "k", "even number of heads"),
    "k head dim": (dict(k=K[..., :4]), "k", "head dim 5"),
    "H not a multiple of Hkv": (dict(q=np.zeros((1, 6, 3, 5)), k=np.zeros((1, 4, 6, 5)), v=np.zeros((1, 2, 6, 10))),
                                "k", "dividing H = 3"),  # fmt: skip
    "v heads not half of k's": (dict(v=np.zeros((1, 2, 6, 10))), "v", "(B, Hkv, Nk) = (1, 1, 6)"),
    "v head dim not 2D": (dict(v=V[..., :5]), "v", "head dim 2·D = 10"),
    "v not finite": (dict(v=np.full((1, 1, 6, 10), np.inf)), "v", "finite"),
    "lambda_q1 wrong length": (dict(lambda_q1=np.ones(4)), "lambda_q1", "shape (D,) = (5,)"),
    "lambda_k2 2-d": (dict(lambda_k2=np.ones((1, 5))), "lambda_k2", "shape (D,)"),
    "lambda_q2 nan": (dict(lambda_q2=np.array([0.1, np.nan, 0, 0, 0])), "lambda_q2", "finite"),
    "lambda_k1 a list": (dict(lambda_k1=[0.1] * 5), "lambda_k1", "numpy array"),
    "exp(lambda_q2 . lambda_k2) overflows": (dict(lambda_q2=np.full(5, 20.0), lambda_k2=np.full(5, 20.0)),
                                             "lambda_q2, lambda_k2", "<= 709.78"),  # fmt: skip
    "lambda_init and depth": (dict(lambda_init=0.5), "lambda_init, depth", "exactly one"),
    "neither lambda_init nor depth": (dict(depth=None), "lambda_init, depth", "exactly one"),
    "depth negative": (dict(depth=-1), "depth", "integer >= 0"),
    "depth float": (dict(depth=2.0), "depth", "integer >= 0"),
    "depth bool": (dict(depth=True), "depth", "integer >= 0"),
    "lambda_init nan": (dict(depth=None, lambda_init=float("nan")), "lambda_init", "finite"),
    "norm_weight wrong shape": (dict(norm_weight=np.ones(5)), "norm_weight", "(2D,) = (10,)"),
    "norm_weight without the norm": (dict(norm_weight=np.ones(10), apply_norm=False), "norm_weight", "apply_norm=False"),
    "norm_eps zero": (dict(norm_eps=0.0), "norm_eps", "(0.0, inf)"),
    "apply_norm not a bool": (dict(apply_norm="yes"), "apply_norm", "True or False"),
    "gqa_keys": (dict(gqa_keys="tile"), "gqa_keys", "repeat_kv"),
    "mask per output head": (dict(mask=np.ones((1, 2, 3, 6), bool)), "mask", "(1, 4, 3, 6)"),
    "bias per output head": (dict(bias=np.zeros((2, 3, 6))), "bias", "(1, 4, 3, 6)"),
    "scale": (dict(scale=-1.0), "scale", "(0.0, inf)"),
    "window": (dict(window=(-1, 0)), "window", "non-negative"),
    "softcap": (dict(softcap=-1.0), "softcap", "[0.0, inf)"),
    "precision": (dict(precision="fp8"), "precision", "bfloat16"),
    "backend": (dict(backend="triton"), "backend", "numba"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_forward_rejects(case):
    overrides, argument, expected = BAD[case]
    with pytest.raises(SpecError) as info:
        differential_attention(**(dict(q=Q, k=K, v=V, **GOOD) | overrides))
    assert info.value.argument == argument
    assert expected in str(info.value)


@pytest.mark.parametrize("case", ["q odd heads", "v head dim not 2D", "lambda_q1 wrong length", "depth negative", "mask per output head"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_vjp_and_numba_reject_the_same(case, backend):
    overrides, argument, _ = BAD[case]
    with pytest.raises(SpecError) as info:
        differential_attention_vjp(np.zeros((1, 2, 3, 10)), **(dict(q=Q, k=K, v=V, **GOOD, backend=backend) | overrides))
    assert info.value.argument == argument


@pytest.mark.parametrize("cotangents", [dict(dout=np.zeros((1, 4, 3, 10))), dict(dout=np.zeros((1, 2, 3, 10)), dlse=np.zeros((1, 4, 3)))],
                         ids=["dout of 2H heads", "any dlse"])  # fmt: skip
def test_vjp_rejects_bad_cotangents(cotangents):
    with pytest.raises(SpecError) as info:
        differential_attention_vjp(cotangents["dout"], Q, K, V, dlse=cotangents.get("dlse"), **GOOD)
    assert info.value.argument == list(cotangents)[-1]


# --- properties ---------------------------------------------------------------------------

#: (H, Hkv): MHA, GQA with even and odd groups, MQA.
HEAD_LAYOUTS = ((1, 1), (2, 2), (2, 1), (4, 2), (3, 1), (4, 1))


@st.composite
def differential_problems(draw, norm=None):
    """q, k, v and the keyword arguments of differential_attention: awkward sizes, every option sometimes."""
    heads, kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    sizes = (draw(st.integers(1, 2)), heads, kv_heads, draw(st.integers(1, 13)), draw(st.integers(1, 13)),
             draw(st.sampled_from([1, 3, 8, 17])))  # fmt: skip
    b, h, hkv, nq, nk, d = sizes
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    std = draw(st.sampled_from([0.01, 1.0, 4.0]))
    arrays = dict(
        q=std * rng.standard_normal((b, 2 * h, nq, d)),
        k=std * rng.standard_normal((b, 2 * hkv, nk, d)),
        v=rng.standard_normal((b, hkv, nk, 2 * d)),
    )
    lambda_std = draw(st.sampled_from([0.1, 0.5, 1.0]))
    params = {name: lambda_std * rng.standard_normal(d) for name in LAMBDA_NAMES}
    if draw(st.booleans()):
        params["depth"] = draw(st.integers(0, 40))
    else:
        params["lambda_init"] = draw(st.floats(-1.0, 1.0))
    params["apply_norm"] = draw(st.booleans()) if norm is None else norm
    if params["apply_norm"] and draw(st.booleans()):
        params["norm_weight"] = rng.uniform(-2.0, 2.0, 2 * d)
    params["gqa_keys"] = draw(st.sampled_from(["paired", "repeat_kv"]))
    if draw(st.booleans()):
        params["mask"] = rng.random(draw(st.sampled_from([(b, 2 * h, nq, nk), (b, 1, 1, nk), (2 * h, nq, nk)]))) < 0.8
    if draw(st.booleans()):
        params["bias"] = rng.standard_normal(draw(st.sampled_from([(1, 2 * h, 1, nk), (nq, nk)])))
    if draw(st.booleans()):
        params.update(causal=True, causal_alignment=draw(st.sampled_from(["bottom_right", "top_left"])))
    if draw(st.booleans()):
        params["window"] = (draw(st.one_of(st.none(), st.integers(0, 5))), draw(st.one_of(st.none(), st.integers(0, 5))))
    if draw(st.booleans()):
        params["softcap"] = draw(st.sampled_from([0.5, 5.0]))
    if draw(st.booleans()):
        params["scale"] = draw(st.sampled_from([0.05, 1.0]))
    return arrays["q"], arrays["k"], arrays["v"], params


@given(differential_problems())
def test_zero_lambda_is_the_first_map(problem):
    properties.zero_lambda_is_the_first_map(differential_attention, *problem)


@given(differential_problems())
def test_identical_maps_give_one_minus_lambda(problem):
    properties.identical_maps_give_one_minus_lambda(differential_attention, *problem)


@given(differential_problems(norm=True), st.sampled_from([1e-3, 0.5, 8.0, 300.0]))
def test_scaling_v_is_rescaling_eps(problem, factor):
    properties.value_scaling_is_eps_rescaling(differential_attention, *problem, factor=factor, rtol=1e-9)


@given(differential_problems(norm=True), st.sampled_from([1e-3, 0.5, 8.0, 300.0]))
def test_the_norm_makes_the_output_nearly_invariant_to_scaling_v(problem, factor):
    properties.value_scaling_invariance(differential_attention, *problem, factor=factor, rtol=1e-9)


def test_the_invariance_needs_eps_bounded_by_the_mean_square():
    """Where ε dominates the mean square (tiny values), scaling v changes the output, as the bound allows."""
    arrays, params, _ = _problem(7, (1, 2, 1, 4, 4, 3))
    q, k, v = arrays.pop("q"), arrays.pop("k"), 1e-4 * arrays.pop("v")
    params.update(arrays)
    base = differential_attention(q, k, v, **params).out
    scaled = differential_attention(q, k, 100 * v, **params).out
    assert error("out", scaled, base) > 0.5
    properties.value_scaling_invariance(differential_attention, q, k, v, params, factor=100.0)


def test_pairing_heads_h_and_h_plus_H_breaks_the_first_map_property():
    arrays, params, _ = _problem(8, (1, 2, 2, 5, 5, 3))
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    order = [0, 2, 1, 3]  # map c of output head h takes query (and key) head h + cH: (0, 2), (1, 3)

    def chunk_paired(q, k, v, **p):
        return differential_attention(q[:, order], k[:, order], v, **p)

    with pytest.raises(AssertionError, match="out"):
        properties.zero_lambda_is_the_first_map(chunk_paired, q, k, v, dict(arrays, **params))


def test_properties_reject_problems_they_are_not_stated_for():
    arrays, params, _ = _problem(8, (1, 2, 2, 5, 5, 3), apply_norm=False)
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    for prop in (properties.value_scaling_is_eps_rescaling, properties.value_scaling_invariance):
        with pytest.raises(ValueError, match="apply_norm"):
            prop(differential_attention, q, k, v, dict(arrays, **params))


# --- the numba backend --------------------------------------------------------------------


def _map_lse_as_lse(q, k, v, **params):
    """The forward with ``aux["map_lse"]`` read as ``lse``, so the shared agreement check compares it too."""
    result = differential_attention(q, k, v, **params)
    return Result(out=result.out, lse=result.aux["map_lse"])


def _vjp_of_dout(dout, q, k, v, *, dlse=None, **params):
    """The VJP for ``dout`` alone: the map lse has no cotangent (the agreement check's ``dlse`` is dropped)."""
    return differential_attention_vjp(dout, q, k, v, **params)


def check_numba_agreement(q, k, v, params, precision, seed):
    # Where no row has two allowed keys, dq and dk are exactly 0 in the reference (a softmax over one key does
    # not depend on its score), and a kernel's rounding leaves ~1e-17 there, which no relative error measures.
    # (Before the map lse left the cotangents, its dlse made them non-zero.)
    dout = np.ones(differential_attention(q, k, v, **params).out.shape)
    assume(np.any(differential_attention_vjp(dout, q, k, v, **params)["q"] != 0))
    agreement.check_numba_agreement(_map_lse_as_lse, _vjp_of_dout, q, k, v, params, precision, seed)


@given(problem=differential_problems(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(problem, precision, seed):
    check_numba_agreement(*problem, precision, seed)


# --- conformance cases and flags ------------------------------------------------------------


def test_registered_with_its_cases_and_properties():
    mechanism = registry.get("differential")
    assert mechanism.forward is differential_attention and mechanism.vjp is differential_attention_vjp
    assert mechanism.backends == ("reference", "numba", "cupy") and mechanism.spec == "spec/dilution.md"
    assert [case.id for case in mechanism.cases()] == [case.id for case in cases()]


def test_cases_are_small_and_well_formed():
    all_cases = cases()
    assert len({case.id for case in all_cases}) == len(all_cases) >= 10
    for case in all_cases:
        arrays = case.arrays(np.random.default_rng(case.seed))
        assert sum(a.nbytes for a in arrays.values()) < 16_000, case.id
        assert set(case.differentiable) == set(arrays) - {"mask"}, case.id
        assert set(case.flags) <= set(flag_catalogue.catalogue()), case.id
    assert set(FLAGS) == {flag for case in all_cases for flag in case.flags if flag.startswith("DIFF_")}
    assert any(case.params.get("causal") for case in all_cases) and any(not case.params.get("causal") for case in all_cases)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The differential cases, exported to a temporary folder."""
    folder = tmp_path_factory.mktemp("conformance")
    export(folder, mechanisms=["differential"])
    return load_suite(folder)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_reference_passes_every_case(suite, dtype):
    report = verify(differential_attention, vjp=differential_attention_vjp, suite=suite, grad=True, dtype=dtype)
    assert report.ok, report.format()


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_numba_backend_passes_the_cases(suite, dtype):
    report = verify(partial(differential_attention, backend="numba"), vjp=partial(differential_attention_vjp, backend="numba"),
                    suite=suite, grad=True, dtype=dtype)  # fmt: skip
    assert report.ok, report.format()


#: What each wrong variant of SmallDiff gets wrong, in the words of a bug report.
BUGS = {
    "DIFF_LAMBDA_REPARAM": "drops the exponentials: lambda = lambda_q1 . lambda_k1 - lambda_q2 . lambda_k2 + lambda_init",
    "DIFF_LAMBDA_INIT": "applies the paper's l - 1 to the 0-based depth: 0.8 - 0.6 exp(-0.3 (depth - 1))",
    "DIFF_HEAD_PAIRING": "pairs query heads h and h + H (torch.chunk over the heads) instead of 2h and 2h + 1",
    "DIFF_GQA_KEYS": "uses the other GQA key rule than gqa_keys (paired <-> repeat_kv)",
    "DIFF_SUBLN_SCALE": "leaves out the factor 1 - lambda_init after the norm",
    "DIFF_SUBLN_GROUP": "normalises each D-half of an output head separately",
    "DIFF_NORM_EPS": "uses RMSNorm's eps = 1e-6 (rms_norm.py's default) instead of the given 1e-5",
}


class SmallDiff:
    """Differential attention in PyTorch, float64, transcribed from the authors' code
    (multihead_flashdiff_1.py for the paired keys, multihead_diffattn.py for repeat_kv; rms_norm.py);
    autograd gives the gradients. ``bug`` names one flag's mistake, marked ``# bug FLAG``."""

    def __init__(self, bug=None):
        self.bug = bug

    def __call__(self, q, k, v, **params):
        out, lse = self._forward(*(torch.tensor(x) for x in (q, k, v)), **self._tensors(params))
        return Result(out=out.detach().numpy(), lse=None, aux={"map_lse": lse.detach().numpy()})

    def vjp(self, dout, q, k, v, *, dlse=None, **params):  # the verifier passes dlse=None: the cases store no lse
        inputs = {name: torch.tensor(x, requires_grad=True) for name, x in dict(q=q, k=k, v=v).items()}
        tensors = self._tensors(params)
        for name in (*LAMBDA_NAMES, "norm_weight", "bias"):
            if tensors.get(name) is not None:
                inputs[name] = tensors[name].requires_grad_()
        out, lse = self._forward(inputs["q"], inputs["k"], inputs["v"], **tensors)
        (out * torch.tensor(dout)).sum().backward()
        return {name: (torch.zeros_like(x) if x.grad is None else x.grad).numpy() for name, x in inputs.items()}

    @staticmethod
    def _tensors(params):
        return {name: torch.tensor(x) if isinstance(x, np.ndarray) else x for name, x in params.items()}

    def _forward(self, q, k, v, *, lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init=None, depth=None,
                 norm_weight=None, norm_eps=1e-5, apply_norm=True, gqa_keys="paired", mask=None, bias=None,
                 causal=False, causal_alignment="bottom_right", window=None, scale=None, softcap=0.0):  # fmt: skip
        bsz, two_h, nq, head_dim = q.shape
        num_kv_heads, nk = v.shape[1], v.shape[2]
        num_heads = two_h // 2
        n_rep = num_heads // num_kv_heads
        if self.bug == "DIFF_GQA_KEYS":
            gqa_keys = {"paired": "repeat_kv", "repeat_kv": "paired"}[gqa_keys]  # bug DIFF_GQA_KEYS
        if gqa_keys == "repeat_kv":
            keys = k.repeat_interleave(n_rep, dim=1)  # multihead_diffattn.py: repeat_kv(k, n_rep)
        else:  # flash: k.reshape(B, N, Hkv, 2, D); k1, k2 = k[..., 0, :], k[..., 1, :], each GQA over the H query heads
            keys = k.view(bsz, num_kv_heads, 2, nk, head_dim).repeat_interleave(n_rep, dim=1).reshape(bsz, two_h, nk, head_dim)
        scaling = head_dim**-0.5 if scale is None else scale
        s = (q * scaling) @ keys.transpose(-1, -2)  # (B, 2H, Nq, Nk)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if bias is not None:
            s = s + bias
        s = s.masked_fill(~self._allowed(bsz, two_h, nq, nk, mask, causal, causal_alignment, window), -math.inf)
        row_max = s.amax(-1, keepdim=True).detach()
        has_key = torch.isfinite(row_max)
        exp = torch.exp(s - torch.where(has_key, row_max, 0.0))
        total = torch.where(has_key, exp.sum(-1, keepdim=True), 1.0)
        attn_weights = exp / total
        lse = torch.where(has_key, torch.where(has_key, row_max, 0.0) + torch.log(total), -math.inf)[..., 0]

        if depth is not None:
            lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)  # lambda_init_fn(depth)
            if self.bug == "DIFF_LAMBDA_INIT":
                lambda_init = 0.8 - 0.6 * math.exp(-0.3 * (depth - 1))  # bug DIFF_LAMBDA_INIT
        lambda_1 = torch.exp(torch.sum(lambda_q1 * lambda_k1, dim=-1))
        lambda_2 = torch.exp(torch.sum(lambda_q2 * lambda_k2, dim=-1))
        if self.bug == "DIFF_LAMBDA_REPARAM":
            lambda_1, lambda_2 = torch.sum(lambda_q1 * lambda_k1), torch.sum(lambda_q2 * lambda_k2)  # bug DIFF_LAMBDA_REPARAM
        lambda_full = lambda_1 - lambda_2 + lambda_init
        attn_weights = attn_weights.view(bsz, num_heads, 2, nq, nk)
        if self.bug == "DIFF_HEAD_PAIRING":
            attn_weights = attn_weights.view(bsz, 2, num_heads, nq, nk).transpose(1, 2)  # bug DIFF_HEAD_PAIRING
        attn_weights = attn_weights[:, :, 0] - lambda_full * attn_weights[:, :, 1]
        attn = attn_weights @ v.repeat_interleave(n_rep, dim=1)  # (B, H, Nq, 2D)
        if not apply_norm:
            return attn, lse
        if self.bug == "DIFF_NORM_EPS":
            norm_eps = 1e-6  # bug DIFF_NORM_EPS
        if self.bug == "DIFF_SUBLN_GROUP":
            halves = attn.view(bsz, num_heads, nq, 2, head_dim)  # bug DIFF_SUBLN_GROUP
            attn = (halves * torch.rsqrt(halves.pow(2).mean(-1, keepdim=True) + norm_eps)).view(attn.shape)
        else:
            attn = attn * torch.rsqrt(attn.pow(2).mean(-1, keepdim=True) + norm_eps)  # RMSNorm._norm
        if norm_weight is not None:
            attn = attn * norm_weight
        if self.bug == "DIFF_SUBLN_SCALE":
            return attn, lse  # bug DIFF_SUBLN_SCALE
        return attn * (1 - lambda_init), lse

    @staticmethod
    def _allowed(batch, heads, nq, nk, mask, causal, causal_alignment, window):
        aligned = torch.arange(nq)[:, None] + (nk - nq if causal_alignment == "bottom_right" else 0)
        key = torch.arange(nk)[None, :]
        allowed = torch.ones(batch, heads, nq, nk, dtype=torch.bool)
        if causal:
            allowed = allowed & (key <= aligned)
        if window is not None and window[0] is not None:
            allowed = allowed & (key >= aligned - window[0])
        if window is not None and window[1] is not None:
            allowed = allowed & (key <= aligned + window[1])
        return allowed if mask is None else allowed & mask


def test_every_flag_is_used_and_has_a_wrong_implementation():
    used = {flag for case in cases() for flag in case.flags}
    assert set(FLAGS) <= used
    assert set(BUGS) == set(FLAGS)


@needs_torch
def test_the_authors_code_in_torch_passes_every_case(suite):
    report = verify(SmallDiff(), suite=suite, grad=True)
    assert report.ok, report.format()


@needs_torch
@pytest.mark.parametrize("flag", sorted(BUGS))
def test_a_wrong_implementation_fails_a_flagged_case(flag, suite):
    report = verify(SmallDiff(bug=flag), suite=suite.select(flags=flag), grad=True)
    failed = [case.id for case in report.cases if case.status == "fail"]
    assert failed, f"no {flag} case catches a kernel that {BUGS[flag]}:\n{report.format()}"
