"""SSMax (refattn/dilution/ssmax): closed forms worked by hand, the attended counts
against loops, the mechanism against a second formulation written with loops
over rows (and against PyTorch autograd for the gradients), the hand-derived
VJP against finite differences for every differentiable input (s and s_bias
included), bad input, the invariants under Hypothesis, the numba backend
against the reference within the conformance budgets, and every flag's cases
against an implementation that makes the flagged mistake."""

import itertools
import math
from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn.conformance.flags as flag_catalogue
from refattn import SpecError, dense_attention
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.tolerance import error
from refattn.conformance.verify import verify
from refattn.core import registry
from refattn.core.results import Result
from refattn.dense.inputs import check_dense_inputs
from refattn.dilution.ssmax import (
    attended_counts,
    properties,
    ssmax_attention,
    ssmax_attention_vjp,
)
from refattn.dilution.ssmax import numba as ssmax_numba
from refattn.dilution.ssmax.cases import cases
from refattn.strategies import dense_problems
from tests import agreement
from tests.finite_differences import finite_differences

#: SSMax's flags, from the catalogue.
FLAGS = {name: text for name, text in flag_catalogue.catalogue().items() if name.startswith("SSMAX_")}


# --- a second formulation: loops over rows ------------------------------------------


def _allowed_keys(mask, causal, causal_alignment, window, b, h, i, nq, nk):
    """The keys query (b, h, i) may attend to, one condition at a time (spec/README.md)."""
    aligned = i + (nk - nq if causal_alignment == "bottom_right" else 0)
    keys = []
    for j in range(nk):
        if mask is not None and not mask[b, h, i, j]:
            continue
        if causal and j > aligned:
            continue
        if window is not None and window[0] is not None and j < aligned - window[0]:
            continue
        if window is not None and window[1] is not None and j > aligned + window[1]:
            continue
        keys.append(j)
    return keys


def naive_ssmax(q, k, v, *, s, s_bias=0.0, n_rule="attended", mask=None, bias=None, causal=False,
                causal_alignment="bottom_right", window=None, scale=None, softcap=0.0, dropout_keep=None,
                dropout_p=0.0, bug=None):  # fmt: skip
    """SSMax written from the paper, one query row at a time: count the row's keys n,
    multiply its scaled scores by s_h log n + s_bias_h, cap, add the bias, softmax, drop out, sum
    the values. ``bug`` makes one flag's mistake (see ``BUGS``)."""
    batch, hq, nq, d = q.shape
    nk, group = k.shape[2], hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = np.broadcast_to(np.asarray(s, np.float64), (hq,))
    s_bias = np.broadcast_to(np.asarray(s_bias, np.float64), (hq,))
    full = (batch, hq, nq, nk)
    mask = None if mask is None else np.broadcast_to(mask, full)
    bias = np.zeros(full) if bias is None else np.broadcast_to(bias, full)
    keep = np.ones(full, bool) if dropout_keep is None else np.broadcast_to(dropout_keep, full)
    out, lse = np.zeros((batch, hq, nq, v.shape[3])), np.full((batch, hq, nq), -math.inf)
    for bb, h, i in itertools.product(range(batch), range(hq), range(nq)):
        keys = _allowed_keys(mask, causal, causal_alignment, window, bb, h, i, nq, nk)
        if not keys:
            continue
        n = nk if bug == "padded_n" else max(len(keys), 2) if bug == "clamp_n" else len(keys)
        if n_rule == "axis_length" and bug != "ignore_n_rule":
            n = nk  # the ScalableSoftmax package: x.size(dim)
        head = h // group if bug == "kv_head_s" else h
        factor = s[head] * math.log(n) + (0.0 if bug == "b_in_logits" else s_bias[head])
        logits = {}
        for j in keys:
            score = scale * float(np.dot(q[bb, h, i], k[bb, h // group, j]))
            score = score if bug == "factor_after_cap" else factor * score
            if softcap > 0:
                score = softcap * math.tanh(score / softcap)
            logit = score + bias[bb, h, i, j]
            logits[j] = (
                factor * logit if bug == "factor_after_cap" else logit + (s_bias[head] if bug == "b_in_logits" else 0)
            )
        top = max(logits.values())
        total = sum(math.exp(z - top) for z in logits.values())
        lse[bb, h, i] = top + math.log(total)
        for j, z in logits.items():
            if keep[bb, h, i, j]:
                out[bb, h, i] += math.exp(z - top) / total / (1.0 - dropout_p) * v[bb, h // group, j]
    return out, lse


# --- closed forms -------------------------------------------------------------------


def test_one_key_has_factor_b_because_log_1_is_0():
    q, k, v = (
        np.array([1.0, 2.0]).reshape(1, 1, 1, 2),
        np.array([3.0, -1.0]).reshape(1, 1, 1, 2),
        np.full((1, 1, 1, 2), 5.0),
    )
    result = ssmax_attention(q, k, v, s=np.array([0.7]), s_bias=np.array([0.4]), scale=1.0)  # q·k = 1
    np.testing.assert_array_equal(result.out, v)
    np.testing.assert_allclose(result.lse, [[[0.4]]], rtol=1e-15)
    without_b = ssmax_attention(q, k, v, s=0.7, scale=1.0)
    np.testing.assert_array_equal(without_b.lse, [[[0.0]]])


def test_two_keys_is_the_base_n_exponential_of_the_paper():
    # n = 2, scores 2 and 0, s = 1/2, b = 0: weights 2^(s·2) : 2^0 = 2 : 1, so 2/3 and 1/3; lse = log 3.
    q, k = np.array([1.0, 0.0]).reshape(1, 1, 1, 2), np.array([[2.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    v = np.eye(2).reshape(1, 1, 2, 2)
    result = ssmax_attention(q, k, v, s=0.5, scale=1.0)
    np.testing.assert_allclose(result.out[0, 0, 0], [2 / 3, 1 / 3], rtol=1e-15)
    np.testing.assert_allclose(result.lse, [[[math.log(3.0)]]], rtol=1e-15)
    # With b = 1/4 the factor is ln(2)/2 + 1/4 and the logits are 2f and 0.
    f = math.log(2.0) / 2 + 0.25
    with_b = ssmax_attention(q, k, v, s=np.array([0.5]), s_bias=np.array([0.25]), scale=1.0)
    np.testing.assert_allclose(with_b.out[0, 0, 0], [1 / (1 + math.exp(-2 * f)), 1 / (1 + math.exp(2 * f))], rtol=1e-14)
    np.testing.assert_allclose(with_b.lse, [[[math.log(math.exp(2 * f) + 1)]]], rtol=1e-15)


def test_counts_by_hand():
    q, k = np.zeros((1, 1, 2, 3)), np.zeros((1, 1, 4, 3))
    assert attended_counts(q, k).tolist() == [[[4, 4]]]
    assert attended_counts(q, k, causal=True).tolist() == [[[3, 4]]]  # bottom-right: j <= i + 2
    assert attended_counts(q, k, causal=True, causal_alignment="top_left").tolist() == [[[1, 2]]]
    assert attended_counts(q, k, window=(1, 0)).tolist() == [[[2, 2]]]  # keys i' - 1 and i'
    assert attended_counts(q, k, window=(0, 5), causal_alignment="top_left").tolist() == [[[4, 3]]]
    padding = np.array([True, True, True, False])[None, :]  # (1, Nk)
    assert attended_counts(q, k, mask=padding, causal=True).tolist() == [[[3, 3]]]
    assert attended_counts(np.zeros((1, 1, 5, 3)), np.zeros((1, 1, 2, 3)), causal=True).tolist() == [[[0, 0, 0, 1, 2]]]


def test_padding_counts_only_the_real_keys():
    # 2 of 4 keys are real: with s = 1/ln 2 the factor is exactly 1, so SSMax is dense attention with that mask
    # (a padded n = 4 would give the factor ln 4 / ln 2 = 2).
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((1, 2, 4, 4))
    padding = np.array([[True, False, True, False]])
    result = ssmax_attention(q, k, v, s=1 / math.log(2.0), mask=padding)
    plain = dense_attention(q, k, v, mask=padding)
    np.testing.assert_allclose(result.out, plain.out, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(result.lse, plain.lse, rtol=1e-14)


def test_s_one_over_log_n_is_dense_attention():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 4, 5, 3)), rng.standard_normal((2, 2, 7, 3)), rng.standard_normal((2, 2, 7, 2))
    result = ssmax_attention(q, k, v, s=np.full(4, 1 / math.log(7.0)), softcap=1.5)
    plain = dense_attention(q, k, v, softcap=1.5)
    np.testing.assert_allclose(result.out, plain.out, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(result.lse, plain.lse, rtol=1e-14)


def test_fully_masked_rows_are_zero_with_lse_minus_infinity_and_no_gradient():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((1, 2, 5, 3)), rng.standard_normal((1, 1, 2, 3)), rng.standard_normal((1, 1, 2, 3))
    s, b = np.array([0.5, 0.9]), np.array([0.1, -0.2])
    result = ssmax_attention(q, k, v, s=s, s_bias=b, causal=True)  # rows 0-2 see nothing
    assert np.all(result.out[:, :, :3] == 0) and np.all(result.lse[:, :, :3] == -np.inf)
    assert result.aux["counts"].tolist() == [[[0, 0, 0, 1, 2]] * 2]
    dout = rng.standard_normal(result.out.shape)
    grads = ssmax_attention_vjp(dout, q, k, v, s=s, s_bias=b, causal=True, dlse=np.where(np.isfinite(result.lse), 1.0, 0.0))
    assert np.all(grads["q"][:, :, :3] == 0)
    assert all(np.all(np.isfinite(g)) for g in grads.values())


# --- against the second formulation and against PyTorch ------------------------------------

B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 5, 9, 6, 3  # GQA 4:2, Nq != Nk

OPTION_SETS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal_top_left": dict(causal=True, causal_alignment="top_left"),
    "padding": dict(mask="padding"),
    "window": dict(window=(2, 1)),
    "softcap_bias": dict(softcap=1.5, bias="broadcast"),
    "mask_full_bias_scale": dict(mask="full", bias="full", scale=0.4),
    "dropout": dict(dropout=True, causal=True),
    "shared_numbers": dict(s=0.8, s_bias=-0.3),
    "more_queries_than_keys": dict(causal=True, nq=12),
}


def _problem(seed, mask=None, bias=None, dropout=False, s=None, s_bias=None, nq=NQ, **params):
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=1.3 * rng.standard_normal((B, HQ, nq, D)),
        k=1.3 * rng.standard_normal((B, HKV, NK, D)),
        v=rng.standard_normal((B, HKV, NK, DV)),
        s=rng.uniform(0.2, 1.2, HQ) if s is None else s,
        s_bias=rng.uniform(-0.5, 0.5, HQ) if s_bias is None else s_bias,
    )
    if bias == "full":
        arrays["bias"] = rng.standard_normal((B, HQ, nq, NK))
    elif bias == "broadcast":
        arrays["bias"] = rng.standard_normal((HQ, 1, NK))
    if mask == "padding":
        params["mask"] = (np.arange(NK) < np.array([NK, 4])[:, None])[:, None, None, :]
    elif mask == "full":
        params["mask"] = rng.random((B, HQ, nq, NK)) < 0.6
        params["mask"][1, 2, 3] = False  # a fully masked row
    if dropout:
        params.update(dropout_p=0.3, dropout_keep=rng.random((B, HQ, nq, NK)) >= 0.3)
    return arrays, params


@pytest.mark.parametrize("option", list(OPTION_SETS))
def test_matches_the_loop_formulation(option):
    arrays, params = _problem(3, **OPTION_SETS[option])
    result = ssmax_attention(**arrays, **params)
    out, lse = naive_ssmax(**arrays, **params)
    np.testing.assert_allclose(result.out, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(result.lse), np.isinf(lse))
    np.testing.assert_allclose(result.lse, lse, rtol=1e-12, atol=1e-12)


def test_matches_torch_with_autograd_gradients():
    """SSMax in PyTorch float64 as the paper writes it (q scaled by s log n + s_bias, n counted per
    row from the mask), autograd giving the gradients of q, k, v, s and s_bias."""
    torch = pytest.importorskip("torch")
    arrays, params = _problem(4, mask="padding", causal=True)
    dout = np.random.default_rng(5).standard_normal((B, HQ, NQ, DV))
    t = {name: torch.tensor(x, requires_grad=True) for name, x in arrays.items()}
    aligned = torch.arange(NQ)[:, None] + NK - NQ
    allowed = torch.tensor(params["mask"]) & (torch.arange(NK)[None, :] <= aligned)  # (B, 1, Nq, Nk)
    n = allowed.sum(-1).expand(B, HQ, NQ).double()
    factor = t["s"][:, None] * torch.log(n) + t["s_bias"][:, None]
    k, v = (t[name].repeat_interleave(HQ // HKV, dim=1) for name in ("k", "v"))
    scores = (factor[..., None] * t["q"]) @ k.transpose(-1, -2) / math.sqrt(D)
    out = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1) @ v
    out.backward(torch.tensor(dout))
    np.testing.assert_allclose(ssmax_attention(**arrays, **params).out, out.detach().numpy(), rtol=1e-12, atol=1e-13)
    grads = ssmax_attention_vjp(dout, **arrays, **params)
    for name in ("q", "k", "v", "s", "s_bias"):
        np.testing.assert_allclose(grads[name], t[name].grad.numpy(), rtol=1e-11, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_lower_precision_evaluation_stays_close(precision):
    arrays, params = _problem(6, **OPTION_SETS["softcap_bias"])
    exact = ssmax_attention(**arrays, **params)
    emulated = ssmax_attention(**arrays, **params, precision=precision)
    assert 0 < error("out", emulated.out, exact.out) < {"float32": 1e-5, "bfloat16": 0.1}[precision]


# --- gradients ------------------------------------------------------------------------

GRADIENT_SIZES = dict(b=1, hq=4, hkv=2, nq=3, nk=5, d=3, dv=2)


def _finite_differences(arrays, params, dout, dlse, name):
    return finite_differences(ssmax_attention, arrays, params, dout, dlse, name)


@pytest.mark.parametrize(
    "causal, user_bias, masking, with_dlse",
    list(
        itertools.product(
            [None, "bottom_right", "top_left"], [False, True], ["none", "padding+empty row"], [True, False]
        )
    ),
)
def test_vjp_matches_finite_differences(causal, user_bias, masking, with_dlse):
    size = GRADIENT_SIZES
    rng = np.random.default_rng(11)
    arrays = dict(
        q=rng.standard_normal((size["b"], size["hq"], size["nq"], size["d"])),
        k=rng.standard_normal((size["b"], size["hkv"], size["nk"], size["d"])),
        v=rng.standard_normal((size["b"], size["hkv"], size["nk"], size["dv"])),
        s=rng.uniform(0.3, 1.0, size["hq"]),
        s_bias=rng.uniform(-0.5, 0.5, size["hq"]),
    )
    params = dict(softcap=2.0)
    if causal:
        params.update(causal=True, causal_alignment=causal)
    if user_bias:
        arrays["bias"] = rng.standard_normal((size["hq"], 1, size["nk"]))
    if masking != "none":
        params["mask"] = np.ones((size["hq"], size["nq"], size["nk"]), bool)
        params["mask"][:, :, 3:] = False  # keys 3 and 4 are padding
        params["mask"][1, 0] = False  # a fully masked row
    result = ssmax_attention(**arrays, **params)
    dout = rng.standard_normal(result.out.shape)
    dlse = np.where(np.isfinite(result.lse), rng.standard_normal(result.lse.shape), 0.0) if with_dlse else None
    grads = ssmax_attention_vjp(dout, **arrays, **params, dlse=dlse)
    assert set(grads) == set(arrays)
    for name in arrays:
        numeric = _finite_differences(arrays, params, dout, dlse, name)
        assert grads[name].shape == arrays[name].shape
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-3), name


def test_numbers_for_s_and_s_bias_are_constants():
    arrays, params = _problem(7)
    numbers = dict(arrays, s=0.6, s_bias=0.1)
    dout = np.ones((B, HQ, NQ, DV))
    assert set(ssmax_attention_vjp(dout, **numbers, **params)) == {"q", "k", "v"}
    as_arrays = ssmax_attention_vjp(dout, **dict(arrays, s=np.full(HQ, 0.6), s_bias=np.full(HQ, 0.1)), **params)
    np.testing.assert_array_equal(ssmax_attention_vjp(dout, **numbers, **params)["q"], as_arrays["q"])


# --- bad input ------------------------------------------------------------------------

rng0 = np.random.default_rng(0)
Q, K, V = rng0.standard_normal((1, 4, 3, 5)), rng0.standard_normal((1, 2, 6, 5)), rng0.standard_normal((1, 2, 6, 7))
GOOD = dict(s=np.full(4, 0.5))

BAD = {
    "s missing": (dict(s=None), "s", "positive number"),
    "s zero": (dict(s=0.0), "s", "s > 0"),
    "s negative head": (dict(s=np.array([0.5, 0.2, -0.1, 0.3])), "s", "s[2] = "),
    "s zero head": (dict(s=np.array([0.5, 0.0, 0.1, 0.3])), "s", "s[1] = "),
    "s wrong length": (dict(s=np.ones(2)), "s", "(Hq,) = (4,)"),
    "s per kv head 2-d": (dict(s=np.ones((4, 1))), "s", "(Hq,) = (4,)"),
    "s nan": (dict(s=np.array([0.5, np.nan, 0.1, 0.2])), "s", "finite"),
    "s infinite number": (dict(s=math.inf), "s", "finite"),
    "s a list": (dict(s=[0.5, 0.5, 0.5, 0.5]), "s", "number"),
    "s bool": (dict(s=True), "s", "number"),
    "s_bias wrong length": (dict(s_bias=np.zeros(3)), "s_bias", "(Hq,) = (4,)"),
    "s_bias infinite": (dict(s_bias=np.array([0.0, np.inf, 0.0, 0.0])), "s_bias", "finite"),
    "s_bias a string": (dict(s_bias="0"), "s_bias", "number"),
    "bias wrong shape": (dict(bias=np.zeros((3, 5))), "bias", "broadcastable"),
    "mask not bool": (dict(mask=np.ones((3, 6))), "mask", "bool"),
    "window": (dict(window=(-1, 0)), "window", "non-negative"),
    "q rank": (dict(q=Q[0]), "q", "4 dimensions"),
    "precision": (dict(precision="fp8"), "precision", "bfloat16"),
    "backend": (dict(backend="triton"), "backend", "numba"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
}


#: Cases about choosing a backend or precision, checked with the default backend only.
BACKEND_CHOICE = ("precision", "backend", "precision with numba")


@pytest.mark.parametrize(
    "case, backend",
    [(case, "reference") for case in BAD] + [(case, "numba") for case in BAD if case not in BACKEND_CHOICE],
)
def test_forward_rejects(case, backend):
    overrides, argument, expected = BAD[case]
    with pytest.raises(SpecError) as info:
        ssmax_attention(**(dict(q=Q, k=K, v=V, backend=backend, **GOOD) | overrides))
    assert info.value.argument == argument
    assert expected in str(info.value)


@pytest.mark.parametrize("case", ["s zero", "s wrong length", "s_bias infinite", "bias wrong shape"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_vjp_rejects_the_same(case, backend):
    overrides, argument, _ = BAD[case]
    with pytest.raises(SpecError) as info:
        ssmax_attention_vjp(np.zeros((1, 4, 3, 7)), **(dict(q=Q, k=K, v=V, backend=backend, **GOOD) | overrides))
    assert info.value.argument == argument


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_vjp_rejects_a_wrong_cotangent_before_computing(backend):
    with pytest.raises(SpecError) as info:
        ssmax_attention_vjp(np.zeros((1, 4, 3, 5)), Q, K, V, backend=backend, **GOOD)
    assert info.value.argument == "dout"


def numba_counts(q, k, *, mask=None, causal=False, causal_alignment="bottom_right", window=None):
    """The numba backend's step (S1), ``n_i`` in O(N) memory beyond the mask."""
    x = check_dense_inputs(q, k, k, mask=mask, bias=None, causal=causal, causal_alignment=causal_alignment,
                           window=window, scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0)  # fmt: skip
    return ssmax_numba.counts_of(x)


@pytest.mark.parametrize("module", [attended_counts, numba_counts])
def test_counts_reject_bad_masks(module):
    with pytest.raises(SpecError) as info:
        module(Q, K, mask=np.ones((2, 3, 6), bool))
    assert info.value.argument == "mask"


# --- counts: reference, numba and loops ----------------------------------------------------


def _loop_counts(q, k, params):
    batch, hq, nq, _ = q.shape
    nk = k.shape[2]
    mask = None if params.get("mask") is None else np.broadcast_to(params["mask"], (batch, hq, nq, nk))
    masking = (mask, params.get("causal", False), params.get("causal_alignment", "bottom_right"), params.get("window"))
    return np.array([[[len(_allowed_keys(*masking, bb, h, i, nq, nk)) for i in range(nq)] for h in range(hq)]
                     for bb in range(batch)]).reshape(batch, hq, nq)  # fmt: skip


@st.composite
def ssmax_problems(draw, options=("mask", "bias", "causal", "window", "softcap", "scale", "dropout"), max_len=17):
    """A dense problem with SSMax's s (per head or a number) and sometimes s_bias (per head or a number)."""
    problem = draw(dense_problems(max_len=max_len, options=options))
    hq = problem.q.shape[1]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = dict(problem.params)
    params["s"] = rng.uniform(0.05, 1.5, hq) if draw(st.booleans()) else float(rng.uniform(0.05, 1.5))
    b_form = draw(st.sampled_from(["absent", "number", "array"]))
    if b_form != "absent":
        params["s_bias"] = float(rng.uniform(-1.0, 1.0)) if b_form == "number" else rng.uniform(-1.0, 1.0, hq)
    return problem.q, problem.k, problem.v, params


def _masking(params):
    return {name: params[name] for name in ("mask", "causal", "causal_alignment", "window") if name in params}


@given(problem=ssmax_problems(options=("mask", "causal", "window")), block=st.sampled_from([1, 7, 1 << 22]))
def test_counts_agree_with_loops_in_every_backend(problem, block):
    q, k, _, params = problem
    want = _loop_counts(q, k, params)
    np.testing.assert_array_equal(attended_counts(q, k, **_masking(params)), want)
    original, ssmax_numba.MASK_BLOCK = ssmax_numba.MASK_BLOCK, block  # blocks of rows as small as one entry
    try:
        np.testing.assert_array_equal(numba_counts(q, k, **_masking(params)), want)
    finally:
        ssmax_numba.MASK_BLOCK = original


def test_one_column_mask_counts_whole_intervals():
    q, k = np.zeros((2, 1, 4, 3)), np.zeros((2, 1, 6, 3))
    rows = np.array([True, False, True, True])[None, None, :, None]  # (1, 1, Nq, 1): queries 1 is padding
    want = np.where(rows[..., 0], np.array([3, 4, 5, 6]), 0)
    for counts in (attended_counts, numba_counts):
        np.testing.assert_array_equal(counts(q, k, mask=rows, causal=True), np.broadcast_to(want, (2, 1, 4)))


def test_numba_counts_long_causal_rows_in_closed_form():
    q, k = np.zeros((1, 1, 50_000, 1), np.float32), np.zeros((1, 1, 60_000, 1), np.float32)
    counts = numba_counts(q, k, causal=True, causal_alignment="top_left", window=(999, None))
    np.testing.assert_array_equal(counts[0, 0], np.minimum(np.arange(50_000) + 1, 1000))  # no (Nq, Nk) mask made


# --- properties -----------------------------------------------------------------------


@given(ssmax_problems(options=("bias", "softcap", "scale", "dropout")))
def test_unit_factor_is_dense_attention(problem):
    properties.unit_factor_is_dense_attention(ssmax_attention, *problem)


@given(ssmax_problems(options=("mask", "causal", "window", "softcap", "scale")))
def test_identical_keys_give_weights_one_over_n(problem):
    properties.identical_keys_give_weights_one_over_n(ssmax_attention, *problem)


@given(ssmax_problems(options=("mask", "bias", "causal", "window", "scale", "dropout")))
def test_key_shift_changes_only_lse(problem):
    properties.key_shift_changes_only_lse(ssmax_attention, *problem, rtol=1e-9)


def test_properties_catch_a_padded_n():
    arrays, params = _problem(12, mask="padding", causal=True)
    padded = lambda q, k, v, **p: _as_result(naive_ssmax(q, k, v, **p, bug="padded_n"))  # noqa: E731
    with pytest.raises(AssertionError, match="lse"):
        properties.identical_keys_give_weights_one_over_n(padded, arrays["q"], arrays["k"], arrays["v"],
                                                           dict(params, s=arrays["s"], s_bias=arrays["s_bias"]))  # fmt: skip


def test_properties_reject_problems_they_are_not_stated_for():
    arrays, params = _problem(12, causal=True)
    with pytest.raises(ValueError, match="no mask"):
        properties.unit_factor_is_dense_attention(ssmax_attention, arrays["q"], arrays["k"], arrays["v"],
                                                  dict(params, s=arrays["s"]))  # fmt: skip


# --- the numba backend ------------------------------------------------------------------


def check_numba_agreement(q, k, v, params, precision, seed):
    agreement.check_numba_agreement(ssmax_attention, ssmax_attention_vjp, q, k, v, params, precision, seed)


@given(problem=ssmax_problems(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(problem, precision, seed):
    check_numba_agreement(*problem, precision, seed)


# --- conformance cases and flags -----------------------------------------------------------


def test_registered_with_its_cases_and_properties():
    mechanism = registry.get("ssmax")
    assert mechanism.forward is ssmax_attention and mechanism.vjp is ssmax_attention_vjp
    assert mechanism.backends == ("reference", "numba", "cupy") and mechanism.spec == "spec/dilution.md"
    assert [case.id for case in mechanism.cases()] == [case.id for case in cases()]


def test_cases_are_small_and_well_formed():
    all_cases = cases()
    assert len({case.id for case in all_cases}) == len(all_cases) >= 10
    for case in all_cases:
        arrays = case.arrays(np.random.default_rng(case.seed))
        assert sum(a.nbytes for a in arrays.values()) < 16_000, case.id
        assert set(case.flags) <= set(flag_catalogue.catalogue()), case.id
    assert set(FLAGS) == {flag for case in all_cases for flag in case.flags if flag.startswith("SSMAX_")}


def test_cases_cover_what_they_claim():
    counts = {case.id.split("/")[1]: _case_counts(case) for case in cases()}
    nk = {case.id.split("/")[1]: case.arrays(np.random.default_rng(case.seed))["k"].shape[2] for case in cases()}
    flagged = {case.id.split("/")[1] for case in cases() if "SSMAX_MASKED_N" in case.flags}
    assert all(np.any(counts[name] != nk[name]) for name in flagged)  # n differs from Nk somewhere
    single = {case.id.split("/")[1] for case in cases() if "SSMAX_SINGLE_KEY" in case.flags}
    assert all(np.any(counts[name] == 1) for name in single)
    assert np.any(counts["fully_masked_rows"] == 0)


def _case_counts(case):
    arrays = case.arrays(np.random.default_rng(case.seed))
    return attended_counts(arrays["q"], arrays["k"], **_masking({**case.params, **arrays}))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The SSMax cases, exported to a temporary folder."""
    folder = tmp_path_factory.mktemp("ssmax_suite")
    export(folder, mechanisms=["ssmax"])
    return load_suite(folder)


def _as_result(pair):
    return Result(out=pair[0], lse=pair[1])


def _with_bug(bug):
    return lambda q, k, v, **params: naive_ssmax(q, k, v, **params, bug=bug)


def _scale_gradient_from_dq(dout, q, k, v, *, dlse=None, **params):
    """The reference VJP with ds_h = sum log n_i <q_i, dq_i>, from dq = f dq' in place of dq'."""
    grads = ssmax_attention_vjp(dout, q, k, v, dlse=dlse, **params)
    log_n = np.log(np.maximum(ssmax_attention(q, k, v, **params).aux["counts"], 1))  # (B, Hq, Nq)
    grads["s"] = np.einsum("bhq,bhqd,bhqd->h", log_n, np.asarray(q, np.float64), grads["q"])
    return grads


#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "SSMAX_MASKED_N": "uses the padded key length Nk as n on every row",
    "SSMAX_PER_HEAD_S": "reads s and s_bias by kv head, h // G",
    "SSMAX_SINGLE_KEY": "clamps n to at least 2 (max(n, 2)), so a one-key row gets s log 2 + s_bias",
    "SSMAX_FACTOR_SCOPE": "multiplies the final logits (after the soft-cap, bias included) by the factor",
    "SSMAX_BIAS": "adds s_bias to the logits instead of to s log n",
    "SSMAX_SCALE_GRADIENT": "computes ds from dq = f dq' instead of dq'",
    "SSMAX_AXIS_LENGTH": "counts the attended keys whatever n_rule says",
}
WRONG_FORWARD = {
    "SSMAX_MASKED_N": "padded_n",
    "SSMAX_PER_HEAD_S": "kv_head_s",
    "SSMAX_SINGLE_KEY": "clamp_n",
    "SSMAX_FACTOR_SCOPE": "factor_after_cap",
    "SSMAX_BIAS": "b_in_logits",
    "SSMAX_AXIS_LENGTH": "ignore_n_rule",
}


def test_every_flag_has_a_wrong_implementation():
    assert set(BUGS) == set(FLAGS) == set(WRONG_FORWARD) | {"SSMAX_SCALE_GRADIENT"}


def test_the_loop_formulation_passes_every_case(suite):
    report = verify(_with_bug(None), suite=suite)
    assert report.ok, report.format()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_reference_passes_every_case(suite, dtype):
    report = verify(ssmax_attention, vjp=ssmax_attention_vjp, suite=suite, grad=True, dtype=dtype)
    assert report.ok, report.format()


@pytest.mark.parametrize("flag", sorted(BUGS))
def test_a_wrong_implementation_fails_a_flagged_case(flag, suite):
    flagged = suite.select(flags=flag)
    if flag in WRONG_FORWARD:
        report = verify(_with_bug(WRONG_FORWARD[flag]), suite=flagged)
    else:
        report = verify(ssmax_attention, vjp=_scale_gradient_from_dq, suite=flagged, grad=True)
    assert any(case.status == "fail" for case in report.cases), f"no {flag} case catches a kernel that {BUGS[flag]}"


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_numba_backend_passes_the_cases(suite, dtype):
    report = verify(
        partial(ssmax_attention, backend="numba"), vjp=partial(ssmax_attention_vjp, backend="numba"),
        suite=suite, grad=True, dtype=dtype,
    )  # fmt: skip
    assert report.ok, report.format()
