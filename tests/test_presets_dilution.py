"""SSMax and log-n options against their sources (issue 14, item 6).

Transcribed here from the sources, independently of refattn's reference:
Qwen's ``use_logn_attn`` (QwenLM/Qwen-Audio 0b0e882, modeling_qwen.py,
``QWenAttention.__init__`` builds ``logn_list = [log(i, seq_length) if i >
seq_length else 1 for i in range(1, 32768)]``; ``QWenAttention.forward``
multiplies the query by ``logn_tensor[:, Nk - Nq : Nk]`` when not training),
and the ``ScalableSoftmax`` package (gdevos010/Scalable-Softmax 108e969, src/scalable_softmax.py,
``ScalableSoftmax.forward``: n = ``x.size(dim)``, the whole last axis; s and b held as float32 tensors).
"""

import math

import numpy as np
import pytest

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


def _scalable_softmax(x, s, b=None, dim=-1):
    """ScalableSoftmax.forward (gdevos010/Scalable-Softmax 108e969, src/scalable_softmax.py): s and b are float32
    tensors, cast to x's dtype; n = x.size(dim), the whole axis, masked (-inf) entries counted."""
    torch = pytest.importorskip("torch")
    scale = torch.tensor(s, dtype=torch.float32).to(x.dtype) * math.log(x.size(dim))
    if b is not None:
        scale = scale + torch.tensor(b, dtype=torch.float32).to(x.dtype)
    return torch.nn.functional.softmax(x * scale, dim=dim)


def test_scalable_softmax_package_counts_the_whole_axis():
    """The package's own forward, applied to the causal scaled scores, reproduces ssmax/axis_length_causal."""
    torch = pytest.importorskip("torch")
    inputs, params = _case(ssmax_cases(), "ssmax/axis_length_causal")
    q, k, v = (torch.from_numpy(inputs[name]) for name in ("q", "k", "v"))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    weights = _scalable_softmax(scores.masked_fill(~causal, -math.inf), 0.43)  # the package's default s
    want = (weights @ v).numpy()
    got = ssmax_attention(**inputs, **params).out
    assert params["s"] == float(torch.tensor(0.43, dtype=torch.float32)) and "s_bias" not in params
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    attended = ssmax_attention(**inputs, **{**params, "n_rule": "attended"}).out  # the canonical per-row n_i
    assert np.abs(attended - want).max() > 0.05


def test_chiang_cholak_scale_the_projection_input_not_q():
    """Chiang & Cholak multiply the input of the query projection by log n: with a bias that is not log n · q."""
    rng = np.random.default_rng(0)
    x, weight, bias = rng.standard_normal((5, 4)), rng.standard_normal((4, 4)), rng.standard_normal(4)
    log_n = math.log(5)
    scaled_input = (log_n * x) @ weight + bias
    assert np.allclose(scaled_input, log_n * (x @ weight + bias) - (log_n - 1) * bias)
    assert not np.allclose(scaled_input, log_n * (x @ weight + bias))
