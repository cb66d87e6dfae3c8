"""Nyströmformer: the paper's formula by hand, full landmarks, presets, finite differences, the kernel, bad input."""

from functools import partial

import numpy as np
import pytest

from refattn import SpecError, dense_attention
from refattn.lowrank import nystrom_attention, nystrom_attention_vjp
from refattn.lowrank.nystrom.properties import full_landmarks_equal_dense
from tests.finite_differences import finite_differences


def _qkv(seed, b=2, h=2, n=12, d=4, dv=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _by_hand(q, k, v, m, iterations, per_matrix=True):
    """Eqs. (14)-(16) written out per (b, h) with plain loops."""
    out = np.zeros(q.shape[:3] + v.shape[3:])
    d = q.shape[-1]
    z0_scale = {}
    for b, h in np.ndindex(q.shape[:2]):
        ql, kl = q[b, h].reshape(m, -1, d).mean(1), k[b, h].reshape(m, -1, d).mean(1)
        a = _softmax(ql @ kl.T / np.sqrt(d))
        z0_scale[b, h] = (a, np.abs(a).sum(0).max() * np.abs(a).sum(1).max())
    coupled = max(s for _, s in z0_scale.values())
    for b, h in np.ndindex(q.shape[:2]):
        ql, kl = q[b, h].reshape(m, -1, d).mean(1), k[b, h].reshape(m, -1, d).mean(1)
        a, own = z0_scale[b, h]
        z = a.T / (own if per_matrix else coupled)
        for _ in range(iterations):
            az = a @ z
            z = 0.25 * z @ (13 * np.eye(m) - az @ (15 * np.eye(m) - az @ (7 * np.eye(m) - az)))
        out[b, h] = _softmax(q[b, h] @ kl.T / np.sqrt(d)) @ z @ (_softmax(ql @ k[b, h].T / np.sqrt(d)) @ v[b, h])
    return out


@pytest.mark.parametrize("iterations", [1, 6])
def test_matches_the_formula_by_hand(iterations):
    q, k, v = _qkv(0)
    got = nystrom_attention(q, k, v, num_landmarks=4, pinv_iterations=iterations).out
    np.testing.assert_allclose(got, _by_hand(q, k, v, 4, iterations), rtol=1e-11, atol=1e-12)


def test_batch_global_init_couples_batch_items_and_per_matrix_does_not():
    q, k, v = _qkv(1)
    coupled = nystrom_attention(q, k, v, num_landmarks=4, pinv_init="batch_global").out
    np.testing.assert_allclose(coupled, _by_hand(q, k, v, 4, 6, per_matrix=False), rtol=1e-11, atol=1e-12)
    k2 = k.copy()
    k2[1] *= 3.0  # change batch item 1 only
    for init, moves in (("per_matrix", False), ("batch_global", True)):
        before = nystrom_attention(q, k, v, num_landmarks=4, pinv_init=init).out[0]
        after = nystrom_attention(q, k2, v, num_landmarks=4, pinv_init=init).out[0]
        assert (np.abs(after - before).max() > 1e-6) == moves


def test_full_landmarks_and_enough_iterations_equal_dense_attention():
    """m = N: k₁ = k₂ = k₃ = P, and k₁ Z k₃ = P P⁻¹ P = P once Z has converged to P⁻¹ (P invertible here)."""
    q, k, v = _qkv(2, n=6, d=8)
    full_landmarks_equal_dense(nystrom_attention, q, k, v, dict(num_landmarks=6, pinv_iterations=40))
    full_landmarks_equal_dense(partial(nystrom_attention, backend="numba"), q, k, v, dict(num_landmarks=6, pinv_iterations=40))
    with pytest.raises(AssertionError):  # one iteration is far from the inverse
        full_landmarks_equal_dense(nystrom_attention, q, k, v, dict(num_landmarks=6, pinv_iterations=1))


def test_front_padding_prepends_zero_tokens():
    """lucidrains' padding equals the canonical form on an explicitly zero-padded input, padded rows dropped."""
    q, k, v = _qkv(3, n=10)
    zero = lambda x: np.pad(x, ((0, 0), (0, 0), (2, 0), (0, 0)))  # noqa: E731
    want = nystrom_attention(zero(q), zero(k), zero(v), num_landmarks=4).out[:, :, 2:]
    got = nystrom_attention(q, k, v, num_landmarks=4, padding="front").out
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_conv_adds_a_centred_depthwise_convolution():
    q, k, v = _qkv(4)
    kernel = np.random.default_rng(5).standard_normal((2, 3))
    added = nystrom_attention(q, k, v, num_landmarks=3, conv_kernel=kernel).out - nystrom_attention(q, k, v, num_landmarks=3).out
    padded = np.pad(v, ((0, 0), (0, 0), (1, 1), (0, 0)))
    want = sum(kernel[None, :, t, None, None] * padded[:, :, t : t + 12] for t in range(3))
    np.testing.assert_allclose(added, want, rtol=1e-12, atol=1e-13)


def test_hf_shortcut_at_full_landmarks_is_dense():
    q, k, v = _qkv(6, n=6)
    np.testing.assert_allclose(nystrom_attention(q, k, v, num_landmarks=6, preset="hf").out, dense_attention(q, k, v).out, rtol=1e-13)


PARAMS = [
    dict(num_landmarks=3),
    dict(num_landmarks=4, preset="lucidrains", pinv_iterations=2),
    dict(num_landmarks=3, key_padding_mask=np.array([[1] * 6, [1, 1, 0, 0, 0, 0]], bool)),
    dict(num_landmarks=3, preset="hf", key_padding_mask=np.array([[1] * 6, [1, 1, 0, 0, 1, 0]], bool)),
    dict(num_landmarks=6, preset="hf"),
]


@pytest.mark.parametrize("params", PARAMS)
def test_vjp_matches_finite_differences(params):
    q, k, v = _qkv(7, n=6, d=3, dv=2)
    arrays = dict(q=q, k=k, v=v, conv_kernel=np.random.default_rng(8).standard_normal((2, 3)))
    dout = np.random.default_rng(9).standard_normal((2, 2, 6, 2))
    grads = nystrom_attention_vjp(dout, **arrays, **params)
    for name in arrays:
        want = finite_differences(nystrom_attention, arrays, params, dout, None, name)
        np.testing.assert_allclose(grads[name], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", [None, "lucidrains"])
def test_numba_agrees_at_a_longer_length(preset):
    n = 70 if preset == "lucidrains" else 72  # lucidrains pads 70 to 72
    q, k, v = _qkv(10, n=n, d=16, dv=8)
    params = dict(num_landmarks=8, preset=preset, conv_kernel=np.random.default_rng(11).standard_normal((2, 5)) / 5,
                  key_padding_mask=np.arange(n)[None] < np.array([[n], [45]]))  # fmt: skip
    dout = np.random.default_rng(12).standard_normal((2, 2, n, 8))
    np.testing.assert_allclose(nystrom_attention(q, k, v, **params, backend="numba").out, nystrom_attention(q, k, v, **params).out,
                               rtol=1e-10, atol=1e-10)  # fmt: skip
    fast, ref = (nystrom_attention_vjp(dout, q, k, v, **params, backend=b) for b in ("numba", "reference"))
    for name in ref:
        np.testing.assert_allclose(fast[name], ref[name], rtol=1e-9, atol=1e-9 * np.abs(ref[name]).max())


@pytest.mark.parametrize(
    "params, argument",
    [
        (dict(num_landmarks=5), "num_landmarks"),  # 5 does not divide 12, no padding option
        (dict(num_landmarks=4, pinv_iterations=0), "pinv_iterations"),
        (dict(num_landmarks=4, conv_kernel=np.ones((2, 4))), "conv_kernel"),  # even width
        (dict(num_landmarks=4, preset="fairseq"), "preset"),
        (dict(num_landmarks=4, pinv_init="exact"), "pinv_init"),
        (dict(num_landmarks=4, key_padding_mask=np.ones((2, 12))), "key_padding_mask"),
    ],
)
def test_bad_input(params, argument):
    q, k, v = _qkv(13)
    with pytest.raises(SpecError, match=f"argument `{argument}`"):
        nystrom_attention(q, k, v, **params)


def test_cross_attention_is_refused():
    q, k, v = _qkv(14)
    with pytest.raises(SpecError, match="argument `k`"):
        nystrom_attention(q, k[:, :, :6], v[:, :, :6], num_landmarks=3)
