"""The dense reference against closed forms and an independent loop formulation."""

import math

import numpy as np
import pytest

from refattn import dense_attention
from refattn.strategies import Shape, random_qkv

from .naive_dense import naive_dense

OPTION_SETS = {
    "plain": {},
    "causal_bottom_right": dict(causal=True),
    "causal_top_left": dict(causal=True, causal_alignment="top_left"),
    "window": dict(window=(2, 1)),
    "window_left_only_top_left": dict(window=(1, None), causal_alignment="top_left"),
    "causal_window": dict(causal=True, window=(3, 0)),
    "softcap": dict(softcap=0.7),
    "scale": dict(scale=2.5),
    "bias_full": "bias_full",
    "bias_broadcast": "bias_broadcast",
    "mask": "mask",
    "dropout": "dropout",
}


def _params(name, shape, rng):
    option = OPTION_SETS[name]
    if option == "bias_full":
        return dict(bias=rng.standard_normal(shape.scores))
    if option == "bias_broadcast":
        return dict(bias=rng.standard_normal((1, shape.q_heads, 1, shape.kv_len)))
    if option == "mask":
        mask = rng.random(shape.scores) < 0.6
        mask[:, :, 0] = False  # a fully masked row
        return dict(mask=mask)
    if option == "dropout":
        return dict(dropout_p=0.25, dropout_keep=rng.random(shape.scores) >= 0.25)
    return dict(option)


@pytest.mark.parametrize("option", list(OPTION_SETS))
@pytest.mark.parametrize("shape", [Shape(2, 4, 2, 5, 7, 3, 2), Shape(1, 3, 1, 6, 4, 5, 5), Shape(1, 2, 2, 1, 1, 2, 3)])
def test_matches_loop_formulation(option, shape):
    rng = np.random.default_rng(11)
    q, k, v = random_qkv(shape, seed=3, value_scale=1.5)
    params = _params(option, shape, rng)
    result = dense_attention(q, k, v, **params)
    out, lse = naive_dense(q, k, v, **params)
    np.testing.assert_allclose(result.out, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(result.lse), np.isinf(lse))
    np.testing.assert_allclose(result.lse, lse, rtol=1e-12, atol=1e-13)


def test_single_key_returns_its_value():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((1, 2, 1, 3)), rng.standard_normal((1, 2, 1, 5))
    result = dense_attention(q, k, v)
    np.testing.assert_array_equal(result.out, np.broadcast_to(v, (1, 2, 4, 5)))
    np.testing.assert_allclose(result.lse, np.einsum("bhqd,bhkd->bhq", q, k) / math.sqrt(3), rtol=1e-15)


def test_two_keys_is_a_sigmoid():
    # One query, two keys: p_0 = sigmoid(s_0 - s_1), with s = q.k / sqrt(D).
    q = np.array([1.0, 2.0]).reshape(1, 1, 1, 2)
    k = np.array([[0.5, -1.0], [2.0, 0.25]]).reshape(1, 1, 2, 2)
    v = np.array([[3.0], [-1.0]]).reshape(1, 1, 2, 1)
    s0, s1 = (0.5 - 2.0) / math.sqrt(2), (2.0 + 0.5) / math.sqrt(2)
    p0 = 1 / (1 + math.exp(s1 - s0))
    result = dense_attention(q, k, v)
    assert result.out[0, 0, 0, 0] == pytest.approx(3.0 * p0 - (1 - p0), rel=1e-14)
    assert result.lse[0, 0, 0] == pytest.approx(math.log(math.exp(s0) + math.exp(s1)), rel=1e-14)


def test_softcap_closed_form():
    # Softcap bounds every logit by c: with c = 1 and huge scores, both logits -> tanh(+-big) = +-1.
    q = np.ones((1, 1, 1, 1))
    k = np.array([50.0, -50.0]).reshape(1, 1, 2, 1)
    v = np.array([1.0, 0.0]).reshape(1, 1, 2, 1)
    result = dense_attention(q, k, v, softcap=1.0, scale=1.0)
    assert result.out[0, 0, 0, 0] == pytest.approx(math.exp(1) / (math.exp(1) + math.exp(-1)), rel=1e-14)


def test_softcap_is_applied_before_bias():
    # c tanh((s)/c) + b differs from c tanh((s + b)/c); with s = 0 the capped score is 0 and
    # the bias passes through unchanged: logits are exactly the bias.
    q, k = np.zeros((1, 1, 1, 2)), np.zeros((1, 1, 2, 2))
    v = np.array([1.0, 0.0]).reshape(1, 1, 2, 1)
    bias = np.array([[3.0, 0.0]])
    result = dense_attention(q, k, v, softcap=1.0, bias=bias)
    assert result.out[0, 0, 0, 0] == pytest.approx(1 / (1 + math.exp(-3.0)), rel=1e-14)


def test_bottom_right_masks_leading_rows_when_queries_outnumber_keys():
    # Nq = 4 > Nk = 2: aligned positions are i - 2, so rows 0 and 1 see no key.
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((1, 1, 4, 3)), rng.standard_normal((1, 1, 2, 3)), rng.standard_normal((1, 1, 2, 3))
    result = dense_attention(q, k, v, causal=True)
    assert np.all(result.out[0, 0, :2] == 0) and np.all(result.lse[0, 0, :2] == -np.inf)
    np.testing.assert_array_equal(result.out[0, 0, 2], v[0, 0, 0])  # row 2 sees key 0 only


def test_window_wider_than_sequence_is_no_window():
    q, k, v = random_qkv(Shape(1, 2, 2, 5, 6, 4, 4), seed=9)
    wide = dense_attention(q, k, v, window=(100, 100))
    plain = dense_attention(q, k, v)
    np.testing.assert_array_equal(wide.out, plain.out)


def test_precision_emulation_error_is_of_the_expected_order():
    q, k, v = random_qkv(Shape(1, 2, 2, 16, 16, 8, 8), seed=4)
    exact = dense_attention(q, k, v).out
    for precision, unit in [("float32", 2**-24), ("float16", 2**-11), ("bfloat16", 2**-8)]:
        err = np.max(np.abs(dense_attention(q, k, v, precision=precision).out - exact)) / np.max(np.abs(exact))
        assert unit / 4 < err < 64 * unit, (precision, err)
