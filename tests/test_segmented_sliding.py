"""Sliding windows as each library counts them: each convention against its source's rule,
transcribed here as a loop over (i, j), through tests/naive_dense.py."""

import numpy as np
import pytest

from refattn import SpecError
from refattn import dense_attention
from refattn.segmented.sliding import properties, sliding_window_attention, sliding_window_attention_vjp, window_of
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences
from tests.naive_dense import naive_dense

RULES = {
    # transformers masking_utils: sliding_window_overlay (kv_idx > q_idx - W) AND causal (kv_idx <= q_idx)
    "hf_causal": lambda i, j, w: j > i - w and j <= i,
    # transformers masking_utils: sliding_window_bidirectional_overlay (abs(q_idx - kv_idx) <= W)
    "hf_bidirectional": lambda i, j, w: abs(i - j) <= w,
    # Mistral 7B, section 2: position i attends to positions i - W ... i
    "mistral": lambda i, j, w: i - w <= j <= i,
    # HF LongformerSelfAttention: one_sided_attn_window_size = attention_window // 2, band |i - j| <= it
    "longformer": lambda i, j, w: abs(i - j) <= w // 2,
}


@pytest.mark.parametrize("convention", sorted(RULES))
@pytest.mark.parametrize("window_size", [2, 4])
def test_convention_matches_its_source_rule(convention, window_size):
    rng = np.random.default_rng(window_size)
    q, k, v = (rng.standard_normal((1, 2, 11, 5)) for _ in range(3))
    mask = np.array([[RULES[convention](i, j, window_size) for j in range(11)] for i in range(11)])
    got = sliding_window_attention(q, k, v, window_size=window_size, convention=convention)
    out, lse = naive_dense(q, k, v, mask=mask)
    np.testing.assert_allclose(got.out, out, atol=1e-12)
    np.testing.assert_allclose(got.lse, lse, atol=1e-12)
    properties.is_dense_with_the_exact_window(sliding_window_attention, dense_attention, q, k, v,
                                              dict(window_size=window_size, convention=convention))  # fmt: skip


def test_keys_counted():
    """The number of keys of a middle query under each convention, as the spec's table states."""
    counts = {c: sum(1 for j in range(-20, 21) if RULES[c](0, j, 4)) for c in RULES}
    assert counts == {"hf_causal": 4, "hf_bidirectional": 9, "mistral": 5, "longformer": 5}
    assert window_of("hf_causal", 4) == ((3, 0), True)
    assert window_of("longformer", 4) == ((2, 2), False)


def test_vjp_matches_finite_differences():
    rng = np.random.default_rng(3)
    arrays = dict(q=rng.standard_normal((1, 2, 5, 3)), k=rng.standard_normal((1, 1, 6, 3)), v=rng.standard_normal((1, 1, 6, 2)))
    params = dict(window_size=2, convention="hf_causal")
    result = sliding_window_attention(**arrays, **params)
    dout, dlse = rng.standard_normal(result.out.shape), rng.standard_normal(result.lse.shape)
    grads = sliding_window_attention_vjp(dout, **arrays, **params, dlse=dlse)
    for name in arrays:
        np.testing.assert_allclose(grads[name], finite_differences(sliding_window_attention, arrays, params, dout, dlse, name),
                                   rtol=1e-6, atol=1e-8)  # fmt: skip


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_numba_agrees(precision):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 37, 8)) for _ in range(3))
    check_numba_agreement(sliding_window_attention, sliding_window_attention_vjp, q, k, v,
                          dict(window_size=6, convention="longformer"), precision, 4)  # fmt: skip


@pytest.mark.parametrize("convention, window_size", [("hf_causal", 0), ("mistral", -1), ("longformer", 3),
                                                     ("hf", 2), ("hf_bidirectional", 1.5)])  # fmt: skip
def test_bad_windows(convention, window_size):
    q = np.zeros((1, 1, 4, 2))
    with pytest.raises(SpecError):
        sliding_window_attention(q, q, q, window_size=window_size, convention=convention)
