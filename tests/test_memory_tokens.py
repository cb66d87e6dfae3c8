"""Memory tokens (RMT): against a transcription of the wrapped segment, both position conventions and both
masks, the VJP, the Numba backend, bad input."""

import numpy as np
import pytest

from refattn import SpecError, dense_attention
from refattn.memory import memory_token_attention, memory_token_attention_vjp, memory_token_step
from refattn.memory.memory_tokens import properties
from refattn.position.rope import apply_rope
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences

f = memory_token_attention


def _problem(hq=2, hkv=2, n=8, d=4, m=2, seed=0):
    rng = np.random.default_rng(seed)
    e = hq * d
    q, k, v = (rng.standard_normal((1, h, n, d)) for h in (hq, hkv, hkv))
    params = dict(memory=rng.standard_normal((1, m, e)), w_q=0.3 * rng.standard_normal((e, hq, d)),
                  w_k=0.3 * rng.standard_normal((e, hkv, d)), w_v=0.3 * rng.standard_normal((e, hkv, d)))  # fmt: skip
    return q, k, v, params


def _transcription(q, k, v, memory, w_q, w_k, w_v, L, positions, not_causal):
    """[read, segment, write] written out: memory projected, RoPE at the stated positions, the stated mask."""
    m, outs = memory.shape[1], []
    for s in range(0, q.shape[2], L):
        proj = lambda w: np.einsum("bme,ehd->bhmd", memory, w)  # noqa: E731
        wrap = lambda mem, x: np.concatenate([mem, x[:, :, s:s + L], mem], axis=2)  # noqa: E731
        qq, kk, vv = wrap(proj(w_q), q), wrap(proj(w_k), k), wrap(proj(w_v), v)
        if positions == "sequential":
            place = np.arange(2 * m + L)
        else:  # lucidrains: q_pos = pos + 10000, padded with 0 for the read and write memories
            place = np.concatenate([np.zeros(m, int), np.arange(L) + 10000, np.zeros(m, int)])
        qq, kk = apply_rope(qq, place), apply_rope(kk, place)
        t = 2 * m + L
        mask = np.tril(np.ones((t, t), bool))
        if not_causal:  # lucidrains' custom causal mask, built by padding as it does
            mask = np.pad(np.tril(np.ones((L, L), bool)), ((m, 0), (0, m)), constant_values=False)
            mask = np.pad(mask, ((0, m), (m, 0)), constant_values=True)
        out = dense_attention(qq, kk, vv, mask=mask).out
        outs.append(out[:, :, m:m + L])
        memory = out[:, :, m + L:].transpose(0, 2, 1, 3).reshape(memory.shape)
    return np.concatenate(outs, axis=2), memory


@pytest.mark.parametrize("positions", ["sequential", "lucidrains"])
@pytest.mark.parametrize("mask", ["causal", "memory_not_causal"])
def test_against_a_transcription_of_the_wrapped_segment(positions, mask):
    q, k, v, params = _problem(hq=4, hkv=2)
    got = f(q, k, v, segment_len=4, positions=positions, memory_mask=mask, **params)
    want, memory = _transcription(q, k, v, **params, L=4, positions=positions, not_causal=mask != "causal")
    np.testing.assert_allclose(got.out, want, atol=1e-13)
    np.testing.assert_allclose(got.aux["memory"], memory, atol=1e-13)


def test_state_carries_over_and_step():
    q, k, v, params = _problem()
    properties.state_carries_over(f, q, k, v, 4, dict(segment_len=4, **params), properties.STATE)
    state, out = memory_token_step({"memory": params["memory"]}, q[:, :, :4], k[:, :, :4], v[:, :, :4],
                                   w_q=params["w_q"], w_k=params["w_k"], w_v=params["w_v"])  # fmt: skip
    np.testing.assert_allclose(out.out, f(q, k, v, segment_len=4, **params).out[:, :, :4], atol=1e-14)


def test_vjp_of_one_segment_matches_finite_differences():
    q, k, v, params = _problem(n=3, d=2, seed=1)
    rng = np.random.default_rng(2)
    arrays = dict(q=q, k=k, v=v, w_q=params["w_q"], w_k=params["w_k"], w_v=params["w_v"])
    dout, dlse = rng.standard_normal((1, 2, 3, 2)), rng.standard_normal((1, 2, 3))
    fixed = dict(segment_len=3, memory=params["memory"], memory_mask="memory_not_causal")
    grads = memory_token_attention_vjp(dout, **arrays, dlse=dlse, **fixed)
    for name in arrays:
        np.testing.assert_allclose(grads[name], finite_differences(f, arrays, fixed, dout, dlse, name), atol=1e-7)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_numba_agrees_with_the_reference(precision):
    q, k, v, params = _problem(n=24, d=8, m=3)
    check_numba_agreement(f, memory_token_attention_vjp, q, k, v, dict(segment_len=8, **params), precision, seed=1)


@pytest.mark.parametrize("bad, argument", [
    (dict(segment_len=3), "segment_len"),  # does not divide 8
    (dict(memory=np.zeros((1, 2, 7))), "memory"),
    (dict(memory=np.zeros((1, 0, 8))), "memory"),
    (dict(w_k=np.zeros((8, 1, 4))), "w_k"),
    (dict(positions="absolute"), "positions"),
    (dict(memory_mask="none"), "memory_mask"),
])  # fmt: skip
def test_bad_input(bad, argument):
    q, k, v, params = _problem()
    with pytest.raises(SpecError) as error:
        f(q, k, v, **{**dict(segment_len=4, **params), **bad})
    assert error.value.argument == argument
