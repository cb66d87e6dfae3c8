"""KV-cache decoding equals the full pass (spec/memory.md, "KV-cache decoding").

For every registered mechanism where incremental decoding is defined: token t's output, computed from
its one query against the keys and values 0..t (the cache) with ``causal_alignment="bottom_right"``
and explicit positions ``q_positions=[t]``, ``k_positions=0..t``, equals row t of one causal pass
over the whole sequence, out and lse. The recurrent-memory mechanisms decode with their own step
function, one token per step. Every other registered mechanism is listed, with the reason decoding is
not defined for it, so that a new mechanism must be classified here.
"""

import inspect

import numpy as np
import pytest

import refattn
from refattn import dense_attention
from refattn.core import registry
from refattn.memory import compressive_step, sink_step, xl_recurrence_step
from refattn.memory.sinks.properties import sink_mask
from refattn.position.rope import rope_attention

N, HQ, HKV, D = 9, 4, 2, 8


def _tables(name: str, rng) -> dict:
    """The mechanism's own parameters for a causal pass over N tokens."""
    return {
        "dense": {},
        "alibi": {},
        "rope": {},
        "xpos": {},
        "t5": {"table": rng.standard_normal((32, HQ)), "bidirectional": False},
        "shaw": {"rel_k": rng.standard_normal((9, D)), "rel_v": rng.standard_normal((9, D)), "max_relative_position": 4},
        "transformer_xl": {"r": 0.5 * rng.standard_normal((HQ, N, D)), "u": rng.standard_normal((HQ, D)),
                           "v_bias": rng.standard_normal((HQ, D))},
        "differential": {**{f"lambda_{a}{i}": 0.1 * rng.standard_normal(D) for a in "qk" for i in (1, 2)}, "depth": 1},
        "logn": {"n": 64},
        "ssmax": {"s": 0.8},
    }[name]  # fmt: skip


#: Mechanisms that decode through their public function, as dense attention does.
DECODED_BY_CACHE = ("dense", "alibi", "rope", "xpos", "t5", "shaw", "transformer_xl", "differential", "logn", "ssmax")
#: Recurrent-memory mechanisms that decode with their step function (tests below).
DECODED_BY_STEPS = ("xl_recurrence", "sinks", "compressive")
#: Registered mechanisms where token-by-token decoding is not defined, and why (spec/memory.md).
NOT_DECODABLE = {
    "lsh": "hashing sorts and chunks the whole sequence; a token's chunk depends on every other token's bucket",
    "routing": "k-means clusters are formed over the whole sequence; a query's cluster-mates change with later tokens",
    "routing_hybrid": "its routed heads are routing's",
    "centroid_ema": "a centroid update over the whole batch of tokens, not attention over a cache",
    "soft_routing": "routes between attention paths over the whole sequence",
    "linformer": "E and F mix all N positions (no causal form exists)",
    "nystrom": "landmarks are means over segments of the whole sequence",
    "lowrank": "generic factors U, W over the whole sequence; no cache semantics",
    "performer": "prefix sums decode only with a causal stabiliser; the presets' key-global maximum reads future keys",
    "bigbird": "block-sparse pattern with global and random blocks over the whole sequence, not causal",
    "longformer": "global tokens attend to (and are attended by) the whole sequence",
    "local": "blocks are fixed by the whole sequence's length; its causal windows are dense attention's (covered)",
    "sliding_window": "a causal sliding window is dense attention's window, decoded in test_dense_window_decodes",
    "segmented": "segment summaries integrate whole segments, later tokens included",
    "h1d": "the hierarchy pools blocks of the whole sequence",
    "multilevel": "levels aggregate whole segments of the sequence",
    "infini": "defined per segment: local attention sees its segment, the memory changes between segments",
    "memory_tokens": "defined per segment: write tokens see the whole segment",
}


def test_every_registered_mechanism_is_classified():
    known = set(DECODED_BY_CACHE) | set(DECODED_BY_STEPS) | set(NOT_DECODABLE)
    assert set(refattn.mechanisms()) <= known, f"classify for KV-cache decoding: {set(refattn.mechanisms()) - known}"


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, HQ, N, D)), rng.standard_normal((1, HKV, N, D)), rng.standard_normal((1, HKV, N, D))


@pytest.mark.parametrize("name", DECODED_BY_CACHE)
def test_decoding_token_by_token_equals_the_full_causal_pass(name):
    if name not in refattn.mechanisms():
        pytest.skip(f"{name} is not registered")
    mechanism = registry.get(name)
    q, k, v = _qkv()
    if name == "differential":  # kv heads come in pairs of keys sharing one value head of twice the width
        v = np.concatenate([v[:, :1], v[:, 1:]], axis=-1)
    tables = _tables(name, np.random.default_rng(1))
    takes_positions = "q_positions" in inspect.signature(mechanism.forward).parameters
    positions = lambda qp, kp: dict(q_positions=qp, k_positions=kp) if takes_positions else {}  # noqa: E731
    full = mechanism.forward(q, k, v, causal=True, **positions(np.arange(N), np.arange(N)), **tables)
    for t in range(N):
        step = mechanism.forward(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], causal=True,
                                 causal_alignment="bottom_right", **positions(np.array([t]), np.arange(t + 1)),
                                 **tables)  # fmt: skip
        np.testing.assert_allclose(step.out[:, :, 0], full.out[:, :, t], atol=1e-12, err_msg=f"{name} token {t}")
        if full.lse is not None:
            np.testing.assert_allclose(step.lse[:, :, 0], full.lse[:, :, t], atol=1e-12)


def test_dense_window_decodes():
    q, k, v = _qkv()
    full = dense_attention(q, k, v, causal=True, window=(3, 0))
    for t in range(N):
        step = dense_attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], causal=True, window=(3, 0))
        np.testing.assert_allclose(step.out[:, :, 0], full.out[:, :, t], atol=1e-12)


def _decode(step_function, state, q, k, v, **params):
    """Token-by-token outputs of a step function, and the final state."""
    outs = []
    for t in range(q.shape[2]):
        state, result = step_function(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], **params)
        outs.append(result.out)
    return np.concatenate(outs, axis=2), state


@pytest.mark.parametrize("mem_len", [3, N])
def test_xl_recurrence_decodes_as_a_window_of_mem_len_past_tokens(mem_len):
    q, k, v = _qkv()
    out, _ = _decode(xl_recurrence_step, None, q, k, v, mem_len=mem_len)
    np.testing.assert_allclose(out, dense_attention(q, k, v, causal=True, window=(mem_len, 0)).out, atol=1e-12)


def test_sinks_decode_as_one_masked_rope_pass():
    q, k, v = _qkv()
    out, state = _decode(sink_step, None, q, k, v, sink_count=2, recent_size=3, positions="original")
    full = rope_attention(q, k, v, q_positions=np.arange(N), k_positions=np.arange(N), mask=sink_mask(N, 1, 2, 3))
    np.testing.assert_allclose(out, full.out, atol=1e-12)


def test_compressive_with_a_memory_holding_everything_decodes_as_causal_attention():
    q, k, v = _qkv()
    out, _ = _decode(compressive_step, None, q, k, v, mem_len=N, compressed_len=2, rate=1)
    np.testing.assert_allclose(out, dense_attention(q, k, v, causal=True).out, atol=1e-12)
