"""The Compressive Transformer: against a transcription of Algorithm 1 for every f_c, c = 1 mean pooling
equals plain memory, the stop-gradient VJP, the reconstruction loss and its VJP, Numba, bad input."""

import numpy as np
import pytest

from refattn import SpecError, dense_attention
from refattn.memory import (
    attention_reconstruction_loss,
    attention_reconstruction_loss_vjp,
    compressive_attention,
    compressive_attention_vjp,
    compressive_step,
)
from refattn.memory.compressive import properties
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences

f = compressive_attention


def _qkv(hq=2, hkv=1, n=16, d=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, hq, n, d)), rng.standard_normal((1, hkv, n, d)), rng.standard_normal((1, hkv, n, d))


def _f_c(x, rule, c, weight=None, dilation=1, usage=None):
    """f_c on (n, F) entries of one head, written per compressed entry."""
    n = x.shape[0]
    out = []
    for t in range(n // c):
        run = x[t * c:(t + 1) * c]
        if rule == "max_pool":
            out.append(run.max(axis=0))
        elif rule == "mean_pool":
            out.append(run.mean(axis=0))
        else:
            out.append(sum(weight[:, :, a] @ run[a * dilation] for a in range(c // dilation)))
    if rule == "most_used":
        keep = sorted(sorted(range(n), key=lambda i: (-usage[i], i))[: n // c])
        return x[keep]
    return np.array(out).reshape(-1, x.shape[1])


def _transcription(q, k, v, L, M, P, c, rule, weights=(None, None), dilation=1):
    """Algorithm 1 for B = 1 and one kv head: attend over [cm, m, h], push h, evict, compress, truncate."""
    mem_k, mem_v, cm_k, cm_v = (np.zeros((0, q.shape[3])) for _ in range(4))
    usage = np.zeros(0)
    outs = []
    for s in range(0, q.shape[2], L):
        keys = np.concatenate([cm_k, mem_k, k[0, 0, s:s + L]])
        values = np.concatenate([cm_v, mem_v, v[0, 0, s:s + L]])
        result = dense_attention(q[:, :, s:s + L], keys[None, None], values[None, None], causal=True)
        outs.append(result.out)
        weights_now = np.exp(np.einsum("hnd,kd->hnk", q[0, :, s:s + L], keys) / np.sqrt(q.shape[3])
                             - result.lse[0][..., None])  # fmt: skip
        weights_now = np.where(np.tril(np.ones(weights_now.shape[1:]), keys.shape[0] - L) > 0, weights_now, 0.0)
        received = weights_now.sum(axis=(0, 1))[cm_k.shape[0]:]
        usage = received + np.pad(usage, (0, received.shape[0] - usage.shape[0]))
        mem_k, mem_v = np.concatenate([mem_k, k[0, 0, s:s + L]]), np.concatenate([mem_v, v[0, 0, s:s + L]])
        evict = max(0, mem_k.shape[0] - M)
        if evict:
            cm_k = np.concatenate([cm_k, _f_c(mem_k[:evict], rule, c, weights[0], dilation, usage[:evict])])[-P:]
            cm_v = np.concatenate([cm_v, _f_c(mem_v[:evict], rule, c, weights[1], dilation, usage[:evict])])[-P:]
        mem_k, mem_v, usage = mem_k[evict:], mem_v[evict:], usage[evict:]
    return np.concatenate(outs, axis=2), cm_k


@pytest.mark.parametrize("rule, c, dilation", [("max_pool", 2, 1), ("mean_pool", 4, 1), ("conv", 2, 1),
                                               ("dilated_conv", 4, 2), ("most_used", 2, 1)])  # fmt: skip
def test_against_a_transcription_of_algorithm_1(rule, c, dilation):
    q, k, v = _qkv()
    rng = np.random.default_rng(1)
    weights = (rng.standard_normal((4, 4, c // dilation)), rng.standard_normal((4, 4, c // dilation)))
    conv = dict(conv_weight_k=weights[0], conv_weight_v=weights[1]) if "conv" in rule else {}
    got = f(q, k, v, segment_len=4, mem_len=4, compressed_len=3, rate=c, compression=rule, dilation=dilation, **conv)
    want, compressed_k = _transcription(q, k, v, 4, 4, 3, c, rule, weights, dilation)
    np.testing.assert_allclose(got.out, want, atol=1e-12)
    np.testing.assert_allclose(got.aux["compressed_k"][0, 0], compressed_k, atol=1e-12)


def test_rate_one_mean_pooling_is_plain_memory_and_state_carries_over():
    q, k, v = _qkv(hkv=2)
    properties.rate_one_mean_is_plain_memory(f, q, k, v, 3, 4, 5)
    params = dict(segment_len=4, mem_len=4, compressed_len=2, rate=2, compression="most_used")
    properties.state_carries_over(f, q, k, v, 8, params, ("memory_k", "memory_v", "compressed_k", "compressed_v",
                                                          "memory_usage"))  # fmt: skip
    state, _ = compressive_step(None, q[:, :, :4], k[:, :, :4], v[:, :, :4], mem_len=4, compressed_len=2, rate=2)
    assert state["compressed_k"].shape[2] == 0


def test_vjp_of_one_step_with_both_memories_matches_finite_differences():
    q, k, v = _qkv(hq=2, hkv=1, n=4, d=3, seed=2)
    rng = np.random.default_rng(3)
    params = dict(segment_len=4, mem_len=4, compressed_len=2, rate=2,
                  **{name: rng.standard_normal((1, 1, size, 3)) for name, size in
                     (("memory_k", 4), ("memory_v", 4), ("compressed_k", 2), ("compressed_v", 2))})  # fmt: skip
    dout, dlse = rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((1, 2, 4))
    grads = compressive_attention_vjp(dout, q, k, v, dlse=dlse, **params)
    for name in ("q", "k", "v"):
        want = finite_differences(f, dict(q=q, k=k, v=v), params, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, atol=1e-7)


@pytest.mark.parametrize("rule, dilation", [("conv", 1), ("dilated_conv", 2)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reconstruction_loss_and_its_vjp(rule, dilation, reduction):
    q, k, v = _qkv(hq=2, hkv=2, n=8, d=3, seed=4)
    rng = np.random.default_rng(5)
    weights = dict(conv_weight_k=rng.standard_normal((3, 3, 4 // dilation)),
                   conv_weight_v=rng.standard_normal((3, 3, 4 // dilation)))  # fmt: skip
    params = dict(rate=4, compression=rule, dilation=dilation, reduction=reduction)
    loss = attention_reconstruction_loss(q[:, :, :5], k, v, **weights, **params)
    # Written out: attention over the 8 entries against attention over their 2 compressed ones.
    squeezed = lambda x, w: np.stack([sum(np.einsum("gf,bhf->bhg", w[:, :, a], x[:, :, t * 4 + a * dilation])  # noqa: E731
                                          for a in range(4 // dilation)) for t in range(2)], axis=2)  # fmt: skip
    diff = dense_attention(q[:, :, :5], k, v).out - dense_attention(
        q[:, :, :5], squeezed(k, weights["conv_weight_k"]), squeezed(v, weights["conv_weight_v"])).out
    np.testing.assert_allclose(loss, np.sum(diff**2) / (diff.size if reduction == "mean" else 1), rtol=1e-12)
    grads = attention_reconstruction_loss_vjp(0.7, q[:, :, :5], k, v, **weights, **params)
    for name in weights:
        step = 1e-6
        want = np.zeros_like(weights[name])
        for index in np.ndindex(want.shape):
            plus, minus = ({**weights, name: weights[name].copy()} for _ in range(2))
            plus[name][index] += step
            minus[name][index] -= step
            want[index] = 0.7 * (attention_reconstruction_loss(q[:, :, :5], k, v, **plus, **params)
                                 - attention_reconstruction_loss(q[:, :, :5], k, v, **minus, **params)) / (2 * step)
        np.testing.assert_allclose(grads[name], want, atol=1e-7)
    assert attention_reconstruction_loss_vjp(1.0, q, k, v, rate=2, compression="mean_pool") == {}


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("rule", ["mean_pool", "most_used"])
def test_numba_agrees_with_the_reference(precision, rule):
    q, k, v = _qkv(hq=4, hkv=2, n=40, d=16)
    params = dict(segment_len=8, mem_len=8, compressed_len=6, rate=4, compression=rule)
    check_numba_agreement(f, compressive_attention_vjp, q, k, v, params, precision, seed=1)


@pytest.mark.parametrize("bad, argument", [
    (dict(rate=0), "rate"),
    (dict(rate=-2), "rate"),
    (dict(rate=3), "rate"),  # does not divide the evicted blocks of 4
    (dict(compression="sum_pool"), "compression"),
    (dict(compression="conv"), "conv_weight_k"),
    (dict(compression="dilated_conv", dilation=3, conv_weight_k=np.zeros((4, 4, 1)),
          conv_weight_v=np.zeros((4, 4, 1))), "dilation"),
    (dict(conv_weight_k=np.zeros((4, 4, 2))), "conv_weight_k"),  # no weights for pooling
    (dict(memory_k=np.zeros((1, 1, 5, 4)), memory_v=np.zeros((1, 1, 5, 4))), "memory_k"),  # longer than mem_len
    (dict(compressed_k=np.zeros((1, 1, 4, 4)), compressed_v=np.zeros((1, 1, 4, 4))), "compressed_k"),
    (dict(memory_usage=np.zeros((1, 1, 0))), "memory_usage"),  # only for most_used
    (dict(compression="most_used", memory_k=np.zeros((1, 1, 2, 4)), memory_v=np.zeros((1, 1, 2, 4))),
     "memory_usage"),
])  # fmt: skip
def test_bad_input(bad, argument):
    q, k, v = _qkv()
    with pytest.raises(SpecError) as error:
        f(q, k, v, **{**dict(segment_len=4, mem_len=4, compressed_len=3, rate=2), **bad})
    assert error.value.argument == argument


def test_reconstruction_loss_bad_rate():
    q, k, v = _qkv(n=6)
    with pytest.raises(SpecError) as error:
        attention_reconstruction_loss(q, k, v, rate=4, compression="mean_pool")
    assert error.value.argument == "rate"
