"""Transformer-XL segment recurrence: streaming equals one masked pass, the stop-gradient VJP, HF's zero
memory, relative scores over memory, the Numba backend, bad input."""

from functools import partial

import numpy as np
import pytest

from refattn import SpecError, dense_attention, dense_attention_vjp
from refattn.memory import xl_recurrence_attention, xl_recurrence_attention_vjp, xl_recurrence_step
from refattn.memory.xl_recurrence import properties
from refattn.position.transformer_xl import transformer_xl_attention
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences

f = xl_recurrence_attention


def _qkv(b=1, hq=2, hkv=2, n=13, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, n, d)), rng.standard_normal((b, hkv, n, d))


@pytest.mark.parametrize("segment_len, mem_len", [(4, 3), (4, 4), (3, 7), (5, 0), (1, 2), (13, 5)])
def test_streaming_equals_one_pass_with_the_segment_memory_mask(segment_len, mem_len):
    q, k, v = _qkv(hq=4)
    # The mask written here, independently: query i sees key j iff j <= i and j >= L * floor(i / L) - M.
    mask = np.array([[j <= i and j >= segment_len * (i // segment_len) - mem_len for j in range(13)] for i in range(13)])
    got, want = f(q, k, v, segment_len=segment_len, mem_len=mem_len), dense_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(got.out, want.out, atol=1e-13)
    np.testing.assert_allclose(got.lse, want.lse, atol=1e-13)
    properties.streaming_equals_masked_pass(f, q, k, v, segment_len, mem_len)


def test_memory_zero_covering_memory_and_same_length():
    q, k, v = _qkv()
    properties.zero_memory_is_segment_local(f, q, k, v, 4)
    properties.covering_memory_is_causal(f, q, k, v, 3)
    properties.same_length_is_window(f, q, k, v, 4, 3)
    properties.state_carries_over(f, q, k, v, 8, dict(segment_len=4, mem_len=3), properties.STATE)


def test_step_function_is_one_segment_of_the_stream():
    q, k, v = _qkv()
    state, outs = None, []
    for start in range(0, 13, 4):
        part = slice(start, start + 4)
        state, out = xl_recurrence_step(state, q[:, :, part], k[:, :, part], v[:, :, part], mem_len=3)
        outs.append(out.out)
    whole = f(q, k, v, segment_len=4, mem_len=3)
    np.testing.assert_allclose(np.concatenate(outs, axis=2), whole.out, atol=1e-14)
    np.testing.assert_array_equal(state["memory_k"], k[:, :, -3:])


def test_hf_zero_memory_is_zero_keys_in_front():
    """HF's init_mems, transcribed: M zero keys and values before the stream, at the front of every mask."""
    q, k, v = _qkv(n=8)
    zeros = np.zeros((1, 2, 4, 8))
    k_ext, v_ext = np.concatenate([zeros, k], axis=2), np.concatenate([zeros, v], axis=2)
    i, j = np.arange(8)[:, None], np.arange(12)[None, :] - 4  # j < 0: the zero memory
    mask = (j <= i) & (j >= 4 * (i // 4) - 4)
    got = f(q, k, v, segment_len=4, mem_len=4, hf_zero_memory=True)
    np.testing.assert_allclose(got.out, dense_attention(q, k_ext, v_ext, mask=mask).out, atol=1e-13)
    assert np.abs(got.out[:, :, :4] - f(q, k, v, segment_len=4, mem_len=4).out[:, :, :4]).max() > 0.05


def _tables(hq=2, rows=10, d=8, seed=1):
    rng = np.random.default_rng(seed)
    return dict(r=0.5 * rng.standard_normal((hq, rows, d)), u=0.5 * rng.standard_normal((hq, d)),
                v_bias=0.5 * rng.standard_normal((hq, d)))  # fmt: skip


def test_relative_scores_stream_equals_one_relative_pass():
    q, k, v = _qkv(n=11)
    tables = _tables(rows=8)
    mask = properties.segment_memory_mask(11, 4, 4)
    want = transformer_xl_attention(q, k, v, **tables, q_positions=np.arange(11), k_positions=np.arange(11), mask=mask)
    got = f(q, k, v, segment_len=4, mem_len=4, **tables)
    np.testing.assert_allclose(got.out, want.out, atol=1e-13)


def test_streamed_gradient_is_the_full_pass_gradient_with_past_keys_detached():
    """Keys duplicated: row i reads copy 1 (a constant) for memory keys, copy 2 for its own segment's keys."""
    q, k, v = _qkv(n=10)
    L, M = 4, 3
    i, j = np.arange(10)[:, None], np.arange(10)[None, :]
    memory_part = (j < L * (i // L)) & (j >= L * (i // L) - M)
    own_part = (j <= i) & (j >= L * (i // L))
    rng = np.random.default_rng(5)
    dout, dlse = rng.standard_normal((1, 2, 10, 8)), rng.standard_normal((1, 2, 10))
    twice = dict(mask=np.concatenate([memory_part, own_part], axis=1))
    k2, v2 = np.concatenate([k, k], axis=2), np.concatenate([v, v], axis=2)
    want = dense_attention_vjp(dout, q, k2, v2, dlse=dlse, **twice)
    got = xl_recurrence_attention_vjp(dout, q, k, v, dlse=dlse, segment_len=L, mem_len=M)
    np.testing.assert_allclose(got["q"], want["q"], atol=1e-12)
    np.testing.assert_allclose(got["k"], want["k"][:, :, 10:], atol=1e-12)
    np.testing.assert_allclose(got["v"], want["v"][:, :, 10:], atol=1e-12)


@pytest.mark.parametrize("relative", [False, True])
def test_vjp_of_one_segment_with_memory_matches_finite_differences(relative):
    q, k, v = _qkv(hq=4, n=4, d=4, seed=3)
    rng = np.random.default_rng(4)
    params = dict(segment_len=4, mem_len=3, memory_k=rng.standard_normal((1, 2, 3, 4)),
                  memory_v=rng.standard_normal((1, 2, 3, 4)))  # fmt: skip
    arrays = dict(q=q, k=k, v=v, **(_tables(hq=4, rows=7, d=4) if relative else {}))
    dout, dlse = rng.standard_normal((1, 4, 4, 4)), rng.standard_normal((1, 4, 4))
    grads = xl_recurrence_attention_vjp(dout, **arrays, dlse=dlse, **params)
    for name in arrays:
        want = finite_differences(f, arrays, params, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, atol=1e-7)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("options", [dict(segment_len=5, mem_len=7), dict(segment_len=4, mem_len=3, same_length=True)])
def test_numba_agrees_with_the_reference(precision, options):
    q, k, v = _qkv(hq=4, n=70, d=16)
    check_numba_agreement(f, xl_recurrence_attention_vjp, q, k, v, options, precision, seed=1)


def test_numba_agrees_with_relative_scores():
    q, k, v = _qkv(n=20)
    check_numba_agreement(f, xl_recurrence_attention_vjp, q, k, v, dict(segment_len=6, mem_len=5, **_tables(rows=11)),
                          "float64", seed=2)  # fmt: skip


@pytest.mark.parametrize("bad, argument", [
    (dict(segment_len=0), "segment_len"),
    (dict(mem_len=-1), "mem_len"),
    (dict(memory_k=np.zeros((1, 2, 5, 8)), memory_v=np.zeros((1, 2, 5, 8))), "memory_k"),  # longer than mem_len 3
    (dict(memory_k=np.zeros((1, 2, 2, 7)), memory_v=np.zeros((1, 2, 2, 8))), "memory_k"),  # another head dim
    (dict(memory_k=np.zeros((1, 2, 2, 8))), "memory_v"),
    (dict(memory_k=np.zeros((1, 2, 2, 8)), memory_v=np.zeros((1, 2, 3, 8))), "memory_v"),
    (dict(same_length=True, mem_len=0), "mem_len"),
    (dict(hf_zero_memory=True, memory_k=np.zeros((1, 2, 2, 8)), memory_v=np.zeros((1, 2, 2, 8))), "hf_zero_memory"),
    (dict(r=np.zeros((2, 5, 8)), u=np.zeros((2, 8)), v_bias=np.zeros((2, 8))), "r"),  # fewer than L + M rows
])  # fmt: skip
def test_bad_input(bad, argument):
    q, k, v = _qkv()
    with pytest.raises(SpecError) as error:
        f(q, k, v, **{**dict(segment_len=4, mem_len=3), **bad})
    assert error.value.argument == argument


def test_keys_must_be_the_stream_s_own():
    q, k, v = _qkv()
    with pytest.raises(SpecError, match="k"):
        f(q, k[:, :, :5], v[:, :, :5], segment_len=4, mem_len=3)
