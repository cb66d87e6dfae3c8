"""Segmented attention (spec/segmented.md, "Segmented attention") against an independent
derivation: masks, pooling matrices and summaries built by loops over (i, j) from the
definitions, and attention by tests/naive_dense.py; the VJP against finite differences."""

import itertools

import numpy as np
import pytest

from refattn import SpecError, dense_attention
from refattn.segmented import segmented_attention, segmented_attention_vjp
from refattn.segmented.pattern import depends_only_on_pattern
from refattn.segmented.segments import properties
from tests.finite_differences import finite_differences
from tests.naive_dense import naive_dense


def _qkv(seed, b=1, hq=2, hkv=1, n=7, d=4, dv=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, n, d)), rng.standard_normal((b, hkv, n, dv))


def _pooling(n, length, pooling, last_segment):
    """R (S, N) by the definition: mean of each segment's tokens (L of them when padded) or its first."""
    segments = -(-n // length)
    pooled = np.zeros((segments, n))
    for s in range(segments):
        members = [j for j in range(n) if j // length == s]
        for j in members:
            if pooling == "first":
                pooled[s, j] = 1.0 if j == s * length else 0.0
            else:
                pooled[s, j] = 1.0 / (length if last_segment == "pad" else len(members))
    return pooled


def _prefix(n, length, pooling):
    """P (N, N): row i pools its segment's tokens j <= i."""
    prefix = np.zeros((n, n))
    for i in range(n):
        members = [j for j in range(n) if j // length == i // length and j <= i]
        for j in members:
            prefix[i, j] = (1.0 if j % length == 0 else 0.0) if pooling == "first" else 1.0 / len(members)
    return prefix


def _expected(q, k, v, *, segment_len, causal=False, last_segment="short", pooling="mean", integration="none",
              current_summary="exclude", gate=None, projection=None):  # fmt: skip
    n, length = q.shape[2], segment_len
    segments = -(-n // length)
    local = np.array([[i // length == j // length and (not causal or j <= i) for j in range(n)] for i in range(n)])
    base_out, base_lse = naive_dense(q, k, v, mask=local)
    if integration == "none":
        return base_out, base_lse
    pooled = pooling if isinstance(pooling, np.ndarray) else _pooling(n, length, pooling, last_segment)
    seen = np.array([[not causal or s < i // length for s in range(segments)] for i in range(n)])
    prefix = causal and current_summary == "prefix"
    if prefix:
        pooled = np.concatenate([pooled, _prefix(n, length, pooling)])
        seen = np.concatenate([seen, np.eye(n, dtype=bool)], axis=1)
    summary_k = np.einsum("sn,bhnd->bhsd", pooled, k)
    summary_v = np.einsum("sn,bhne->bhse", pooled, v)
    if integration == "lse_merge":
        return naive_dense(q, np.concatenate([k, summary_k], 2), np.concatenate([v, summary_v], 2),
                           mask=np.concatenate([local, seen], axis=1))  # fmt: skip
    if integration == "concat":
        group = q.shape[1] // k.shape[1]
        own = np.stack([summary_v[:, h // group, [segments + i if prefix else i // length for i in range(n)]]
                        for h in range(q.shape[1])], axis=1)  # fmt: skip
        return np.concatenate([base_out, own], -1) @ projection, base_lse
    over_out, _ = naive_dense(q, summary_k, summary_v, mask=seen)
    out = base_out + over_out if integration == "sum" else gate * base_out + (1 - gate) * over_out
    return out, base_lse


VARIANTS = [
    dict(integration=integration, causal=causal, current_summary=current)
    for integration in ("none", "sum", "gate", "lse_merge", "concat")
    for causal, current in ((False, "exclude"), (True, "exclude"), (True, "prefix"))
    if not (integration == "concat" and causal and current == "exclude")
]


def _extras(params, seed, hq=2, n=7, dv=3):  # gate and projection where the integration needs them
    rng = np.random.default_rng(seed + 1)
    params = dict(params)
    if params.get("integration") == "gate":
        params["gate"] = rng.random((1, hq, n, 1))
    if params.get("integration") == "concat":
        params["projection"] = rng.standard_normal((2 * dv, 5))
    return params


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: "-".join(str(x) for x in p.values()))
@pytest.mark.parametrize("layout", [("mean", "short"), ("mean", "pad"), ("first", "short")])
def test_matches_independent_derivation(variant, layout):
    q, k, v = _qkv(1)
    params = _extras(dict(variant, segment_len=3, pooling=layout[0], last_segment=layout[1]), 1)
    got = segmented_attention(q, k, v, **params)
    out, lse = _expected(q, k, v, **params)
    np.testing.assert_allclose(got.out, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.lse, lse, rtol=1e-12, atol=1e-12)


def test_given_pooling_matrix_and_padding_past_n():
    """A given one-hot R (max pooling as a selection) and L > N with padding."""
    q, k, v = _qkv(2, n=5)
    selection = np.zeros((2, 5))
    selection[0, 2] = selection[1, 4] = 1.0
    params = dict(segment_len=3, pooling=selection, integration="lse_merge")
    got = segmented_attention(q, k, v, **params)
    np.testing.assert_allclose(got.out, _expected(q, k, v, **params)[0], rtol=1e-12, atol=1e-12)
    padded = dict(segment_len=8, last_segment="pad", integration="sum")
    np.testing.assert_allclose(segmented_attention(q, k, v, **padded).out, _expected(q, k, v, **padded)[0], atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: "-".join(str(x) for x in p.values()))
def test_vjp_matches_finite_differences(variant):
    q, k, v = _qkv(3, hq=2, hkv=1, n=5, d=3, dv=2)
    params = _extras(dict(variant, segment_len=2), 3, n=5, dv=2)
    arrays = dict(q=q, k=k, v=v)
    for name in ("gate", "projection"):
        if name in params:
            arrays[name] = params.pop(name)
    rng = np.random.default_rng(4)
    result = segmented_attention(**arrays, **params)
    dout, dlse = rng.standard_normal(result.out.shape), rng.standard_normal(result.lse.shape)
    grads = segmented_attention_vjp(dout, **arrays, **params, dlse=dlse)
    assert set(grads) == set(arrays)
    for name in arrays:
        want = finite_differences(segmented_attention, arrays, params, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_one_segment_is_dense_attention():
    q, k, v = _qkv(5, n=6)
    properties.one_segment_is_dense(segmented_attention, dense_attention, q, k, v, dict(causal=True))
    properties.one_segment_is_dense(segmented_attention, dense_attention, q, k, v, dict(causal=False))


def test_lse_merge_with_one_segment_adds_one_summary_key():
    q, k, v = _qkv(6, n=6)
    properties.one_segment_merge_is_one_extra_key(segmented_attention, dense_attention, q, k, v, {})


def test_causal_summaries_never_see_the_future():
    q, k, v = _qkv(7, n=8)
    causal = np.array([[j <= i for j in range(8)] for i in range(8)])
    for integration, current in itertools.product(("sum", "lse_merge", "concat"), ("exclude", "prefix")):
        if integration == "concat" and current == "exclude":
            continue
        params = _extras(dict(segment_len=3, causal=True, integration=integration, current_summary=current), 7, n=8)
        depends_only_on_pattern(segmented_attention, segmented_attention_vjp, q, k, v, params, causal)


def test_local_attention_stays_in_its_segment():
    q, k, v = _qkv(8, n=8)
    same_segment = np.array([[i // 3 == j // 3 for j in range(8)] for i in range(8)])
    depends_only_on_pattern(segmented_attention, segmented_attention_vjp, q, k, v, dict(segment_len=3), same_segment)


@pytest.mark.parametrize("arguments, name", [
    (dict(segment_len=0), "segment_len"),
    (dict(segment_len=8), "segment_len"),
    (dict(segment_len=2.0), "segment_len"),
    (dict(segment_len=3, pooling=np.ones((2, 7))), "pooling"),
    (dict(segment_len=3, pooling="max"), "pooling"),
    (dict(segment_len=3, causal=True, pooling=np.ones((3, 7))), "pooling"),
    (dict(segment_len=3, integration="gate"), "gate"),
    (dict(segment_len=3, integration="concat", projection=np.ones((5, 2))), "projection"),
    (dict(segment_len=3, integration="concat", causal=True, projection=np.ones((6, 2))), "current_summary"),
    (dict(segment_len=3, gate=np.ones((1, 1, 7, 1))), "gate"),
    (dict(segment_len=3, integration="stack"), "integration"),
])  # fmt: skip
def test_bad_input(arguments, name):
    q, k, v = _qkv(8)
    with pytest.raises(SpecError) as error:
        segmented_attention(q, k, v, **arguments)
    assert error.value.argument == name


def test_lengths_must_match():
    q, k, v = _qkv(9)
    with pytest.raises(SpecError, match="k"):
        segmented_attention(q[:, :, :5], k, v, segment_len=2)
