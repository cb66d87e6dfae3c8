"""Attention diagnostics (refattn/dilution/diagnostics.py and its Numba kernel).

* Closed forms: equal keys give weights 1/n and entropy log n; two keys by
  hand; one-hot and single-key rows have entropy 0 and support 1; fully
  masked rows give 0 everywhere.
* Invariants on random masked problems: 0 <= H <= log n_i, 1 <= exp(H) <= n_i,
  max weight <= top-k mass <= 1, relevant + irrelevant = 1.
* An independent formulation: plain loops over one query row with math.exp
  and -Σ p log p, written from the spec, against attention_diagnostics; and
  the entropy from logits (D4) against the entropy from weights (D4').
* The Numba kernel against the reference:
  - float64 inputs: normwise relative error at most 1e-10 (the conformance
    tolerance for float64; we observe ~1e-15).
  - float32, float16 and bfloat16 inputs (the kernel computes in float32):
    at most 2e-5 normwise. The logits carry errors of a few float32
    roundings of |z| (a dot product of D <= 59 terms; |z| reaches ~30 in
    "large_logits"), up to ~1e-5 absolute; the entropy moves by
    Σ_j P_j |z_j − E z| |δz_j| (|∂H/∂z_j| = P_j |z_j − E z|), a mass by
    Σ_j P_j |δz_j|, and the running sums over <= 130 keys add a few roundings
    more. We observe at most 2.4e-6 (in "large_logits"; ~3e-7 elsewhere).
    2e-5 leaves a margin of ~8x without letting an algorithmic error (a
    lost rescale, a mis-centred sum, a missed tile: errors of 1e-3 and more)
    through.
* Bad input: SpecError naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from refattn import SpecError
from refattn.dilution.diagnostics import (
    attention_diagnostics,
    diagnostics_from_weights,
    logit_diagnostics,
)

FLOAT64_TOL = 1e-10
FLOAT32_TOL = 2e-5
FIELDS = (
    "entropy",
    "normalized_entropy",
    "effective_support",
    "max_weight",
    "top_k_mass",
    "relevant_mass",
    "irrelevant_mass",
)


def normwise(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and not np.any(np.isnan(got))
    scale = np.max(np.abs(want))
    return float(np.max(np.abs(got - want)) / (scale if scale > 0 else 1.0))


def problem(seed, b, hq, hkv, nq, nk, d, *, spread=1.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = (spread * rng.standard_normal((b, hq, nq, d))).astype(dtype)
    k = rng.standard_normal((b, hkv, nk, d)).astype(dtype)
    return rng, q, k


# name: ((B, Hq, Hkv, Nq, Nk, D), params or rng -> params)
SHAPE = (2, 4, 2, 67, 130, 59)
CASES = {
    "plain": (SHAPE, {}),
    "n1": ((1, 2, 1, 1, 1, 8), {}),
    "decode_causal": ((1, 2, 1, 1, 130, 16), {"causal": True}),
    "causal_nq_gt_nk": ((1, 2, 1, 130, 67, 16), {"causal": True}),  # the first 63 rows are fully masked
    "causal_top_left": (SHAPE, {"causal": True, "causal_alignment": "top_left"}),
    "window": (SHAPE, {"window": (20, 5)}),
    "softcap_bias": (SHAPE, lambda rng: {"softcap": 3.0, "scale": 1.0, "bias": rng.standard_normal((4, 67, 130))}),
    "padding_mask": (SHAPE, {"mask": np.arange(130)[None, None, None, :] < np.array([130, 77])[:, None, None, None]}),
    "random_mask_full_relevance": (
        SHAPE,
        lambda rng: {"mask": rng.random((67, 130)) < 0.8, "relevant": rng.random((2, 4, 67, 130)) < 0.2},
    ),
    "top_k_above_nk": ((1, 2, 2, 9, 5, 4), {"top_k": 7}),
    "large_logits": (SHAPE, {"scale": 1.0, "top_k": 1}),
}


def run_case(name, dtype=np.float64, backend="reference"):
    shape, params = CASES[name]
    rng, q, k = problem(0, *shape, dtype=dtype)
    params = dict(params(rng) if callable(params) else params)
    params.setdefault("relevant", rng.random((shape[0], 1, 1, shape[4])) < 0.25)  # per key: O(N) in the kernel
    params.setdefault("top_k", 5)
    return attention_diagnostics(q, k, backend=backend, **params), (q, k, params)


# --------------------------------------------------------------------------
# Closed forms.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 100, 1024])
def test_equal_keys_give_uniform_weights_and_entropy_log_n(n, backend):
    # q = 0: every logit is exactly 0, whatever the keys.
    rng = np.random.default_rng(n)
    q, k = np.zeros((1, 1, 3, 16)), rng.standard_normal((1, 1, n, 16))
    d = attention_diagnostics(q, k, top_k=4, backend=backend)
    assert np.all(d.entropy == np.log(n))  # exactly: (D4) is log of the exact sum n
    assert np.all(d.normalized_entropy == (1.0 if n >= 2 else 0.0))
    np.testing.assert_allclose(d.effective_support, n, rtol=1e-15)
    assert np.all(d.max_weight == 1.0 / n)
    np.testing.assert_allclose(d.top_k_mass, min(4, n) / n, rtol=1e-15)
    assert np.all(d.attended == n)


def test_uniform_weights_in_exact_arithmetic():
    for n in (1, 2, 4, 64, 1024, 65536):  # powers of two: 1/n is a float, exactly
        weights = np.full((1, n), 1.0 / n)
        assert Fraction(float(weights[0, 0])) == Fraction(1, n)
        d = diagnostics_from_weights(weights)
        assert abs(d.entropy[0] - math.log(n)) <= 4 * np.spacing(max(math.log(n), 1.0))
        assert d.max_weight[0] == Fraction(1, n)


@pytest.mark.parametrize("a, b", [(0.0, 0.0), (1.5, -0.25), (30.0, 0.0), (-700.0, 0.0)])
def test_two_keys_by_hand(a, b):
    p = 1.0 / (1.0 + math.exp(b - a))  # weight of the first key
    rest = 1.0 / (1.0 + math.exp(a - b))
    # H = log(1 + x) + d x / (1 + x) with d = |a − b|, x = e^{−d}: −Σ p log p without its cancellation.
    d = abs(a - b)
    entropy = math.log1p(math.exp(-d)) + d * math.exp(-d) / (1 + math.exp(-d))
    q, k = np.ones((1, 1, 1, 1)), np.array([a, b]).reshape(1, 1, 2, 1)
    relevant = np.array([[True, False]])
    for found in (
        logit_diagnostics(np.array([[a, b]]), top_k=1, relevant=relevant),
        attention_diagnostics(q, k, scale=1.0, top_k=1, relevant=relevant),
        attention_diagnostics(q, k, scale=1.0, top_k=1, relevant=relevant, backend="numba"),
    ):
        # Absolute accuracy in nats: (D4) takes lse − m, and lse = m + log l is rounded at the
        # scale of m, so a row this peaked (H ~ 1e-12 at a = 30) is known to a few ulps of |m|.
        atol = 4 * np.finfo(float).eps * max(abs(a), abs(b))
        np.testing.assert_allclose(found.entropy.ravel(), entropy, rtol=1e-13, atol=atol)
        np.testing.assert_allclose(found.normalized_entropy.ravel(), entropy / math.log(2), rtol=1e-13, atol=atol)
        np.testing.assert_allclose(found.effective_support.ravel(), math.exp(entropy), rtol=1e-13)
        np.testing.assert_allclose(found.max_weight.ravel(), max(p, rest), rtol=1e-14)
        np.testing.assert_allclose(found.top_k_mass.ravel(), max(p, rest), rtol=1e-14)
        np.testing.assert_allclose(found.relevant_mass.ravel(), p, rtol=1e-14, atol=1e-300)
        np.testing.assert_allclose(found.irrelevant_mass.ravel(), rest, rtol=1e-14)


def test_one_hot_and_single_key_rows_have_entropy_zero_and_support_one():
    weights = np.zeros((2, 3, 5))
    weights[0, :, 2] = 1.0  # one-hot rows over 5 keys
    weights[1, :, 0] = 1.0
    d = diagnostics_from_weights(weights, top_k=3)
    assert np.all(d.entropy == 0) and np.all(d.normalized_entropy == 0)
    assert np.all(d.effective_support == 1) and np.all(d.max_weight == 1) and np.all(d.top_k_mass == 1)
    assert np.all(d.attended == 5)
    # A single attended key (n_i = 1): normalised entropy is 0, not 0/0.
    logits = np.array([[0.3, -1.0, 2.0]])
    only_one = logit_diagnostics(logits, mask=np.array([[False, True, False]]))
    assert only_one.attended[0] == 1 and only_one.entropy[0] == 0 and only_one.normalized_entropy[0] == 0
    assert only_one.effective_support[0] == 1 and only_one.max_weight[0] == 1


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_fully_masked_rows_are_all_zero(backend):
    d, _ = run_case("causal_nq_gt_nk", backend=backend)
    empty = d.attended == 0
    assert empty[0, 0, :63].all() and not empty[0, 0, 63:].any()
    for field in FIELDS:
        assert np.all(getattr(d, field)[empty] == 0), field
    zero_rows = diagnostics_from_weights(np.zeros((2, 4)))
    assert np.all(zero_rows.attended == 0) and np.all(zero_rows.effective_support == 0)


# --------------------------------------------------------------------------
# Invariants.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("name", ["random_mask_full_relevance", "window", "softcap_bias", "large_logits"])
def test_invariants(name, backend):
    d, _ = run_case(name, backend=backend)
    n = d.attended
    has_key = n > 0
    assert np.all(d.entropy >= 0) and np.all(d.entropy <= np.log(np.maximum(n, 1)))
    assert np.all((d.normalized_entropy >= 0) & (d.normalized_entropy <= 1))
    assert np.all(d.effective_support[has_key] >= 1) and np.all(d.effective_support <= n)
    assert np.all(d.max_weight[has_key] >= 1 / n[has_key] * (1 - 1e-12))
    assert np.all(d.top_k_mass >= d.max_weight * (1 - 1e-12)) and np.all(d.top_k_mass <= 1 + 1e-12)
    np.testing.assert_allclose((d.relevant_mass + d.irrelevant_mass)[has_key], 1.0, atol=1e-12)


def test_top_k_mass_grows_with_k_to_one():
    rng = np.random.default_rng(3)
    logits = 3 * rng.standard_normal((4, 10, 50))
    masses = [logit_diagnostics(logits, top_k=k).top_k_mass for k in (1, 2, 5, 49, 50, 80)]
    for smaller, larger in zip(masses, masses[1:]):
        assert np.all(larger >= smaller)
    np.testing.assert_allclose(masses[-2], 1.0, rtol=1e-14)
    np.testing.assert_array_equal(masses[-1], masses[-2])


# --------------------------------------------------------------------------
# An independent formulation.
# --------------------------------------------------------------------------


def naive_diagnostics(q, k, *, mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
                      scale=None, softcap=0.0, top_k, relevant):  # fmt: skip
    """One row at a time with plain Python: logits, p = exp(z − max)/Σ, −Σ p log p."""
    b_size, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    full = (b_size, hq, nq, nk)
    mask = np.broadcast_to(mask, full) if mask is not None else np.ones(full, bool)
    bias = np.broadcast_to(bias, full) if bias is not None else np.zeros(full)
    relevant = np.broadcast_to(relevant, full)
    out = {name: np.zeros(full[:3]) for name in ("entropy", "max_weight", "top_k_mass", "relevant_mass", "attended")}
    for b in range(b_size):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(nq):
                pos = i + (nk - nq if causal_alignment == "bottom_right" else 0)
                logits = {}
                for j in range(nk):
                    left, right = window if window is not None else (None, None)
                    if not mask[b, h, i, j] or (causal and j > pos):
                        continue
                    if (left is not None and j < pos - left) or (right is not None and j > pos + right):
                        continue
                    s = scale * sum(float(q[b, h, i, t]) * float(k[b, g, j, t]) for t in range(d))
                    s = softcap * math.tanh(s / softcap) if softcap > 0 else s
                    logits[j] = s + float(bias[b, h, i, j])
                if not logits:
                    continue
                top = max(logits.values())
                total = sum(math.exp(s - top) for s in logits.values())
                p = {j: math.exp(s - top) / total for j, s in logits.items()}
                out["entropy"][b, h, i] = -sum(x * math.log(x) for x in p.values() if x > 0)
                out["max_weight"][b, h, i] = max(p.values())
                out["top_k_mass"][b, h, i] = sum(sorted(p.values())[-top_k:])
                out["relevant_mass"][b, h, i] = sum(x for j, x in p.items() if relevant[b, h, i, j])
                out["attended"][b, h, i] = len(p)
    return out


# Small problems, so that the loops stay quick: ((B, Hq, Hkv, Nq, Nk, D), rng -> params).
LOOP_CASES = {
    "mask_and_full_relevance": (
        (1, 4, 2, 12, 30, 8),
        lambda rng: {"mask": rng.random((12, 30)) < 0.7, "relevant": rng.random((1, 4, 12, 30)) < 0.3},
    ),
    "causal_nq_gt_nk": ((1, 2, 1, 20, 12, 8), lambda rng: {"causal": True}),
    "window_top_left": ((2, 2, 2, 12, 30, 8), lambda rng: {"window": (5, 2), "causal_alignment": "top_left"}),
    "softcap_bias": (
        (1, 4, 1, 12, 30, 8),
        lambda rng: {"softcap": 3.0, "scale": 1.0, "bias": rng.standard_normal((4, 12, 30))},
    ),
    "top_k_above_nk": ((1, 2, 2, 5, 4, 4), lambda rng: {"top_k": 7}),
}


@pytest.mark.parametrize("name", sorted(LOOP_CASES))
def test_agrees_with_a_loop_formulation(name):
    shape, params = LOOP_CASES[name]
    rng, q, k = problem(1, *shape, spread=2.0)
    params = {"top_k": 3, "relevant": rng.random((1, shape[4])) < 0.3, **params(rng)}
    want = naive_diagnostics(q, k, **params)
    for backend in ("reference", "numba"):
        got = attention_diagnostics(q, k, backend=backend, **params)
        for field in ("entropy", "max_weight", "top_k_mass", "relevant_mass"):
            np.testing.assert_allclose(getattr(got, field), want[field], rtol=1e-12, atol=1e-13, err_msg=field)
        np.testing.assert_array_equal(got.attended, want["attended"])


@pytest.mark.parametrize("name", ["random_mask_full_relevance", "softcap_bias", "causal_nq_gt_nk"])
def test_entropy_from_logits_equals_entropy_from_weights(name):
    from refattn import (
        dense_attention,  # the weights, recovered row by row from one-hot values
    )

    d, (q, k, params) = run_case(name)
    params = {key: value for key, value in params.items() if key not in ("relevant", "top_k")}
    nk = k.shape[2]
    values = np.broadcast_to(np.eye(nk), (k.shape[0], k.shape[1], nk, nk))
    weights = dense_attention(q, k, values, **params).out  # (B, Hq, Nq, Nk): row i of P
    from_weights = diagnostics_from_weights(weights)
    np.testing.assert_allclose(from_weights.entropy, d.entropy, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(from_weights.max_weight, d.max_weight, rtol=1e-12)


# --------------------------------------------------------------------------
# Numba against the reference.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_numba_matches_reference_float64(name):
    ref, _ = run_case(name)
    fast, _ = run_case(name, backend="numba")
    for field in FIELDS:
        assert getattr(fast, field).dtype == np.float64
        assert normwise(getattr(fast, field), getattr(ref, field)) <= FLOAT64_TOL, field
    np.testing.assert_array_equal(fast.attended, ref.attended)
    assert fast.top_k == ref.top_k


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize(
    "name", ["plain", "causal_nq_gt_nk", "window", "softcap_bias", "random_mask_full_relevance", "large_logits"]
)
def test_numba_matches_reference_in_lower_precision(name, dtype):
    # The reference on the same (rounded) inputs, in float64; the kernel computes in float32.
    ref, _ = run_case(name, dtype=dtype)
    fast, _ = run_case(name, dtype=dtype, backend="numba")
    for field in FIELDS:
        assert getattr(fast, field).dtype == np.float32
        assert normwise(getattr(fast, field), getattr(ref, field)) <= FLOAT32_TOL, field
    np.testing.assert_array_equal(fast.attended, ref.attended)


@pytest.mark.parametrize("dtype, tolerance", [(np.float64, FLOAT64_TOL), (np.float32, FLOAT32_TOL)])
def test_numba_streams_long_rows(dtype, tolerance):
    # 64 decoding queries over 65536 keys: the kernel holds a tile, never a row. In float32
    # the running sums add one tile's partial sum at a time, which keeps their rounding small.
    rng, q, k = problem(5, 1, 2, 1, 64, 65536, 16, dtype=dtype)
    relevant = rng.random((1, 65536)) < 0.01
    params = dict(causal=True, top_k=16, relevant=relevant, scale=1.0)
    ref = attention_diagnostics(q, k, **params)
    fast = attention_diagnostics(q, k, backend="numba", **params)
    for field in FIELDS:
        assert normwise(getattr(fast, field), getattr(ref, field)) <= tolerance, field
    assert np.all(fast.attended >= 65536 - 63)  # bottom-right causal: each row sees (nearly) every key


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


def _qk():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 4, 5, 8)), rng.standard_normal((2, 2, 7, 8))


def _with_nan(x):
    x = x.copy()
    x[0, 1, 2, 3] = np.nan
    return x


BAD_ATTENTION = {
    "relevant_shape": (dict(relevant=np.ones((5, 6), bool)), "relevant", "broadcastable to (2, 4, 5, 7)", "(5, 6)"),
    "relevant_one_dim": (dict(relevant=np.ones(7, bool)), "relevant", "2 to 4 dimensions", "(7,)"),
    "relevant_dtype": (dict(relevant=np.ones((1, 7))), "relevant", "dtype bool", "float64"),
    "top_k_zero": (dict(top_k=0), "top_k", "an int >= 1", "0"),
    "top_k_float": (dict(top_k=2.0), "top_k", "an int >= 1", "2.0"),
    "top_k_bool": (dict(top_k=True), "top_k", "an int >= 1", "True"),
    "mask_shape": (dict(mask=np.ones((3, 7), bool)), "mask", "broadcastable", "(3, 7)"),
    "backend": (dict(backend="cuda"), "backend", "one of ['reference', 'numba']", "'cuda'"),
    "softcap": (dict(softcap=-1.0), "softcap", "a finite number in [0.0", "-1.0"),
}


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("case", sorted(BAD_ATTENTION))
def test_attention_diagnostics_rejects(case, backend):
    kwargs, argument, expected, given = BAD_ATTENTION[case]
    kwargs = {"backend": backend, **kwargs}
    q, k = _qk()
    with pytest.raises(SpecError) as info:
        attention_diagnostics(q, k, **kwargs)
    assert info.value.argument == argument
    assert expected in info.value.expected and given in info.value.given


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_non_finite_inputs_are_rejected(backend):
    q, k = _qk()
    for name, args in (("q", (_with_nan(q), k)), ("k", (q, _with_nan(k)))):
        with pytest.raises(SpecError) as info:
            attention_diagnostics(*args, backend=backend)
        assert info.value.argument == name and "finite" in info.value.expected and "(0, 1, 2, 3)" in info.value.given


BAD_WEIGHTS = {
    "one_dim": (np.array([0.5, 0.5]), {}, "weights", "at least 2 dimensions", "(2,)"),
    "negative": (np.array([[1.5, -0.5]]), {}, "weights", "non-negative", "(0, 1)"),
    "not_normalised": (np.array([[0.5, 0.4]]), {}, "weights", "rows summing to 1", "0.9"),
    "logits_not_weights": (np.array([[2.0, -1.0, 0.3]]), {}, "weights", "non-negative", "-1.0"),
    "non_finite": (np.array([[np.nan, 1.0]]), {}, "weights", "finite values", "nan"),
    "mass_on_masked_key": (
        np.array([[0.5, 0.5]]),
        {"mask": np.array([[True, False]])},
        "weights",
        "0 on the keys",
        "(0, 1)",
    ),
    "empty_row_the_mask_allows": (
        np.zeros((1, 2)),
        {"mask": np.ones((1, 2), bool)},
        "weights",
        "mass on every row",
        "(0,)",
    ),
    "relevant_shape": (
        np.array([[0.5, 0.5]]),
        {"relevant": np.ones((1, 3), bool)},
        "relevant",
        "broadcastable",
        "(1, 3)",
    ),
    "top_k": (np.array([[0.5, 0.5]]), {"top_k": -2}, "top_k", "an int >= 1", "-2"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_diagnostics_from_weights_rejects(case):
    weights, kwargs, argument, expected, given = BAD_WEIGHTS[case]
    with pytest.raises(SpecError) as info:
        diagnostics_from_weights(weights, **kwargs)
    assert info.value.argument == argument
    assert expected in info.value.expected and given in info.value.given


def test_logit_diagnostics_rejects_non_finite_logits():
    with pytest.raises(SpecError) as info:
        logit_diagnostics(np.array([[0.0, -np.inf]]))
    assert info.value.argument == "logits" and "finite" in info.value.expected and "(0, 1)" in info.value.given
    with pytest.raises(SpecError) as info:
        logit_diagnostics(np.zeros((2, 3)), relevant=np.ones((3, 2), bool))
    assert info.value.argument == "relevant"


def test_row_sum_tolerance_follows_the_dtype():
    rough = np.array([[0.5, 0.4999]], dtype=np.float32)  # off by 1e-4: within float32's sqrt(eps) = 3.5e-4
    assert diagnostics_from_weights(rough).attended[0] == 2
    with pytest.raises(SpecError):
        diagnostics_from_weights(rough.astype(np.float64))  # float64 allows 1.5e-8
