"""T5's bucketed bias (refattn/position/t5): the bucket function against HF
transformers' operations in PyTorch at every relative position of several
configurations and against hand-derived boundaries, the bias against a loop,
the mechanism against the loop formulation of dense attention and against
HF's T5 attention in PyTorch (autograd for every gradient, the table's
included), the hand-derived VJP against finite differences, bad input,
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
from refattn import SpecError, dense_attention, dense_attention_vjp
from refattn.conformance.suite import load_suite
from refattn.conformance.tolerance import error
from refattn.conformance.verify import default_suite_folder, verify
from refattn.core import registry
from refattn.position.t5 import (
    properties,
    relative_position_bucket,
    t5_attention,
    t5_attention_vjp,
    t5_bias,
)
from refattn.position.t5.cases import FLAGS, cases
from refattn.position.t5.reference import check_t5_inputs
from refattn.strategies import dense_problems
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences

from .naive_dense import naive_dense



# --- the bucket function --------------------------------------------------------


def hf_bucket(torch, relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """HF transformers' T5Attention._relative_position_bucket, operation by operation, in PyTorch."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


#: (num_buckets, max_distance, bidirectional): T5's own, awkward ones, and float32 ties (20 / 160, 16 / 9, 12 / 81).
CONFIGURATIONS = [
    (32, 128, True), (32, 128, False), (10, 20, True), (10, 20, False), (64, 256, True), (64, 256, False),
    (20, 160, True), (18, 128, True), (16, 9, True), (12, 81, True), (8, 10, True), (6, 7, True), (4, 2, True),
    (2, 2, False), (3, 2, False), (7, 30, False), (100, 1000, True),
]  # fmt: skip


@pytest.mark.parametrize("num_buckets, max_distance, bidirectional", CONFIGURATIONS)
def test_buckets_equal_hf_at_every_relative_position(num_buckets, max_distance, bidirectional):
    torch = pytest.importorskip("torch")
    relative_position = np.arange(-2 * max_distance - 5, 2 * max_distance + 6)
    want = hf_bucket(torch, torch.from_numpy(relative_position), bidirectional, num_buckets, max_distance).numpy()
    got = relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def _exact_value(distance, num_buckets, max_distance, bidirectional):
    """The log branch's value before truncation, in 80-bit arithmetic."""
    side = num_buckets // 2 if bidirectional else num_buckets
    max_exact = np.longdouble(side // 2)
    log_range = np.log(np.longdouble(max_distance) / max_exact)
    return np.log(np.longdouble(distance) / max_exact) / log_range * (side - max_exact)


@pytest.mark.slow
def test_buckets_differ_from_hf_only_at_float32_ties():
    """Over every valid configuration with num_buckets < 130 and max_distance < 300: where
    PyTorch's float32 log (SLEEF, within 1 ulp) and the correctly rounded one disagree, the
    exact value of the log branch is within a few float32 roundoffs of an integer: a tie,
    or a near-tie, that float32 rounding decides."""
    torch = pytest.importorskip("torch")
    differing = 0
    for num_buckets, max_distance, bidirectional in itertools.product(range(2, 130), range(2, 300), (True, False)):
        side = num_buckets // 2 if bidirectional else num_buckets
        if side // 2 < 1 or max_distance <= side // 2 or (bidirectional and num_buckets % 2):
            continue
        relative_position = np.arange(-2 * max_distance - 5, 2 * max_distance + 6)
        want = hf_bucket(torch, torch.from_numpy(relative_position), bidirectional, num_buckets, max_distance).numpy()
        got = relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance)
        for r in relative_position[got != want]:
            value = _exact_value(abs(int(r)), num_buckets, max_distance, bidirectional)
            assert abs(value - np.round(value)) <= 4 * 2.0**-24 * abs(value), (num_buckets, max_distance, bidirectional, r)
        differing += bool(np.any(got != want))
    assert differing < 60  # 25 configurations (of 51 925) with PyTorch 2.13 on an AVX-512 CPU


#: Bidirectional 32 / 128 (T5's): relative position -> bucket, derived by hand.
#: Negative r (key before the query): n = |r|, max_exact = 8, log buckets 8 + trunc(2 log2(n / 8)).
T5_DEFAULT_BY_HAND = {
    0: 0, -1: 1, -7: 7,  # exact buckets
    -8: 8, -11: 8, -12: 9, -15: 9, -16: 10,  # 2 log2(12/8) = 1.17, 2 log2(16/8) = 2 exactly
    -22: 10, -23: 11, -32: 12, -45: 12, -46: 13, -64: 14, -90: 14, -91: 15,  # 2 log2(91/8) = 7.016
    -127: 15, -128: 15, -129: 15, -10_000: 15,  # saturated from max_distance on
    1: 17, 7: 23, 8: 24, 16: 26, 91: 31, 128: 31, 10_000: 31,  # keys after the query: 16 + the same
}
#: Unidirectional 32 / 128 (T5's decoder): n = max(-r, 0), max_exact = 16, log buckets 16 + trunc(16 log8(n / 16)).
T5_DECODER_BY_HAND = {5: 0, 1: 0, 0: 0, -1: 1, -15: 15, -16: 16, -31: 21, -32: 21, -64: 26, -127: 31, -128: 31, -500: 31}


@pytest.mark.parametrize("bidirectional, by_hand", [(True, T5_DEFAULT_BY_HAND), (False, T5_DECODER_BY_HAND)])
def test_buckets_at_hand_derived_boundaries(bidirectional, by_hand):
    relative_position = np.array(list(by_hand))
    got = relative_position_bucket(relative_position, bidirectional, 32, 128)
    assert dict(zip(by_hand, got.tolist())) == by_hand


def _float64_bucket(relative_position, bidirectional, num_buckets, max_distance, rounding=np.trunc, clamp_to_side=True):
    """The bucket formula with its log branch in float64: the T5_BUCKET_BOUNDARY mistake.

    ``rounding`` and ``clamp_to_side=False`` (clamp the bucket to the table, after the
    side's offset) make the T5_LOG_BUCKETS and T5_MAX_DISTANCE_SATURATION mistakes.
    """
    side = num_buckets // 2 if bidirectional else num_buckets
    offset = np.where(relative_position > 0, side, 0) if bidirectional else 0
    n = np.abs(relative_position) if bidirectional else np.maximum(-relative_position, 0)
    max_exact = side // 2
    value = np.log(np.maximum(n, max_exact) / max_exact) / math.log(max_distance / max_exact) * (side - max_exact)
    large = max_exact + rounding(value).astype(np.int64)
    if clamp_to_side:
        return offset + np.where(n < max_exact, n, np.minimum(large, side - 1))
    return np.where(n < max_exact, offset + n, np.minimum(offset + large, num_buckets - 1))


def _reciprocal_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """The log branch as PyTorch's CUDA division by a Python scalar computes it: times the float32 reciprocal."""
    side = num_buckets // 2 if bidirectional else num_buckets
    offset = np.where(relative_position > 0, side, 0) if bidirectional else 0
    n = np.abs(relative_position) if bidirectional else np.maximum(-relative_position, 0)
    max_exact, f32 = side // 2, np.float32
    ratio = np.maximum(n, max_exact).astype(f32) * f32(1 / max_exact)
    inverse_log_range = f32(1 / math.log(max_distance / max_exact))
    scaled = np.log(ratio.astype(np.float64)).astype(f32) * inverse_log_range * f32(side - max_exact)
    return offset + np.where(n < max_exact, n, np.minimum(max_exact + scaled.astype(np.int64), side - 1))


def test_float32_decides_the_ties_of_20_buckets_over_160():
    # 10 buckets a side, max_exact 5: the log branch is exactly log2(n / 5) at n = 10, 20, 40, 80.
    relative_position = np.array([-80, -40, -20, -10, 10, 20, 40, 80])
    got = relative_position_bucket(relative_position, True, 20, 160)
    assert got.tolist() == [9, 8, 7, 6, 16, 17, 18, 19]
    float64 = _float64_bucket(relative_position, True, 20, 160)
    assert float64.tolist() == [8, 8, 6, 5, 15, 16, 18, 18]  # one bucket lower at 10, 20 and 80


@pytest.mark.parametrize("case", [c for c in cases() if "T5_BUCKET_BOUNDARY" not in c.flags], ids=lambda c: c.id)
def test_no_other_case_depends_on_how_the_log_is_rounded(case):
    """Outside the boundary case, float64 and reciprocal-multiply evaluations give the same buckets."""
    arrays = case.arrays(np.random.default_rng(case.seed))
    relative_position = arrays["k_positions"][None, :] - arrays["q_positions"][:, None]
    config = case.params["bidirectional"], case.params["num_buckets"], case.params["max_distance"]
    want = relative_position_bucket(relative_position, *config)
    np.testing.assert_array_equal(_float64_bucket(relative_position, *config), want)
    np.testing.assert_array_equal(_reciprocal_bucket(relative_position, *config), want)


@st.composite
def bucket_configurations(draw):
    bidirectional = draw(st.booleans())
    num_buckets = draw(st.integers(2, 40).map(lambda n: 2 * n) if bidirectional else st.integers(2, 80))
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    return bidirectional, num_buckets, draw(st.integers(max_exact + 1, 400))


@given(bucket_configurations())
def test_buckets_are_monotone_and_saturate(configuration):
    properties.buckets_monotone_and_saturating(relative_position_bucket, *configuration)


def test_the_bucket_property_catches_a_missing_clamp():
    def no_clamp(relative_position, bidirectional, num_buckets, max_distance):
        distance = np.abs(relative_position)
        return np.where(distance < 8, distance, 8 + (2 * np.log2(np.maximum(distance, 8) / 8)).astype(np.int64))

    with pytest.raises(AssertionError, match="outside"):
        properties.buckets_monotone_and_saturating(no_clamp, True, 32, 128)


# --- the bias -----------------------------------------------------------------


def test_bias_matches_a_loop_over_hf_buckets():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    table = rng.standard_normal((32, 3))
    q_positions, k_positions = np.array([0, 5, 9, 200]), np.array([0, 1, 3, 8, 9, 30, 99, 180, 400])
    bias = t5_bias(table, q_positions, k_positions)
    for h, i, j in itertools.product(range(3), range(4), range(9)):
        bucket = hf_bucket(torch, torch.tensor(int(k_positions[j] - q_positions[i]))).item()
        assert bias[h, i, j] == table[bucket, h]


# --- the mechanism against independent formulations ---------------------------

B, HQ, HKV, NQ, NK, D, DV = SIZES = 2, 4, 2, 5, 30, 6, 3  # GQA 4:2, Nq != Nk, distances past max_exact
GRADIENT_SIZES = 2, 2, 1, 3, 12, 3, 2  # small: finite differences perturb every entry


def _problem(seed, offset=None, user_bias=None, sizes=SIZES, num_buckets=16, max_distance=20, bidirectional=True, **params):
    b, hq, hkv, nq, nk, d, dv = sizes
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=1.3 * rng.standard_normal((b, hq, nq, d)),
        k=1.3 * rng.standard_normal((b, hkv, nk, d)),
        v=rng.standard_normal((b, hkv, nk, dv)),
        table=1.5 * rng.standard_normal((num_buckets, hq)),
    )
    if user_bias == "full":
        arrays["bias"] = rng.standard_normal((b, hq, nq, nk))
    elif user_bias == "broadcast":
        arrays["bias"] = rng.standard_normal((hq, 1, nk))
    offset = nk - nq if offset is None else offset
    buckets = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    return arrays, dict(q_positions=offset + np.arange(nq), k_positions=np.arange(nk), **buckets, **params), rng


OPTION_SETS = {
    "encoder": {},
    "encoder_scale_1": dict(scale=1.0),
    "decoder_causal": dict(bidirectional=False, causal=True),
    "decoder_causal_top_left": dict(bidirectional=False, causal=True, causal_alignment="top_left"),
    "decoder_unmasked": dict(bidirectional=False),
    "t5_default_sizes": dict(num_buckets=32, max_distance=128, offset=100),
    "softcap_bias_window": dict(softcap=1.5, window=(4, 1), user_bias="broadcast"),
    "mask_full_bias": dict(user_bias="full", mask=True),
    "dropout": dict(dropout=True),
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


def _loop_buckets(torch, params):
    q_positions, k_positions = params["q_positions"], params["k_positions"]
    config = params["bidirectional"], params["num_buckets"], params["max_distance"]
    pairs = [[int(kp - qp) for kp in k_positions] for qp in q_positions]
    return np.array([[hf_bucket(torch, torch.tensor(r), *config).item() for r in row] for row in pairs])


T5_PARAMS = ("table", "q_positions", "k_positions", "bidirectional", "num_buckets", "max_distance")


def _dense_params(params):
    """The keyword arguments that are dense attention's (all but the T5 ones)."""
    return {name: value for name, value in params.items() if name not in T5_PARAMS}


@pytest.mark.parametrize("option", list(OPTION_SETS))
def test_matches_the_loop_formulation_with_a_loop_bias(option):
    torch = pytest.importorskip("torch")
    arrays, params = _option_problem(option)
    result = t5_attention(**arrays, **params)
    buckets = _loop_buckets(torch, params)
    bias = np.moveaxis(arrays["table"][buckets], -1, 0) + arrays.get("bias", 0.0)  # table[bucket(i, j), h]
    dense_params = _dense_params(params)
    dense_arrays = {n: a for n, a in arrays.items() if n != "table"}
    out, lse = naive_dense(**dict(dense_arrays, bias=bias), **dense_params)
    np.testing.assert_allclose(result.out, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(result.lse), np.isinf(lse))
    np.testing.assert_allclose(result.lse, lse, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(result.aux["buckets"], buckets)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_matches_hf_t5_attention_in_torch_with_autograd_gradients(is_decoder):
    """HF T5Attention in float64: scores = q kᵀ (no scaling), + compute_bias's position bias
    (and the decoder's causal mask as an additive finfo.min), softmax, · v. Autograd
    gives dq, dk, dv and the gradient of relative_attention_bias.weight."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    b, h, n, d, num_buckets = 2, 3, 40, 4, 32
    q, k, v = (rng.standard_normal((b, h, n, d)) for _ in range(3))
    table, dout = rng.standard_normal((num_buckets, h)), rng.standard_normal((b, h, n, d))
    tq, tk, tv, weight = (torch.tensor(x, requires_grad=True) for x in (q, k, v, table))
    relative_position = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # memory_position - context_position
    buckets = hf_bucket(torch, relative_position, bidirectional=not is_decoder, num_buckets=num_buckets, max_distance=128)
    position_bias = torch.nn.functional.embedding(buckets, weight).permute([2, 0, 1]).unsqueeze(0)  # (1, H, N, N)
    if is_decoder:  # the extended causal mask, added to the position bias
        future = torch.full((n, n), torch.finfo(torch.float64).min, dtype=torch.float64)
        position_bias = position_bias + torch.triu(future, diagonal=1)
    # HF takes the softmax of scores.float(); in float64 throughout, it is compared to 1e-12 here.
    weights = torch.softmax(tq @ tk.transpose(3, 2) + position_bias, dim=-1)
    (weights @ tv).backward(torch.tensor(dout))
    params = dict(table=table, q_positions=np.arange(n), k_positions=np.arange(n), bidirectional=not is_decoder,
                  num_buckets=num_buckets, max_distance=128, scale=1.0, causal=is_decoder)  # fmt: skip
    result = t5_attention(q, k, v, **params)
    np.testing.assert_allclose(result.out, (weights @ tv).detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(result.aux["buckets"], buckets.numpy())
    grads = t5_attention_vjp(dout, q, k, v, **params)
    for name, tensor in (("q", tq), ("k", tk), ("v", tv), ("table", weight)):
        np.testing.assert_allclose(grads[name], tensor.grad.numpy(), rtol=1e-11, atol=1e-12)


def test_table_gradient_is_the_bias_gradient_summed_per_bucket():
    arrays, params = _option_problem("softcap_bias_window")
    rng = np.random.default_rng(5)
    dout, dlse = rng.standard_normal((B, HQ, NQ, DV)), rng.standard_normal((B, HQ, NQ))
    grads = t5_attention_vjp(dout, **arrays, **params, dlse=dlse)
    buckets = t5_attention(**arrays, **params).aux["buckets"]
    explicit = np.moveaxis(arrays["table"][buckets], -1, 0) + arrays["bias"]  # (H, Nq, Nk)
    dense_params = dict(softcap=1.5, window=(4, 1))
    dense_grads = dense_attention_vjp(dout, arrays["q"], arrays["k"], arrays["v"], dlse=dlse, bias=explicit, **dense_params)
    d_bias = dense_grads["bias"]
    want = np.zeros_like(arrays["table"])
    for h, i, j in itertools.product(range(HQ), range(NQ), range(NK)):
        want[buckets[i, j], h] += d_bias[h, i, j]
    np.testing.assert_allclose(grads["table"], want, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(grads["bias"], d_bias.sum(axis=1, keepdims=True), rtol=1e-13, atol=1e-14)


def test_a_constant_table_is_dense_attention_with_a_shifted_lse():
    arrays, params, _ = _problem(9, causal=True)
    arrays["table"] = np.full_like(arrays["table"], 2.5)
    result = t5_attention(**arrays, **params)
    plain = dense_attention(arrays["q"], arrays["k"], arrays["v"], causal=True)
    np.testing.assert_allclose(result.out, plain.out, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(result.lse, plain.lse + 2.5, rtol=1e-13)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_lower_precision_evaluation_stays_close_and_keeps_the_buckets(precision):
    arrays, params = _option_problem("softcap_bias_window")
    exact = t5_attention(**arrays, **params)
    emulated = t5_attention(**arrays, **params, precision=precision)
    assert 0 < error("out", emulated.out, exact.out) < {"float32": 1e-5, "bfloat16": 0.1}[precision]
    np.testing.assert_array_equal(emulated.aux["buckets"], exact.aux["buckets"])


# --- gradients ----------------------------------------------------------------

def _finite_differences(arrays, params, dout, dlse, name):
    return finite_differences(t5_attention, arrays, params, dout, dlse, name)


GRADIENT_COMBINATIONS = list(
    itertools.product(
        [True, False],  # bidirectional
        [None, "bottom_right", "top_left"],  # causal alignment
        [None, "broadcast"],  # user bias
        [True, False],  # dlse
    )
)


@pytest.mark.parametrize("bidirectional, causal, user_bias, with_dlse", GRADIENT_COMBINATIONS)
def test_vjp_matches_finite_differences(bidirectional, causal, user_bias, with_dlse):
    extra = dict(causal=True, causal_alignment=causal) if causal else {}
    arrays, params, rng = _problem(11, user_bias=user_bias, sizes=GRADIENT_SIZES, num_buckets=8,
                                   max_distance=6, bidirectional=bidirectional, softcap=2.0, **extra)  # fmt: skip
    result = t5_attention(**arrays, **params)
    dout = rng.standard_normal(result.out.shape)
    dlse = np.where(np.isfinite(result.lse), rng.standard_normal(result.lse.shape), 0.0) if with_dlse else None
    grads = t5_attention_vjp(dout, **arrays, **params, dlse=dlse)
    assert set(grads) == set(arrays)
    for name in arrays:
        numeric = _finite_differences(arrays, params, dout, dlse, name)
        assert grads[name].shape == arrays[name].shape
        # Floor 1e-2: where every visible key of a row shares one bucket (top-left, saturated), the
        # table's gradient without dlse is exactly 0 and central differences give rounding (~1e-10).
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-2), name


def test_unused_buckets_get_zero_gradient():
    arrays, params, rng = _problem(12, sizes=GRADIENT_SIZES, num_buckets=32, max_distance=128)
    grads = t5_attention_vjp(rng.standard_normal((2, 2, 3, 2)), **arrays, **params)
    used = np.unique(t5_attention(**arrays, **params).aux["buckets"])
    unused = np.setdiff1d(np.arange(32), used)
    assert len(unused) > 10 and np.all(grads["table"][unused] == 0) and np.all(grads["table"][used] != 0)


# --- bad input ----------------------------------------------------------------

rng0 = np.random.default_rng(0)
Q, K, V = rng0.standard_normal((1, 4, 3, 5)), rng0.standard_normal((1, 2, 6, 5)), rng0.standard_normal((1, 2, 6, 7))
GOOD = dict(table=rng0.standard_normal((32, 4)), q_positions=np.arange(3, 6), k_positions=np.arange(6))

BAD = {
    "num_buckets 1": (dict(num_buckets=1, bidirectional=False), "num_buckets", "an integer >= 2"),
    "num_buckets 2 bidirectional": (dict(num_buckets=2), "num_buckets", "even integer >= 4"),
    "num_buckets odd bidirectional": (dict(num_buckets=33), "num_buckets", "even integer >= 4"),
    "num_buckets float": (dict(num_buckets=32.0), "num_buckets", "even integer"),
    "num_buckets bool": (dict(num_buckets=True, bidirectional=False), "num_buckets", "integer >= 2"),
    "max_distance = max_exact": (dict(max_distance=8), "max_distance", "> max_exact = 8"),
    "max_distance < max_exact": (dict(max_distance=4), "max_distance", "> max_exact = 8"),
    "max_distance = max_exact decoder": (dict(max_distance=16, bidirectional=False), "max_distance", "> max_exact = 16"),
    "max_distance float": (dict(max_distance=128.0), "max_distance", "an integer"),
    "bidirectional not bool": (dict(bidirectional=1), "bidirectional", "True or False"),
    "table transposed": (dict(table=GOOD["table"].T.copy()), "table", "(num_buckets, Hq = 4)"),
    "table wrong heads": (dict(table=np.zeros((32, 2))), "table", "Hq = 4"),
    "table wrong buckets": (dict(table=np.zeros((16, 4))), "table", "num_buckets = 32"),
    "table nan": (dict(table=np.full((32, 4), np.nan)), "table", "finite"),
    "table missing": (dict(table=None), "table", "numpy array"),
    "q_positions float": (dict(q_positions=np.arange(3.0)), "q_positions", "integer"),
    "q_positions wrong length": (dict(q_positions=np.arange(4)), "q_positions", "shape (3,)"),
    "k_positions wrong length": (dict(k_positions=np.arange(7)), "k_positions", "shape (6,)"),
    "k_positions a list": (dict(k_positions=list(range(6))), "k_positions", "numpy array"),
    "bias wrong shape": (dict(bias=np.zeros((3, 5))), "bias", "broadcastable"),
    "window": (dict(window=(-1, 0)), "window", "non-negative"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_forward_rejects(case):
    overrides, argument, expected = BAD[case]
    with pytest.raises(SpecError) as info:
        t5_attention(**(dict(q=Q, k=K, v=V, **GOOD) | overrides))
    assert info.value.argument == argument
    assert expected in str(info.value)


@pytest.mark.parametrize("case", ["num_buckets odd bidirectional", "max_distance = max_exact", "table transposed"])
def test_vjp_and_bucket_function_reject_the_same(case):
    overrides, argument, _ = BAD[case]
    with pytest.raises(SpecError) as info:
        t5_attention_vjp(np.zeros((1, 4, 3, 7)), **(dict(q=Q, k=K, v=V, **GOOD) | overrides))
    assert info.value.argument == argument
    bucket_args = {n: overrides[n] for n in ("bidirectional", "num_buckets", "max_distance") if n in overrides}
    if bucket_args:
        with pytest.raises(SpecError) as info:
            relative_position_bucket(np.arange(3), **bucket_args)
        assert info.value.argument == argument


@pytest.mark.parametrize("relative_position", [np.arange(3.0), [1, 2], 5])
def test_bucket_function_rejects_non_integer_positions(relative_position):
    with pytest.raises(SpecError) as info:
        relative_position_bucket(relative_position)
    assert info.value.argument == "relative_position"


# --- properties ---------------------------------------------------------------


@st.composite
def t5_problems(draw):
    """A dense problem with T5 positions (an offset, sometimes gaps), bucket parameters and a table."""
    problem = draw(dense_problems(max_len=17))
    nq, nk, hq = problem.q.shape[2], problem.k.shape[2], problem.q.shape[1]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.integers(-100, 100))
    if draw(st.booleans()):
        q_positions, k_positions = offset + nk - nq + np.arange(nq), offset + np.arange(nk)
    else:
        k_positions = offset + np.sort(rng.choice(20 * nk, size=nk, replace=False))
        q_positions = offset + np.sort(rng.integers(0, 20 * nk, size=nq))
    bidirectional, num_buckets, max_distance = draw(bucket_configurations())
    buckets = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    table = rng.standard_normal((num_buckets, hq))
    params = dict(problem.params, q_positions=q_positions, k_positions=k_positions, table=table, **buckets)
    return problem.q, problem.k, problem.v, params


@given(t5_problems())
def test_position_shift_invariance(problem):
    properties.position_shift_invariance(t5_attention, *problem)


@given(t5_problems())
def test_constant_table_shifts_lse(problem):
    properties.constant_table_shifts_lse(t5_attention, *problem)


# --- conformance cases and flags ----------------------------------------------


def test_registered_with_its_cases_and_properties():
    mechanism = registry.get("t5")
    assert mechanism.forward is t5_attention and mechanism.vjp is t5_attention_vjp
    assert mechanism.backends == ("reference", "numba", "cupy")
    assert mechanism.check_inputs is check_t5_inputs
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
    assert set(FLAGS) == {flag for case in all_cases for flag in case.flags if flag.startswith("T5_")}


@pytest.fixture(scope="module")
def suite():
    """The committed T5 cases."""
    return load_suite(default_suite_folder()).select(mechanisms="t5")


def _with_buckets(bucket):
    """A T5 implementation whose bucket function is ``bucket(r, bidirectional, num_buckets, max_distance)``."""

    def attend(q, k, v, *, table, q_positions, k_positions, bidirectional, num_buckets, max_distance, bias=None, **params):
        buckets = bucket(k_positions[None, :] - q_positions[:, None], bidirectional, num_buckets, max_distance)
        position_bias = np.moveaxis(table[buckets], -1, 0) + (0.0 if bias is None else bias)
        return dense_attention(q, k, v, bias=position_bias, **params)

    return attend


def _with(mistake):
    """A T5 implementation that makes one mistake in its arguments: ``mistake(params) -> params``."""
    return lambda q, k, v, **params: t5_attention(q, k, v, **mistake(dict(params)))


def _overwriting_table_gradient(dout, q, k, v, *, dlse=None, **params):
    """The right gradients, except that the table's scatter overwrites instead of adding."""
    grads = t5_attention_vjp(dout, q, k, v, dlse=dlse, **params)
    buckets = t5_attention(q, k, v, **params).aux["buckets"]
    explicit = np.moveaxis(params["table"][buckets], -1, 0)
    dense_params = _dense_params(params)
    dense_params["bias"] = explicit + (0.0 if params.get("bias") is None else params["bias"])
    d_bias = dense_attention_vjp(dout, q, k, v, dlse=dlse, **dense_params)["bias"]
    d_bias = d_bias.reshape(-1, *d_bias.shape[-3:]).sum(axis=0)  # (Hq, Nq, Nk), summed over the batch
    d_table = np.zeros_like(params["table"])
    d_table[buckets] = np.moveaxis(d_bias, 0, -1)  # last pair of each bucket wins
    grads["table"] = d_table
    return grads


def _array_indices(params):
    """The positions replaced by array indices, 0 .. N - 1."""
    return dict(params, q_positions=np.arange(params["q_positions"].size), k_positions=np.arange(params["k_positions"].size))


WRONG = {
    "T5_BUCKET_DIRECTION": _with(lambda p: dict(p, q_positions=-p["q_positions"], k_positions=-p["k_positions"])),
    "T5_LOG_BUCKETS": _with_buckets(partial(_float64_bucket, rounding=np.round)),
    "T5_UNIDIRECTIONAL": _with(lambda p: dict(p, bidirectional=True)),
    "T5_MAX_DISTANCE_SATURATION": _with_buckets(partial(_float64_bucket, clamp_to_side=False)),
    "T5_BUCKET_BOUNDARY": _with_buckets(_float64_bucket),
    "T5_POSITION_OFFSET": _with(_array_indices),
    "T5_TABLE_LAYOUT": _with(lambda p: dict(p, table=p["table"].T.copy())),
}


def test_the_reference_passes_every_case_in_float64_and_float32(suite):
    for dtype in ("float64", "float32"):
        report = verify(t5_attention, vjp=t5_attention_vjp, suite=suite, grad=True, dtype=dtype)
        assert report.ok, report.format()


@pytest.mark.parametrize("flag", sorted(WRONG))
def test_a_wrong_implementation_fails_a_flagged_case(flag, suite):
    report = verify(WRONG[flag], suite=suite.select(flags=flag))
    assert any(case.status == "fail" for case in report.cases), report.format()


def test_a_wrong_table_gradient_fails_a_flagged_case(suite):
    report = verify(t5_attention, vjp=_overwriting_table_gradient, suite=suite.select(flags="T5_TABLE_GRADIENT"), grad=True)
    failed = [case for case in report.cases if case.status == "fail"]
    assert failed and all(check.name == "grad.table" for case in failed for check in case.failed_checks), report.format()


def hf_t5_in_torch(q, k, v, *, table, q_positions, k_positions, bidirectional, num_buckets, max_distance,
                   bias=None, mask=None, causal=False, causal_alignment="bottom_right", window=None, scale=None,
                   softcap=0.0, dropout_p=0.0):  # fmt: skip
    """T5 attention in PyTorch, in the dtype it is given: HF's bucket operations and embedding
    gather (compute_bias), around plain attention with the options the cases use."""
    import torch

    assert dropout_p == 0.0, "no case gives T5 a dropout"
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    buckets = hf_bucket(torch, k_positions[None, :] - q_positions[:, None], bidirectional, num_buckets, max_distance)
    scores = scores + torch.nn.functional.embedding(buckets, table).permute([2, 0, 1])
    if bias is not None:
        scores = scores + bias
    nq, nk = scores.shape[-2:]
    aligned = torch.arange(nq)[:, None] + (nk - nq if causal_alignment == "bottom_right" else 0)
    key = torch.arange(nk)[None, :]
    allowed = torch.ones(nq, nk, dtype=torch.bool) if mask is None else mask
    allowed = allowed & (key <= aligned) if causal else allowed
    if window is not None:
        left, right = window
        allowed = allowed & (key >= aligned - left) if left is not None else allowed
        allowed = allowed & (key <= aligned + right) if right is not None else allowed
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # fully masked rows: 0
    return weights @ v, lse


def test_hf_formulation_in_torch_float32_passes_every_case(suite):
    """HF's float32 bucket operations reproduce every case's buckets, the boundary case's included,
    and a float32 PyTorch attention around them is within every float32 budget, gradients included."""
    pytest.importorskip("torch")
    from refattn.conformance.adapters import from_torch

    report = verify(from_torch(hf_t5_in_torch), suite=suite, grad=True, dtype="float32")
    assert report.ok, report.format()


# --- the numba backend ----------------------------------------------------------


@given(problem=t5_problems(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(problem, precision, seed):
    check_numba_agreement(t5_attention, t5_attention_vjp, *problem, precision, seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numba_backend_passes_the_cases(suite, dtype):
    report = verify(partial(t5_attention, backend="numba"), vjp=partial(t5_attention_vjp, backend="numba"),
                    suite=suite, grad=True, dtype=dtype)
    assert report.ok, report.format()
