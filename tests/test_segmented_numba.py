"""Every mechanism of the segmented family: its numba backend against its float64 reference
(tests/agreement.py, the conformance budgets), float64 and float32, forward and VJP."""

import numpy as np
import pytest

from refattn.segmented import (
    bigbird_attention,
    bigbird_attention_vjp,
    local_attention,
    local_attention_vjp,
    longformer_attention,
    longformer_attention_vjp,
    segmented_attention,
    segmented_attention_vjp,
)
from tests.agreement import check_numba_agreement


def _qkv(seed, n, hq=2, hkv=1, d=6, dv=5):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, hq, n, d)), rng.standard_normal((1, hkv, n, d)), rng.standard_normal((1, hkv, n, dv))


LOCAL = [
    dict(window_size=4),
    dict(window_size=4, causal=True, look_backward=2, exact_windowsize=True),
    dict(window_size=5, autopad=True, shared_qk=True, rotary=True),
    dict(window_size=5, autopad=True, shared_qk=True, rotary=True, preset="lucidrains"),
    dict(window_size=4, look_backward=0, look_forward=2, exact_windowsize=True),
]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("options", LOCAL, ids=lambda o: "-".join(f"{a}={b}" for a, b in o.items()))
def test_local(options, precision):
    q, k, v = _qkv(1, 17 if options.get("autopad") else 16)
    check_numba_agreement(local_attention, local_attention_vjp, q, k, v, options, precision, 1)


BIGBIRD = [
    dict(block_size=3, random_blocks=np.array([[[2], [4], [1], [6], [3], [0]], [[5], [5], [5], [5], [5], [5]]])),
    dict(block_size=3, preset="hf", random_blocks=np.zeros((2, 6, 2), dtype=int)),  # N = 24 <= (5 + 2 * 2) * 3: full attention
    dict(block_size=2, preset="hf", random_blocks=np.zeros((2, 10, 1), dtype=int)),
    dict(block_size=2, extra_global_tokens=3, random_blocks=np.array([[[3], [0], [5], [1], [1], [4]],
                                                                     [[2], [2], [0], [5], [3], [3]]])),  # ETC, nb = 6
]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("index", range(len(BIGBIRD)))
def test_bigbird(index, precision):
    options = BIGBIRD[index]
    etc = options.get("extra_global_tokens", 0)
    n = etc + options["block_size"] * (options["random_blocks"].shape[1] + (0 if etc else 2))
    q, k, v = _qkv(2, n)
    check_numba_agreement(bigbird_attention, bigbird_attention_vjp, q, k, v, options, precision, 2)


def _global_tokens(n):
    tokens = np.zeros((2, n), dtype=bool)
    tokens[0, [0, 70]] = True
    tokens[1, n - 1] = True
    return tokens


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("projections", [False, True])
def test_longformer(projections, precision):
    """N = 75 > one 64-row query block, B = 2 with different global tokens, window 6."""
    rng = np.random.default_rng(3)
    q, k, v = (np.concatenate([a, rng.standard_normal(a.shape)]) for a in _qkv(3, 75))
    options = dict(attention_window=6, global_tokens=_global_tokens(75))
    if projections:
        options.update(q_global=rng.standard_normal(q.shape), k_global=rng.standard_normal(k.shape),
                       v_global=rng.standard_normal(v.shape))  # fmt: skip
    check_numba_agreement(longformer_attention, longformer_attention_vjp, q, k, v, options, precision, 3)


SEGMENTED = [
    dict(segment_len=5),
    dict(segment_len=5, causal=True, integration="lse_merge", current_summary="prefix"),
    dict(segment_len=5, causal=True, integration="sum"),
    dict(segment_len=4, integration="lse_merge", pooling="first", last_segment="pad"),
    dict(segment_len=5, causal=True, integration="concat", current_summary="prefix", pooling="first"),
    dict(segment_len=6, integration="concat", last_segment="pad"),
    dict(segment_len=5, integration="gate"),
    dict(segment_len=5, causal=True, integration="lse_merge", pooling="given"),
]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("options", SEGMENTED, ids=lambda o: "-".join(f"{a}={b}" for a, b in o.items()))
def test_segmented(options, precision):
    """N = 17: the last segment is short (or padded)."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(4, 17)
    options = dict(options)
    if options.get("pooling") == "given":
        options["pooling"] = np.triu(rng.random((4, 17)) < 0.5, -0) * (np.arange(17)[None] < 5 * np.arange(1, 5)[:, None])
        options["pooling"] = options["pooling"].astype(float)
    if options.get("integration") == "gate":
        options["gate"] = rng.random((1, 2, 17, 1))
    if options.get("integration") == "concat":
        options["projection"] = rng.standard_normal((10, 3))
    check_numba_agreement(segmented_attention, segmented_attention_vjp, q, k, v, options, precision, 4)
