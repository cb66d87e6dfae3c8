"""Log-n scaling (refattn/dilution/logn): closed forms worked by hand, the
contrast with SSMax's per-row n, the mechanism against a second formulation
written with loops over rows, the hand-derived VJP against finite
differences, bad input, the invariants under Hypothesis, the numba backend
against the reference within the conformance budgets, and every flag's cases
against implementations that make the flagged mistake."""

import itertools
import math
from functools import partial

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import refattn.conformance.flags as flag_catalogue
from refattn import SpecError, dense_attention
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.tolerance import error
from refattn.conformance.verify import verify
from refattn.core import registry
from refattn.core.results import Result
from refattn.dilution.logn import logn_attention, logn_attention_vjp, properties
from refattn.dilution.logn.cases import cases
from refattn.dilution.ssmax import ssmax_attention
from refattn.strategies import dense_problems
from tests import agreement
from tests.finite_differences import finite_differences

#: Log-n's flags, from the catalogue.
FLAGS = {name: text for name, text in flag_catalogue.catalogue().items() if name.startswith("LOGN_")}


# --- a second formulation: loops over rows ------------------------------------------


def naive_logn(q, k, v, *, n=None, training_length=None, mask=None, bias=None, causal=False,
               causal_alignment="bottom_right", window=None, scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0,
               bug=None):  # fmt: skip
    """Log-n attention written from the paper, one query row at a time: multiply the
    scaled scores by ln n, cap, add the bias, softmax, drop out, sum the values.
    ``bug`` makes one flag's mistake (see ``BUGS``)."""
    batch, hq, nq, d = q.shape
    nk, group = k.shape[2], hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    length = nk if n is None or bug == "ignore_n" else n
    length = nq if bug == "query_length" else length
    full = (batch, hq, nq, nk)
    mask = np.ones(full, bool) if mask is None else np.broadcast_to(mask, full)
    bias = np.zeros(full) if bias is None else np.broadcast_to(bias, full)
    keep = np.ones(full, bool) if dropout_keep is None else np.broadcast_to(dropout_keep, full)
    out, lse = np.zeros((batch, hq, nq, v.shape[3])), np.full((batch, hq, nq), -math.inf)
    for bb, h, i in itertools.product(range(batch), range(hq), range(nq)):
        aligned = i + (nk - nq if causal_alignment == "bottom_right" else 0)
        keys = [
            j for j in range(nk)
            if mask[bb, h, i, j] and not (causal and j > aligned)
            and not (window is not None and window[0] is not None and j < aligned - window[0])
            and not (window is not None and window[1] is not None and j > aligned + window[1])
        ]  # fmt: skip
        if not keys:
            continue
        row_length = len(keys) if bug == "row_count" else length
        factor = {"log2": math.log2, "divide": lambda x: 1 / math.log(x)}.get(bug, math.log)(row_length)
        if training_length is not None:  # Qwen: logn_list[p] = log(p + 1, L) if p + 1 > L else 1, p = Nk - Nq + i
            position = i + (0 if bug == "query_positions" else nk - nq)
            factor = math.log(position + 1, training_length) if position + 1 > training_length else 1.0
        logits = {}
        for j in keys:
            score = scale * float(np.dot(q[bb, h, i], k[bb, h // group, j]))
            score = score if bug == "factor_after_cap" else factor * score
            if softcap > 0:
                score = softcap * math.tanh(score / softcap)
            logit = score + bias[bb, h, i, j]
            logits[j] = factor * logit if bug == "factor_after_cap" else logit
        top = max(logits.values())
        total = sum(math.exp(z - top) for z in logits.values())
        lse[bb, h, i] = top + math.log(total)
        for j, z in logits.items():
            if keep[bb, h, i, j]:
                out[bb, h, i] += math.exp(z - top) / total / (1.0 - dropout_p) * v[bb, h // group, j]
    return out, lse


# --- closed forms -------------------------------------------------------------------

TWO_KEYS = dict(
    q=np.array([1.0, 0.0]).reshape(1, 1, 1, 2),
    k=np.array([[2.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2),
    v=np.eye(2).reshape(1, 1, 2, 2),
)


def test_two_keys_by_hand():
    # n = 4, scores 2 and 0: weights exp(2 ln 4) : exp(0) = 16 : 1, lse = log 17.
    result = logn_attention(**TWO_KEYS, n=4, scale=1.0)
    np.testing.assert_allclose(result.out[0, 0, 0], [16 / 17, 1 / 17], rtol=1e-15)
    np.testing.assert_allclose(result.lse, [[[math.log(17.0)]]], rtol=1e-15)
    # The default n is Nk = 2: weights 4 : 1.
    default = logn_attention(**TWO_KEYS, scale=1.0)
    np.testing.assert_allclose(default.out[0, 0, 0], [4 / 5, 1 / 5], rtol=1e-15)
    np.testing.assert_allclose(default.lse, [[[math.log(5.0)]]], rtol=1e-15)


def test_n_one_makes_every_score_zero():
    result = logn_attention(**TWO_KEYS, n=1, scale=1.0)
    np.testing.assert_array_equal(result.out[0, 0, 0], [0.5, 0.5])
    np.testing.assert_allclose(result.lse, [[[math.log(2.0)]]], rtol=1e-15)
    grads = logn_attention_vjp(np.ones((1, 1, 1, 2)), **TWO_KEYS, n=1, scale=1.0, dlse=np.ones((1, 1, 1)))
    np.testing.assert_array_equal(grads["q"], 0.0)


def test_default_n_is_ssmax_with_s_one_only_without_masks():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 4, 5, 3)), rng.standard_normal((2, 2, 7, 3)), rng.standard_normal((2, 2, 7, 2))
    np.testing.assert_allclose(logn_attention(q, k, v).out, ssmax_attention(q, k, v, s=1.0).out, rtol=1e-14, atol=1e-15)
    # Causal: SSMax counts n_i = i + 3 keys per row; log-n keeps log 7 on every row (the last row agrees).
    causal_logn, causal_ssmax = logn_attention(q, k, v, causal=True), ssmax_attention(q, k, v, s=1.0, causal=True)
    np.testing.assert_allclose(causal_logn.out[:, :, -1], causal_ssmax.out[:, :, -1], rtol=1e-14, atol=1e-15)
    assert np.all(np.abs(causal_logn.out[:, :, :-1] - causal_ssmax.out[:, :, :-1]).max(axis=-1) > 1e-6)


def test_masks_do_not_change_n():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 6, 4)), rng.standard_normal((1, 2, 6, 4))
    padding = np.array([[True, True, False, True, False, False]])
    result = logn_attention(q, k, v, mask=padding)
    np.testing.assert_allclose(
        result.out, dense_attention(q, k, v, mask=padding, scale=math.log(6) / 2).out, rtol=1e-14
    )


# --- against the second formulation -----------------------------------------------------

B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 5, 9, 6, 3  # GQA 4:2, Nq != Nk

OPTION_SETS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal_top_left_n": dict(causal=True, causal_alignment="top_left", n=2048),
    "padding": dict(mask="padding"),
    "window_n_one": dict(window=(2, 1), n=1),
    "softcap_bias": dict(softcap=1.5, bias="broadcast", n=100),
    "mask_full_bias_scale": dict(mask="full", bias="full", scale=0.4),
    "dropout": dict(dropout=True, causal=True),
}


def _problem(seed, mask=None, bias=None, dropout=False, **params):
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=rng.standard_normal((B, HQ, NQ, D)),
        k=rng.standard_normal((B, HKV, NK, D)),
        v=rng.standard_normal((B, HKV, NK, DV)),
    )
    if bias == "full":
        arrays["bias"] = rng.standard_normal((B, HQ, NQ, NK))
    elif bias == "broadcast":
        arrays["bias"] = rng.standard_normal((HQ, 1, NK))
    if mask == "padding":
        params["mask"] = (np.arange(NK) < np.array([NK, 4])[:, None])[:, None, None, :]
    elif mask == "full":
        params["mask"] = rng.random((B, HQ, NQ, NK)) < 0.6
        params["mask"][1, 2, 3] = False  # a fully masked row
    if dropout:
        params.update(dropout_p=0.3, dropout_keep=rng.random((B, HQ, NQ, NK)) >= 0.3)
    return arrays, params


@pytest.mark.parametrize("option", list(OPTION_SETS))
def test_matches_the_loop_formulation(option):
    arrays, params = _problem(3, **OPTION_SETS[option])
    result = logn_attention(**arrays, **params)
    out, lse = naive_logn(**arrays, **params)
    np.testing.assert_allclose(result.out, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(result.lse), np.isinf(lse))
    np.testing.assert_allclose(result.lse, lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_lower_precision_evaluation_stays_close(precision):
    arrays, params = _problem(6, **OPTION_SETS["softcap_bias"])
    exact = logn_attention(**arrays, **params)
    emulated = logn_attention(**arrays, **params, precision=precision)
    assert 0 < error("out", emulated.out, exact.out) < {"float32": 1e-5, "bfloat16": 0.1}[precision]


# --- gradients ------------------------------------------------------------------------

def _finite_differences(arrays, params, dout, dlse, name):
    return finite_differences(logn_attention, arrays, params, dout, dlse, name)


@pytest.mark.parametrize(
    "n, causal, user_bias, with_dlse",
    list(itertools.product([None, 1, 300], [None, "bottom_right", "top_left"], [False, True], [True, False])),
)
def test_vjp_matches_finite_differences(n, causal, user_bias, with_dlse):
    rng = np.random.default_rng(11)
    arrays = dict(
        q=rng.standard_normal((1, 4, 3, 3)), k=rng.standard_normal((1, 2, 5, 3)), v=rng.standard_normal((1, 2, 5, 2))
    )
    params = dict(softcap=2.0, n=n)
    if causal:
        params.update(causal=True, causal_alignment=causal)
    if user_bias:
        arrays["bias"] = rng.standard_normal((4, 1, 5))
    result = logn_attention(**arrays, **params)
    dout = rng.standard_normal(result.out.shape)
    dlse = np.where(np.isfinite(result.lse), rng.standard_normal(result.lse.shape), 0.0) if with_dlse else None
    grads = logn_attention_vjp(dout, **arrays, **params, dlse=dlse)
    assert set(grads) == set(arrays)
    for name in arrays:
        numeric = _finite_differences(arrays, params, dout, dlse, name)
        assert grads[name].shape == arrays[name].shape
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-3), name


# --- bad input ------------------------------------------------------------------------

rng0 = np.random.default_rng(0)
Q, K, V = rng0.standard_normal((1, 4, 3, 5)), rng0.standard_normal((1, 2, 6, 5)), rng0.standard_normal((1, 2, 6, 7))

BAD = {
    "n zero": (dict(n=0), "n", "integer >= 1"),
    "n negative": (dict(n=-3), "n", "integer >= 1"),
    "n float": (dict(n=2.0), "n", "integer >= 1"),
    "n numpy float": (dict(n=np.float64(4.0)), "n", "integer >= 1"),
    "n bool": (dict(n=True), "n", "integer >= 1"),
    "n string": (dict(n="8"), "n", "integer >= 1"),
    "bias wrong shape": (dict(bias=np.zeros((3, 5))), "bias", "broadcastable"),
    "scale": (dict(scale=0.0), "scale", "(0.0, inf)"),
    "q rank": (dict(q=Q[0]), "q", "4 dimensions"),
    "precision": (dict(precision="fp8"), "precision", "bfloat16"),
    "backend": (dict(backend="triton"), "backend", "numba"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
}
BACKEND_CHOICE = ("precision", "backend", "precision with numba")


@pytest.mark.parametrize(
    "case, backend",
    [(case, "reference") for case in BAD] + [(case, "numba") for case in BAD if case not in BACKEND_CHOICE],
)
def test_forward_rejects(case, backend):
    overrides, argument, expected = BAD[case]
    with pytest.raises(SpecError) as info:
        logn_attention(**(dict(q=Q, k=K, v=V, backend=backend) | overrides))
    assert info.value.argument == argument
    assert expected in str(info.value)


@pytest.mark.parametrize("case", ["n zero", "n float", "bias wrong shape"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_vjp_rejects_the_same(case, backend):
    overrides, argument, _ = BAD[case]
    with pytest.raises(SpecError) as info:
        logn_attention_vjp(np.zeros((1, 4, 3, 7)), **(dict(q=Q, k=K, v=V, backend=backend) | overrides))
    assert info.value.argument == argument


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_vjp_rejects_a_wrong_cotangent(backend):
    with pytest.raises(SpecError) as info:
        logn_attention_vjp(np.zeros((1, 4, 3, 5)), Q, K, V, backend=backend)
    assert info.value.argument == "dout"


def test_numpy_integers_are_lengths():
    assert np.array_equal(logn_attention(Q, K, V, n=np.int64(6)).out, logn_attention(Q, K, V).out)


# --- properties -----------------------------------------------------------------------


@st.composite
def logn_problems(draw, options=("mask", "bias", "causal", "window", "softcap", "scale", "dropout"), max_len=17):
    """A dense problem with log-n's n: absent (Nk), 1, small, or a training length."""
    problem = draw(dense_problems(max_len=max_len, options=options))
    params = dict(problem.params)
    n = draw(st.sampled_from([None, 1, 2, 7, 4096]))
    if n is not None:
        params["n"] = n
    return problem.q, problem.k, problem.v, params


@given(logn_problems())
def test_is_dense_attention_with_scale_times_log_n(problem):
    q, k, _, params = problem
    assume(params.get("n", k.shape[2]) >= 2)
    properties.is_dense_attention_with_scale_times_log_n(logn_attention, *problem, rtol=1e-9)


@given(logn_problems(options=("mask", "causal", "window", "scale")))
def test_n_one_gives_uniform_weights(problem):
    properties.n_one_gives_uniform_weights(logn_attention, *problem)


@given(logn_problems(options=("mask", "bias", "causal", "window", "scale", "dropout")))
def test_key_shift_changes_only_lse(problem):
    properties.key_shift_changes_only_lse(logn_attention, *problem, rtol=1e-9)


def test_properties_catch_log2():
    arrays, params = _problem(12)
    wrong = lambda q, k, v, **p: _as_result(naive_logn(q, k, v, **p, bug="log2"))  # noqa: E731
    with pytest.raises(AssertionError):
        properties.is_dense_attention_with_scale_times_log_n(wrong, arrays["q"], arrays["k"], arrays["v"], params)


def test_properties_reject_problems_they_are_not_stated_for():
    arrays, _ = _problem(12, bias="full")
    with pytest.raises(ValueError, match="no bias"):
        properties.n_one_gives_uniform_weights(
            logn_attention, arrays["q"], arrays["k"], arrays["v"], {"bias": arrays["bias"]}
        )
    with pytest.raises(ValueError, match="n >= 2"):
        properties.is_dense_attention_with_scale_times_log_n(
            logn_attention, arrays["q"], arrays["k"], arrays["v"], {"n": 1}
        )


# --- the numba backend ------------------------------------------------------------------


def check_numba_agreement(q, k, v, params, precision, seed):
    agreement.check_numba_agreement(logn_attention, logn_attention_vjp, q, k, v, params, precision, seed)


@given(problem=logn_problems(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(problem, precision, seed):
    check_numba_agreement(*problem, precision, seed)


# --- conformance cases and flags -----------------------------------------------------------


def test_registered_with_its_cases_and_properties():
    mechanism = registry.get("logn")
    assert mechanism.forward is logn_attention and mechanism.vjp is logn_attention_vjp
    assert mechanism.backends == ("reference", "numba", "cupy") and mechanism.spec == "spec/dilution.md"
    assert [case.id for case in mechanism.cases()] == [case.id for case in cases()]


def test_cases_are_small_and_well_formed():
    all_cases = cases()
    assert len({case.id for case in all_cases}) == len(all_cases) >= 6
    for case in all_cases:
        arrays = case.arrays(np.random.default_rng(case.seed))
        assert sum(a.nbytes for a in arrays.values()) < 16_000, case.id
        assert set(case.flags) <= set(flag_catalogue.catalogue()), case.id
    assert set(FLAGS) == {flag for case in all_cases for flag in case.flags if flag.startswith("LOGN_")}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The log-n cases, exported to a temporary folder."""
    folder = tmp_path_factory.mktemp("logn_suite")
    export(folder, mechanisms=["logn"])
    return load_suite(folder)


def _as_result(pair):
    return Result(out=pair[0], lse=pair[1])


#: Each flag's wrong variants of ``naive_logn``, and what they get wrong.
BUGS = {
    "LOGN_SCALE": {
        "log2": "multiplies by log2 n",
        "divide": "divides the scores by ln n",
        "factor_after_cap": "multiplies the final logits (after the soft-cap, bias included) by ln n",
    },
    "LOGN_LENGTH": {
        "query_length": "uses the query length Nq as n",
        "row_count": "uses each row's count of attended keys (SSMax's n)",
    },
    "LOGN_EXPLICIT_N": {"ignore_n": "ignores the given n and uses Nk"},
    "LOGN_TRAINING_LENGTH": {"query_positions": "counts Qwen's positions from the first query, not the sequence"},
}


def test_every_flag_has_a_wrong_implementation():
    assert set(BUGS) == set(FLAGS)


def test_the_loop_formulation_passes_every_case(suite):
    report = verify(naive_logn, suite=suite)
    assert report.ok, report.format()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_reference_passes_every_case(suite, dtype):
    report = verify(logn_attention, vjp=logn_attention_vjp, suite=suite, grad=True, dtype=dtype)
    assert report.ok, report.format()


@pytest.mark.parametrize("flag, bug", [(flag, bug) for flag, bugs in BUGS.items() for bug in bugs])
def test_a_wrong_implementation_fails_a_flagged_case(flag, bug, suite):
    wrong = lambda q, k, v, **params: naive_logn(q, k, v, **params, bug=bug)  # noqa: E731
    report = verify(wrong, suite=suite.select(flags=flag))
    assert any(case.status == "fail" for case in report.cases), (
        f"no {flag} case catches a kernel that {BUGS[flag][bug]}"
    )


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_numba_backend_passes_the_cases(suite, dtype):
    report = verify(partial(logn_attention, backend="numba"), vjp=partial(logn_attention_vjp, backend="numba"), suite=suite,
                    grad=True, dtype=dtype)  # fmt: skip
    assert report.ok, report.format()
