"""Attention sinks (StreamingLLM): stream positions equal one masked RoPE pass; cache positions against a
transcription of StartRecentKVCache and the pos-shift attention; the VJP; the Numba backend; bad input."""

import numpy as np
import pytest

from refattn import SpecError
from refattn.memory import sink_attention, sink_attention_vjp, sink_step
from refattn.memory.sinks import properties
from refattn.position.rope import rope_attention
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences

f = sink_attention


def _qkv(b=1, hq=2, hkv=2, n=12, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, n, d)), rng.standard_normal((b, hkv, n, d))


@pytest.mark.parametrize("segment_len, sinks, recent", [(1, 2, 4), (3, 1, 3), (2, 0, 3), (1, 4, 0), (5, 2, 2)])
def test_stream_positions_equal_one_masked_rope_pass(segment_len, sinks, recent):
    q, k, v = _qkv(hq=4)
    properties.original_positions_equal_masked_pass(f, q, k, v, segment_len, sinks, recent)


def test_cache_positions_follow_streaming_llm():
    """Token by token, as examples/eval_long_ppl.py drives it: attend with the query at slot len(cache) and every
    key rotated at its slot (modify_llama.py), then keep start_size + the last recent_size (kv_cache.py)."""
    q, k, v = _qkv()
    start_size, recent_size = 2, 4
    cache_k, cache_v, outs = k[:, :, :0], v[:, :, :0], []
    for t in range(12):
        keys = np.concatenate([cache_k, k[:, :, t:t + 1]], axis=2)
        values = np.concatenate([cache_v, v[:, :, t:t + 1]], axis=2)
        n = keys.shape[2]
        outs.append(rope_attention(q[:, :, t:t + 1], keys, values, q_positions=np.array([n - 1]),
                                   k_positions=np.arange(n)).out)  # fmt: skip
        if n > start_size + recent_size:
            keys = np.concatenate([keys[:, :, :start_size], keys[:, :, n - recent_size:]], axis=2)
            values = np.concatenate([values[:, :, :start_size], values[:, :, n - recent_size:]], axis=2)
        cache_k, cache_v = keys, values
    got = f(q, k, v, sink_count=2, recent_size=4, positions="cache")
    np.testing.assert_allclose(got.out, np.concatenate(outs, axis=2), atol=1e-13)
    np.testing.assert_array_equal(got.aux["cache_k"], cache_k)
    np.testing.assert_array_equal(got.aux["cache_positions"], [0, 1, 8, 9, 10, 11])
    # Once tokens are evicted, cache slots and stream positions disagree.
    original = f(q, k, v, sink_count=2, recent_size=4, positions="original")
    np.testing.assert_allclose(got.out[:, :, :7], original.out[:, :, :7], atol=1e-13)
    assert np.abs(got.out[:, :, 7:] - original.out[:, :, 7:]).max() > 1e-3


def test_state_carries_over_and_step():
    q, k, v = _qkv()
    params = dict(sink_count=2, recent_size=3, segment_len=2, positions="original")
    properties.state_carries_over(f, q, k, v, 6, params, properties.STATE)
    state, out = sink_step(None, q[:, :, :2], k[:, :, :2], v[:, :, :2], sink_count=2, recent_size=3)
    np.testing.assert_array_equal(state["cache_positions"], [0, 1])


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_vjp_of_one_step_with_a_cache_matches_finite_differences(positions):
    q, k, v = _qkv(hq=2, hkv=1, n=3, d=4, seed=2)
    rng = np.random.default_rng(3)
    params = dict(sink_count=1, recent_size=3, segment_len=3, positions=positions,
                  cache_k=rng.standard_normal((1, 1, 4, 4)), cache_v=rng.standard_normal((1, 1, 4, 4)),
                  cache_positions=np.array([0, 7, 8, 9]))  # fmt: skip
    dout, dlse = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 3))
    grads = sink_attention_vjp(dout, q, k, v, dlse=dlse, **params)
    for name, array in dict(q=q, k=k, v=v).items():
        want = finite_differences(f, dict(q=q, k=k, v=v), params, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, atol=1e-7)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("positions", ["cache", "original"])
def test_numba_agrees_with_the_reference(precision, positions):
    q, k, v = _qkv(hq=4, n=40, d=16)
    check_numba_agreement(f, sink_attention_vjp, q, k, v, dict(sink_count=3, recent_size=9, segment_len=4,
                                                                positions=positions), precision, seed=1)  # fmt: skip


@pytest.mark.parametrize("bad, argument", [
    (dict(sink_count=-1), "sink_count"),
    (dict(recent_size=-2), "recent_size"),
    (dict(positions="absolute"), "positions"),
    (dict(cache_k=np.zeros((1, 2, 7, 8)), cache_v=np.zeros((1, 2, 7, 8)), cache_positions=np.arange(7)), "cache_k"),
    (dict(cache_k=np.zeros((1, 2, 2, 8)), cache_v=np.zeros((1, 2, 2, 8))), "cache_positions"),
    (dict(cache_k=np.zeros((1, 2, 2, 8)), cache_v=np.zeros((1, 2, 2, 8)), cache_positions=np.array([3, 1])),
     "cache_positions"),
    (dict(cache_k=np.zeros((1, 1, 2, 8)), cache_v=np.zeros((1, 1, 2, 8)), cache_positions=np.arange(2)), "cache_k"),
])  # fmt: skip
def test_bad_input(bad, argument):
    q, k, v = _qkv()
    with pytest.raises(SpecError) as error:
        f(q, k, v, **{**dict(sink_count=2, recent_size=4), **bad})
    assert error.value.argument == argument
