"""core/: masked softmax, log-sum-exp, merge, masks, precision emulation.

Expected values are closed forms worked by hand or computed by plain Python
(math.exp over lists), not by the functions under test.
"""

import math

import numpy as np
import pytest

from refattn import SpecError, merge
from refattn.core.masks import position_mask, query_offset
from refattn.core.precision import numerics
from refattn.core.shapes import repeat_kv_heads, sum_kv_heads, sum_to_shape
from refattn.core.softmax import logsumexp, masked_softmax


def test_softmax_matches_plain_python():
    row = [0.3, -1.2, 2.5, 0.0]
    allowed = [True, False, True, True]
    total = sum(math.exp(s) for s, a in zip(row, allowed) if a)
    want = [math.exp(s) / total if a else 0.0 for s, a in zip(row, allowed)]
    weights, lse = masked_softmax(np.array([row]), np.array([allowed]))
    np.testing.assert_allclose(weights[0], want, rtol=1e-15, atol=0)
    assert lse[0] == pytest.approx(math.log(total), rel=1e-15)


def test_softmax_large_logits_do_not_overflow():
    # exp(1000) overflows float64; the shifted form must not. The logit
    # 1000 - log 3 is itself rounded to the ulp of 1000 (1.1e-13), hence rtol.
    weights, lse = masked_softmax(np.array([[1000.0, 1000.0 - math.log(3.0)]]), None)
    np.testing.assert_allclose(weights[0], [0.75, 0.25], rtol=1e-12)
    assert lse[0] == pytest.approx(1000.0 + math.log(4.0 / 3.0), rel=1e-15)


def test_fully_masked_row_is_zero_and_minus_inf():
    weights, lse = masked_softmax(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[False, False], [True, False]]))
    assert np.all(weights[0] == 0) and lse[0] == -np.inf
    np.testing.assert_array_equal(weights[1], [1.0, 0.0])
    assert lse[1] == 3.0


def test_logsumexp_all_minus_inf():
    assert logsumexp(np.array([-np.inf, -np.inf])) == -np.inf
    assert logsumexp(np.array([0.0, 0.0])) == pytest.approx(math.log(2.0), rel=1e-15)


def test_merge_two_halves_by_hand():
    # Two single-key partials: out_r = v_r, lse_r = s_r. Merged weights are softmax(s).
    s = np.array([0.5, -0.25])
    v = np.array([[1.0, 2.0], [-3.0, 4.0]])
    out, lse = merge([(v[0][None], s[:1]), (v[1][None], s[1:])])
    p0 = 1.0 / (1.0 + math.exp(s[1] - s[0]))
    np.testing.assert_allclose(out[0], p0 * v[0] + (1 - p0) * v[1], rtol=1e-15)
    assert lse[0] == pytest.approx(math.log(math.exp(0.5) + math.exp(-0.25)), rel=1e-15)


def test_merge_with_empty_partials():
    out, lse = merge([(np.array([[5.0]]), np.array([-np.inf])), (np.array([[2.0]]), np.array([1.5]))])
    assert out[0, 0] == 2.0 and lse[0] == 1.5
    out, lse = merge([(np.zeros((1, 1)), np.array([-np.inf]))] * 2)
    assert out[0, 0] == 0.0 and lse[0] == -np.inf


def test_merge_rejects_nothing_and_nan():
    with pytest.raises(SpecError, match="partials"):
        merge([])
    with pytest.raises(SpecError, match="lse"):
        merge([(np.zeros((1, 1)), np.array([np.nan]))])


def test_causal_alignment_worked_example():
    # spec/README.md: Nq = 2, Nk = 4.
    bottom_right = [[1, 1, 1, 0], [1, 1, 1, 1]]
    top_left = [[1, 0, 0, 0], [1, 1, 0, 0]]
    got = position_mask(2, 4, causal=True, window=None, alignment="bottom_right")
    np.testing.assert_array_equal(got, np.array(bottom_right, bool))
    got = position_mask(2, 4, causal=True, window=None, alignment="top_left")
    np.testing.assert_array_equal(got, np.array(top_left, bool))
    assert query_offset(2, 4, "bottom_right") == 2 and query_offset(2, 4, "top_left") == 0


def test_window_by_hand():
    # Nq = Nk = 5, window (1, 2): key j allowed iff i - 1 <= j <= i + 2.
    want = np.array([[0 <= j - i + 1 <= 3 for j in range(5)] for i in range(5)])
    np.testing.assert_array_equal(position_mask(5, 5, causal=False, window=(1, 2), alignment="bottom_right"), want)
    left_only = position_mask(3, 3, causal=False, window=(0, None), alignment="top_left")
    np.testing.assert_array_equal(left_only, np.triu(np.ones((3, 3), bool)))
    assert position_mask(3, 3, causal=False, window=None, alignment="top_left") is None


def test_gqa_head_map_is_interleaved():
    kv = np.arange(2).reshape(1, 2, 1, 1).astype(float)  # kv head g holds value g
    repeated = repeat_kv_heads(kv, 4)[0, :, 0, 0]
    np.testing.assert_array_equal(repeated, [0, 0, 0, 0, 1, 1, 1, 1])  # h // 4, not h % 2
    np.testing.assert_array_equal(sum_kv_heads(np.ones((1, 8, 1, 1)), 4)[0, :, 0, 0], [4, 4])


def test_sum_to_shape_is_adjoint_of_broadcast():
    rng = np.random.default_rng(0)
    small, big = rng.standard_normal((1, 3, 1, 4)), rng.standard_normal((2, 3, 5, 4))
    # <broadcast(small), big> == <small, sum_to_shape(big)>
    lhs = np.sum(np.broadcast_to(small, big.shape) * big)
    rhs = np.sum(small * sum_to_shape(big, small.shape))
    assert lhs == pytest.approx(rhs, rel=1e-13)
    assert sum_to_shape(big, (5, 4)).shape == (5, 4)


@pytest.mark.parametrize("name, eps", [("float32", 2**-24), ("float16", 2**-11), ("bfloat16", 2**-8)])
def test_precision_rounds_to_unit_roundoff(name, eps):
    num = numerics(name)
    x = np.random.default_rng(1).uniform(1, 2, 1000)
    rel = np.abs(num.load(x).astype(np.float64) - x) / x
    assert rel.max() <= eps and rel.max() > eps / 8  # rounding really happens, at that precision


def test_precision_rejects_unknown():
    with pytest.raises(SpecError, match="precision"):
        numerics("float8")
