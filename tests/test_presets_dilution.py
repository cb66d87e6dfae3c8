"""SSMax and log-n options against their sources (issue 14, item 6).

Transcribed here from the sources, independently of refattn's reference:
Qwen's ``use_logn_attn`` (QwenLM/Qwen-Audio 0b0e882, modeling_qwen.py,
``QWenAttention.__init__`` builds ``logn_list = [log(i, seq_length) if i >
seq_length else 1 for i in range(1, 32768)]``; ``QWenAttention.forward``
multiplies the query by ``logn_tensor[:, Nk - Nq : Nk]`` when not training),
and the ``ScalableSoftmax`` package (n = ``x.size(dim)``, the whole last axis).
"""

import math

import numpy as np

from refattn.dilution.logn.cases import cases as logn_cases
from refattn.dilution.logn.reference import logn_attention
from refattn.dilution.ssmax.cases import cases as ssmax_cases
from refattn.dilution.ssmax.reference import ssmax_attention


def _case(all_cases, case_id):
    case = next(c for c in all_cases if c.id == case_id)
    arrays = case.arrays(np.random.default_rng(case.seed))
    inputs = {name: arrays.pop(name) for name in ("q", "k", "v")}
    return inputs, {**case.params, **arrays}


def _dense_causal(q, k, v, logits_factor):
    """softmax(factor_i · q_i·k_j / sqrt(D)) under a bottom-right causal mask; factor (Nq,) per row."""
    nq, nk = q.shape[2], k.shape[2]
    scores = np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, q.shape[1] // k.shape[1], axis=1)) / math.sqrt(q.shape[3])
    scores = scores * logits_factor[:, None]
    scores = np.where(np.arange(nk)[None, :] <= np.arange(nq)[:, None] + nk - nq, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", weights, np.repeat(v, q.shape[1] // v.shape[1], axis=1))


def test_qwen_logn_is_qwens_rule():
    inputs, params = _case(logn_cases(), "logn/qwen_training_length")
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    length = params["training_length"]
    logn_list = [math.log(i, length) if i > length else 1 for i in range(1, 64)]
    nq, nk = q.shape[2], k.shape[2]
    factor = np.array(logn_list[nk - nq : nk])  # logn_tensor[:, seq_start:seq_end]
    want = _dense_causal(q, k, v, factor)
    got = logn_attention(q, k, v, causal=True, training_length=length).out
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    one_n = logn_attention(q, k, v, causal=True, n=length).out  # refattn before issue 14: one n for the call
    assert np.abs(one_n - want).max() > 0.05


def test_scalable_softmax_package_counts_the_whole_axis():
    inputs, params = _case(ssmax_cases(), "ssmax/axis_length_causal")
    q, k, v, s, s_bias = inputs["q"], inputs["k"], inputs["v"], params["s"], params["s_bias"]
    nk = k.shape[2]
    factor = s[:, None] * math.log(nk) + s_bias[:, None]  # (Hq, 1): s · log(x.size(dim)) + b, masked entries counted
    scaled_q = q * factor[None, :, :, None]  # (B, Hq, Nq, D)
    want = _dense_causal(scaled_q, k, v, np.ones(q.shape[2]))
    got = ssmax_attention(q, k, v, s=s, s_bias=s_bias, causal=True, n_rule="axis_length").out
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    attended = ssmax_attention(q, k, v, s=s, s_bias=s_bias, causal=True).out  # the canonical per-row n_i
    assert np.abs(attended - want).max() > 0.05


def test_chiang_cholak_scale_the_projection_input_not_q():
    """Chiang & Cholak multiply the input of the query projection by log n: with a bias that is not log n · q."""
    rng = np.random.default_rng(0)
    x, weight, bias = rng.standard_normal((5, 4)), rng.standard_normal((4, 4)), rng.standard_normal(4)
    log_n = math.log(5)
    scaled_input = (log_n * x) @ weight + bias
    assert np.allclose(scaled_input, log_n * (x @ weight + bias) - (log_n - 1) * bias)
    assert not np.allclose(scaled_input, log_n * (x @ weight + bias))
