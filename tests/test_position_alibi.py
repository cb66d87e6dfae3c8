"""ALiBi (refattn/position/alibi): slopes against hand tables and the published
code, the bias against a loop, the mechanism against the loop formulation of
dense attention and against BLOOM's formulation in PyTorch (autograd for the
gradients), the hand-derived VJP against finite differences, bad input,
properties under Hypothesis, and every flag's cases against a kernel that
makes the flagged mistake."""

import itertools
import math
from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn.conformance.flags as flag_catalogue
from refattn import SpecError, dense_attention
from refattn.conformance.suite import load_suite
from refattn.conformance.tolerance import error
from refattn.conformance.verify import default_suite_folder, verify
from refattn.core import registry
from refattn.position.alibi import (
    alibi_attention,
    alibi_attention_vjp,
    alibi_bias,
    alibi_slopes,
    properties,
)
from refattn.position.alibi.cases import FLAGS, cases
from refattn.position.alibi.reference import check_alibi_inputs
from refattn.strategies import dense_problems
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences

from .naive_dense import naive_dense



# --- slopes -------------------------------------------------------------------

HAND_SLOPES = {
    1: [2**-8],
    2: [2**-4, 2**-8],
    4: [2**-2, 2**-4, 2**-6, 2**-8],
    6: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3],  # the 4 of 4 heads, then 1st and 3rd of 8 heads
    8: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8],
    12: [2**-1, 2**-2, 2**-3, 2**-4, 2**-5, 2**-6, 2**-7, 2**-8, 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
    16: [2 ** (-(h + 1) / 2) for h in range(16)],
}


@pytest.mark.parametrize("num_heads", sorted(HAND_SLOPES))
def test_slopes_match_the_hand_table(num_heads):
    # Repeated products s * s**i are not exact for irrational s: 16 heads end at 2^-8 (1 + 1.1e-15).
    np.testing.assert_allclose(alibi_slopes(num_heads), HAND_SLOPES[num_heads], rtol=1e-14, atol=0)


def test_power_of_two_slopes_are_exact():
    for num_heads in (1, 2, 4, 8):
        np.testing.assert_array_equal(alibi_slopes(num_heads), HAND_SLOPES[num_heads])


def _authors_get_slopes(n):
    """The authors' get_slopes, as written in ofirpress/attention_with_linear_biases."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest_power_of_2) + _authors_get_slopes(2 * closest_power_of_2)[0::2][
        : n - closest_power_of_2
    ]


def test_slopes_are_bitwise_the_authors():
    for num_heads in range(1, 97):
        assert alibi_slopes(num_heads).tolist() == _authors_get_slopes(num_heads)


def test_slopes_match_bloom_and_mpt_in_float32():
    torch = pytest.importorskip("torch")
    for num_heads in range(1, 65):
        # HF transformers BLOOM build_alibi_tensor: float32 powers of a float32 base.
        closest = 2 ** math.floor(math.log2(num_heads))
        base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
        bloom = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
        if closest != num_heads:
            extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
            remaining = min(closest, num_heads - closest)
            bloom = torch.cat([bloom, torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))])
        # HF transformers MPT build_mpt_alibi_tensor (alibi_bias_max = 8): odd then even slopes of the next power of two.
        padded = 2 ** math.ceil(math.log2(num_heads))
        mpt = 1.0 / torch.pow(2, torch.arange(1, padded + 1, dtype=torch.float32) * (8 / padded))
        if padded != num_heads:
            mpt = torch.cat([mpt[1::2], mpt[::2]])[:num_heads]
        # BLOOM raises a float32-rounded base to the power k <= 64: relative error up to about k * 2^-24.
        np.testing.assert_allclose(alibi_slopes(num_heads), bloom.numpy(), rtol=64 * 2.0**-24)
        np.testing.assert_allclose(alibi_slopes(num_heads), mpt.numpy(), rtol=4 * 2.0**-24)


def test_slopes_match_transformers_when_installed():
    torch = pytest.importorskip("torch")
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for num_heads in (1, 6, 8, 12, 16, 20):
        alibi = bloom.build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), num_heads, torch.float32)  # (H, 1, 3)
        np.testing.assert_allclose(alibi[:, 0, 1].numpy(), alibi_slopes(num_heads), rtol=4e-7)


# --- the bias -----------------------------------------------------------------


def _loop_bias(slopes, q_positions, k_positions, form):
    bias = np.zeros((len(slopes), len(q_positions), len(k_positions)))
    for h, i, j in itertools.product(range(len(slopes)), range(len(q_positions)), range(len(k_positions))):
        gap = int(q_positions[i]) - int(k_positions[j])  # how far key j lies before query i
        bias[h, i, j] = -slopes[h] * (gap if form == "causal" else abs(gap))
    return bias


@pytest.mark.parametrize("form", ["causal", "symmetric"])
def test_bias_matches_a_loop(form):
    slopes = np.array([0.5, 0.125, 0.03, 0.7])
    q_positions, k_positions = np.array([3, 9, 10, -2]), np.array([0, 1, 2, 5, 9, 11, 40])
    want = _loop_bias(slopes, q_positions, k_positions, form)
    np.testing.assert_array_equal(alibi_bias(slopes, q_positions, k_positions, form), want)


def test_causal_form_is_a_penalty_before_the_query_and_a_gain_after():
    bias = alibi_bias(np.array([0.5]), np.array([4]), np.arange(8))
    assert bias[0, 0].tolist() == [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
    symmetric = alibi_bias(np.array([0.5]), np.array([4]), np.arange(8), "symmetric")
    assert symmetric[0, 0].tolist() == [-2.0, -1.5, -1.0, -0.5, 0.0, -0.5, -1.0, -1.5]


# --- the mechanism against independent formulations ---------------------------

B, HQ, HKV, NQ, NK, D, DV = SIZES = 2, 4, 2, 5, 9, 6, 3  # GQA 4:2, Nq != Nk
GRADIENT_SIZES = 1, 4, 2, 3, 5, 3, 2  # small: finite differences perturb every entry


def _problem(seed, form="causal", offset=None, user_bias=None, sizes=SIZES, **params):
    b, hq, hkv, nq, nk, d, dv = sizes
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=1.3 * rng.standard_normal((b, hq, nq, d)),
        k=1.3 * rng.standard_normal((b, hkv, nk, d)),
        v=rng.standard_normal((b, hkv, nk, dv)),
    )
    if user_bias == "full":
        arrays["bias"] = rng.standard_normal((b, hq, nq, nk))
    elif user_bias == "broadcast":
        arrays["bias"] = rng.standard_normal((hq, 1, nk))
    offset = nk - nq if offset is None else offset
    positions = dict(q_positions=offset + np.arange(nq), k_positions=np.arange(nk))
    return arrays, dict(positions, form=form, **params), rng


OPTION_SETS = {
    "causal": dict(causal=True),
    "causal_top_left": dict(causal=True, causal_alignment="top_left"),
    "symmetric": dict(form="symmetric"),
    "causal_form_unmasked": {},
    "softcap_bias_window": dict(softcap=1.5, window=(2, 1), user_bias="broadcast"),
    "scale_mask": dict(scale=0.4, user_bias="full", mask=True),
    "dropout": dict(dropout=True, form="symmetric"),
    "explicit_slopes": dict(slopes=np.array([0.9, 0.05, 0.3, 2.0])),
    "positions_far_from_zero": dict(offset=5000, causal=True),
}


def _option_problem(name, seed=3):
    option = dict(OPTION_SETS[name])
    mask, dropout = option.pop("mask", False), option.pop("dropout", False)
    arrays, params, rng = _problem(seed, **option)
    if mask:
        params["mask"] = rng.random((B, HQ, NQ, NK)) < 0.7
        params["mask"][1, 2, 3] = False  # a fully masked row
    if dropout:
        params.update(dropout_p=0.3, dropout_keep=rng.random((B, HQ, NQ, NK)) >= 0.3)
    return arrays, params


def _explicit_bias_params(arrays, params):
    """The same problem as plain dense attention with the ALiBi bias built by a loop."""
    slopes = params.get("slopes", alibi_slopes(HQ))
    bias = _loop_bias(slopes, params["q_positions"], params["k_positions"], params["form"])
    dense = {name: value for name, value in params.items() if name not in ("q_positions", "k_positions", "form", "slopes")}
    return dict(arrays, bias=bias + arrays.get("bias", 0.0)), dense


@pytest.mark.parametrize("option", list(OPTION_SETS))
def test_matches_the_loop_formulation_with_a_loop_bias(option):
    arrays, params = _option_problem(option)
    result = alibi_attention(**arrays, **params)
    dense_arrays, dense_params = _explicit_bias_params(arrays, params)
    out, lse = naive_dense(**dense_arrays, **dense_params)
    np.testing.assert_allclose(result.out, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(result.lse), np.isinf(lse))
    np.testing.assert_allclose(result.lse, lse, rtol=1e-12, atol=1e-12)
    assert result.aux == {}


def test_matches_bloom_in_torch_with_autograd_gradients():
    """BLOOM's attention (HF modeling_bloom) in float64: key-only bias m_h · j added
    through baddbmm, mask by a large negative fill, softmax; its autograd gives dq, dk, dv."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    b, h, n, d = 2, 6, 7, 5
    q, k, v = (rng.standard_normal((b, h, n, d)) for _ in range(3))
    dout = rng.standard_normal((b, h, n, d))
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    slopes = torch.tensor(_authors_get_slopes(h), dtype=torch.float64)
    alibi = (slopes[:, None] * torch.arange(n, dtype=torch.float64)[None, :]).reshape(1, h, 1, n)
    scores = alibi + (tq @ tk.transpose(-1, -2)) / math.sqrt(d)
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    weights = torch.softmax(scores.masked_fill(future, torch.finfo(torch.float64).min), dim=-1)
    (weights @ tv).backward(torch.tensor(dout))
    params = dict(q_positions=np.arange(n), k_positions=np.arange(n), causal=True)
    result = alibi_attention(q, k, v, **params)
    np.testing.assert_allclose(result.out, (weights @ tv).detach().numpy(), rtol=1e-12, atol=1e-13)
    grads = alibi_attention_vjp(dout, q, k, v, **params)
    for name, tensor in (("q", tq), ("k", tk), ("v", tv)):
        np.testing.assert_allclose(grads[name], tensor.grad.numpy(), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("masking", ["causal", "random mask", "window"])
def test_key_only_shortcut_gives_the_same_output_and_an_lse_larger_by_m_i(masking):
    arrays, params, rng = _problem(8, offset=40)
    if masking == "causal":
        params["causal"] = True
    elif masking == "random mask":
        params["mask"] = rng.random((B, HQ, NQ, NK)) < 0.5
    else:
        params["window"] = (1, 2)
    result = alibi_attention(**arrays, **params)
    slopes = alibi_slopes(HQ)
    shortcut = slopes[:, None, None] * params["k_positions"][None, None, :]  # m_h · p_j only
    dense_params = {name: params[name] for name in ("causal", "mask", "window") if name in params}
    out, lse = naive_dense(**arrays, bias=np.broadcast_to(shortcut, (B, HQ, NQ, NK)), **dense_params)
    np.testing.assert_allclose(result.out, out, rtol=1e-12, atol=1e-13)
    finite = np.isfinite(lse)
    row_shift = np.broadcast_to(slopes[:, None] * params["q_positions"][None, :], lse.shape)
    np.testing.assert_allclose(lse[finite] - row_shift[finite], result.lse[finite], rtol=1e-12, atol=1e-12)


def test_zero_slopes_are_dense_attention():
    arrays, params, _ = _problem(9, causal=True)
    result = alibi_attention(**arrays, **dict(params, slopes=np.zeros(HQ)))
    plain = dense_attention(**arrays, causal=True)
    np.testing.assert_array_equal(result.out, plain.out)
    np.testing.assert_array_equal(result.lse, plain.lse)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_lower_precision_evaluation_stays_close(precision):
    arrays, params = _option_problem("softcap_bias_window")
    exact = alibi_attention(**arrays, **params)
    emulated = alibi_attention(**arrays, **params, precision=precision)
    assert 0 < error("out", emulated.out, exact.out) < {"float32": 1e-5, "bfloat16": 0.1}[precision]


# --- gradients ----------------------------------------------------------------

def _finite_differences(arrays, params, dout, dlse, name):
    return finite_differences(alibi_attention, arrays, params, dout, dlse, name)


GRADIENT_COMBINATIONS = list(
    itertools.product(
        ["causal", "symmetric"],  # form
        [None, "bottom_right", "top_left"],  # causal alignment
        [None, "broadcast"],  # user bias
        [True, False],  # dlse
    )
)


@pytest.mark.parametrize("form, causal, user_bias, with_dlse", GRADIENT_COMBINATIONS)
def test_vjp_matches_finite_differences(form, causal, user_bias, with_dlse):
    extra = dict(causal=True, causal_alignment=causal) if causal else {}
    arrays, params, rng = _problem(11, form, 30, user_bias, GRADIENT_SIZES, softcap=2.0, **extra)
    dout = rng.standard_normal(alibi_attention(**arrays, **params).out.shape)
    lse = alibi_attention(**arrays, **params).lse
    dlse = np.where(np.isfinite(lse), rng.standard_normal(lse.shape), 0.0) if with_dlse else None
    grads = alibi_attention_vjp(dout, **arrays, **params, dlse=dlse)
    assert set(grads) == set(arrays)
    for name in arrays:
        numeric = _finite_differences(arrays, params, dout, dlse, name)
        assert grads[name].shape == arrays[name].shape
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-3), name


# --- bad input ----------------------------------------------------------------

rng0 = np.random.default_rng(0)
Q, K, V = rng0.standard_normal((1, 4, 3, 5)), rng0.standard_normal((1, 2, 6, 5)), rng0.standard_normal((1, 2, 6, 7))
GOOD = dict(q_positions=np.arange(3, 6), k_positions=np.arange(6))

BAD = {
    "q_positions missing": (dict(q_positions=None), "q_positions", "numpy array"),
    "q_positions a list": (dict(q_positions=[3, 4, 5]), "q_positions", "numpy array"),
    "q_positions float": (dict(q_positions=np.arange(3.0)), "q_positions", "integer"),
    "q_positions wrong length": (dict(q_positions=np.arange(4)), "q_positions", "shape (3,)"),
    "k_positions wrong length": (dict(k_positions=np.arange(5)), "k_positions", "shape (6,)"),
    "k_positions 2-d": (dict(k_positions=np.arange(6)[None]), "k_positions", "1-D"),
    "positions too large": (dict(k_positions=np.arange(6) + 2**60), "k_positions", "2**52"),
    "slopes wrong length": (dict(slopes=np.ones(2)), "slopes", "(Hq,) = (4,)"),
    "slopes nan": (dict(slopes=np.array([0.5, np.nan, 0.1, 0.2])), "slopes", "finite"),
    "slopes not an array": (dict(slopes=[0.5, 0.25, 0.1, 0.2]), "slopes", "numpy array"),
    "form": (dict(form="bidirectional"), "form", "symmetric"),
    "bias wrong shape": (dict(bias=np.zeros((3, 5))), "bias", "broadcastable"),
    "q rank": (dict(q=Q[0]), "q", "4 dimensions"),
    "scale": (dict(scale=-1.0), "scale", "(0.0, inf)"),
    "precision": (dict(precision="fp8"), "precision", "bfloat16"),
    "backend": (dict(backend="triton"), "backend", "numba"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_forward_rejects(case):
    overrides, argument, expected = BAD[case]
    with pytest.raises(SpecError) as info:
        alibi_attention(**(dict(q=Q, k=K, v=V, **GOOD) | overrides))
    assert info.value.argument == argument
    assert expected in str(info.value)


@pytest.mark.parametrize("case", ["q_positions wrong length", "slopes nan", "form", "bias wrong shape"])
def test_vjp_rejects_the_same(case):
    overrides, argument, _ = BAD[case]
    with pytest.raises(SpecError) as info:
        alibi_attention_vjp(np.zeros((1, 4, 3, 7)), **(dict(q=Q, k=K, v=V, **GOOD) | overrides))
    assert info.value.argument == argument


@pytest.mark.parametrize("num_heads", [0, -3, 2.0, True, "8"])
def test_slopes_reject_bad_head_counts(num_heads):
    with pytest.raises(SpecError) as info:
        alibi_slopes(num_heads)
    assert info.value.argument == "num_heads"


def test_bias_requires_slopes():
    with pytest.raises(SpecError) as info:
        alibi_bias(None, np.arange(2), np.arange(3))
    assert info.value.argument == "slopes"


# --- properties ---------------------------------------------------------------


@st.composite
def alibi_problems(draw, options=("mask", "bias", "causal", "window", "softcap", "scale", "dropout")):
    """A dense problem with ALiBi positions (an offset, sometimes gaps), form and sometimes explicit slopes."""
    problem = draw(dense_problems(max_len=17, options=options))
    nq, nk = problem.q.shape[2], problem.k.shape[2]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.integers(-100, 100))
    if draw(st.booleans()):
        k_positions = offset + np.arange(nk)
        q_positions = offset + nk - nq + np.arange(nq)
    else:
        k_positions = offset + np.sort(rng.choice(3 * nk, size=nk, replace=False))
        q_positions = offset + np.sort(rng.integers(0, 3 * nk, size=nq))
    params = dict(problem.params, q_positions=q_positions, k_positions=k_positions)
    params["form"] = draw(st.sampled_from(["causal", "symmetric"]))
    if draw(st.booleans()):
        params["slopes"] = rng.uniform(0.0, 1.0, problem.q.shape[1])
    return problem.q, problem.k, problem.v, params


@given(alibi_problems())
def test_position_shift_invariance(problem):
    properties.position_shift_invariance(alibi_attention, *problem)


@given(alibi_problems())
def test_key_only_shortcut(problem):
    q, k, v, params = problem
    properties.key_only_shortcut(alibi_attention, q, k, v, dict(params, form="causal"))


@given(alibi_problems(options=("mask", "causal", "window", "softcap", "scale")))
def test_identical_keys_give_distance_weights(problem):
    properties.identical_keys_give_distance_weights(alibi_attention, *problem)


def test_a_wrong_sign_breaks_the_distance_weights():
    arrays, params, _ = _problem(12)
    wrong = lambda q, k, v, **p: alibi_attention(q, k, v, **dict(p, slopes=-alibi_slopes(HQ)))  # noqa: E731
    with pytest.raises(AssertionError, match="out"):
        properties.identical_keys_give_distance_weights(wrong, arrays["q"], arrays["k"], arrays["v"], params)


def test_properties_reject_problems_they_are_not_stated_for():
    arrays, params, _ = _problem(12, form="symmetric")
    with pytest.raises(ValueError, match="causal"):
        properties.key_only_shortcut(alibi_attention, arrays["q"], arrays["k"], arrays["v"], params)


# --- conformance cases and flags ----------------------------------------------


def test_registered_with_its_cases_and_properties():
    mechanism = registry.get("alibi")
    assert mechanism.forward is alibi_attention and mechanism.vjp is alibi_attention_vjp
    assert mechanism.backends == ("reference", "numba", "cupy")
    assert mechanism.check_inputs is check_alibi_inputs
    assert [case.id for case in mechanism.cases()] == [case.id for case in cases()]
    assert mechanism.flags() == FLAGS


def test_cases_are_small_and_well_formed():
    all_cases = cases()
    assert len({case.id for case in all_cases}) == len(all_cases) >= 10
    for case in all_cases:
        arrays = case.arrays(np.random.default_rng(case.seed))
        assert arrays["q_positions"].dtype == arrays["k_positions"].dtype == np.int64
        assert sum(a.nbytes for a in arrays.values()) < 16_000, case.id
        assert set(case.flags) <= set(FLAGS) | set(flag_catalogue.FLAGS), case.id
    assert set(FLAGS) == {flag for case in all_cases for flag in case.flags if flag.startswith("ALIBI_")}


@pytest.fixture(scope="module")
def suite():
    """The committed ALiBi cases."""
    return load_suite(default_suite_folder()).select(mechanisms="alibi")


def _with(mistake):
    """An ALiBi implementation that makes one mistake in its arguments: ``mistake(params, q) -> params``."""
    return lambda q, k, v, **params: alibi_attention(q, k, v, **mistake(dict(params), q))


def _default_slopes(params, q):
    return alibi_slopes(q.shape[1]) if params.get("slopes") is None else params["slopes"]


def _key_only_shortcut(params, q):
    shortcut = _default_slopes(params, q)[:, None, None] * params["k_positions"][None, None, :]
    params["bias"] = shortcut + params.get("bias", 0.0)
    params["slopes"] = np.zeros(q.shape[1])
    return params


def _array_indices(params):
    """The positions replaced by array indices, 0 .. N - 1."""
    return dict(params, q_positions=np.arange(params["q_positions"].size), k_positions=np.arange(params["k_positions"].size))


WRONG = {
    "ALIBI_SLOPES": lambda p, q: dict(p, slopes=0.5 ** np.arange(1.0, q.shape[1] + 1)),
    "ALIBI_NON_POW2_HEADS": lambda p, q: dict(p, slopes=2.0 ** (-8 * np.arange(1.0, q.shape[1] + 1) / q.shape[1])),
    "ALIBI_SLOPE_ORDER": lambda p, q: dict(p, slopes=_default_slopes(p, q)[::-1].copy()),
    "ALIBI_SIGN": lambda p, q: dict(p, slopes=-_default_slopes(p, q)),
    "ALIBI_SYMMETRIC_FORM": lambda p, q: dict(p, form={"causal": "symmetric", "symmetric": "causal"}[p["form"]]),
    "ALIBI_POSITION_OFFSET": lambda p, q: _array_indices(p),
    "ALIBI_SHORTCUT_LSE": _key_only_shortcut,
    "ALIBI_EXPLICIT_SLOPES": lambda p, q: dict(p, slopes=None),
}


def test_the_reference_passes_every_case_in_float64_and_float32(suite):
    for dtype in ("float64", "float32"):
        report = verify(alibi_attention, vjp=alibi_attention_vjp, suite=suite, grad=True, dtype=dtype)
        assert report.ok, report.format()


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_a_wrong_implementation_fails_a_flagged_case(flag, suite):
    report = verify(_with(WRONG[flag]), suite=suite.select(flags=flag))
    assert any(case.status == "fail" for case in report.cases), report.format()


# --- the numba backend ----------------------------------------------------------


@given(problem=alibi_problems(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(problem, precision, seed):
    check_numba_agreement(alibi_attention, alibi_attention_vjp, *problem, precision, seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numba_backend_passes_the_cases(suite, dtype):
    report = verify(partial(alibi_attention, backend="numba"), vjp=partial(alibi_attention_vjp, backend="numba"),
                    suite=suite, grad=True, dtype=dtype)
    assert report.ok, report.format()
