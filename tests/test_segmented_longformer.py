"""Longformer against its pattern written out key by key (Beltagy et al. 2020, section 3.1, as HF's
LongformerSelfAttention builds its columns), the VJP against finite differences, its invariants,
the hf preset's padding and bad input."""

import math

import numpy as np
import pytest

from refattn import SpecError, dense_attention
from refattn.segmented import longformer_attention, longformer_attention_vjp, sliding_window_attention
from refattn.segmented.longformer import properties
from refattn.segmented.pattern import depends_only_on_pattern
from tests.finite_differences import finite_differences


def _columns(i, n, w, is_global):
    """Keys of row i: a global row, all; a local row, the global keys, then the band without them (HF's
    concatenation of global-key columns with the band, global keys removed from the band)."""
    if is_global[i]:
        return list(range(n))
    globals_ = [j for j in range(n) if is_global[j]]
    return globals_ + [j for j in range(n) if abs(i - j) <= w // 2 and not is_global[j]]


def _expected(q, k, v, w, global_tokens, projections):
    b_size, hq, n, _ = q.shape
    group = hq // k.shape[1]
    scale = 1 / math.sqrt(q.shape[3])
    out, lse = np.zeros(q.shape[:3] + (v.shape[3],)), np.zeros(q.shape[:3])
    for b in range(b_size):
        for h in range(hq):
            for i in range(n):
                chosen = (projections or dict(q=q, k=k, v=v)) if global_tokens[b, i] else dict(q=q, k=k, v=v)
                qq, kk, vv = chosen["q"], chosen["k"], chosen["v"]
                columns = _columns(i, n, w, global_tokens[b])
                s = np.array([scale * qq[b, h, i] @ kk[b, h // group, j] for j in columns])
                top = s.max()
                p = np.exp(s - top)
                out[b, h, i] = sum(pj * vv[b, h // group, j] for pj, j in zip(p, columns)) / p.sum()
                lse[b, h, i] = top + math.log(p.sum())
    return out, lse


def _problem(seed, n=9, hq=2, hkv=1, d=4, dv=3, with_projections=True):
    rng = np.random.default_rng(seed)
    arrays = dict(q=rng.standard_normal((2, hq, n, d)), k=rng.standard_normal((2, hkv, n, d)),
                  v=rng.standard_normal((2, hkv, n, dv)))  # fmt: skip
    if with_projections:
        arrays.update(q_global=rng.standard_normal((2, hq, n, d)), k_global=rng.standard_normal((2, hkv, n, d)),
                      v_global=rng.standard_normal((2, hkv, n, dv)))  # fmt: skip
    global_tokens = np.zeros((2, n), dtype=bool)
    global_tokens[0, [0, n // 2 + 1]] = True
    global_tokens[1, n - 1] = True
    return arrays, global_tokens


@pytest.mark.parametrize("with_projections", [True, False])
@pytest.mark.parametrize("preset", [None, "hf"])
def test_matches_the_pattern_written_out(with_projections, preset):
    arrays, global_tokens = _problem(1, with_projections=with_projections)
    got = longformer_attention(**arrays, attention_window=4, global_tokens=global_tokens, preset=preset)
    projections = {name[0]: arrays[name] for name in ("q_global", "k_global", "v_global")} if with_projections else None
    out, lse = _expected(arrays["q"], arrays["k"], arrays["v"], 4, global_tokens, projections)
    np.testing.assert_allclose(got.out, out, atol=1e-12)
    np.testing.assert_allclose(got.lse, lse, atol=1e-12)


@pytest.mark.parametrize("preset", [None, "hf"])
def test_vjp_matches_finite_differences(preset):
    arrays, global_tokens = _problem(2, n=5, d=3, dv=2)
    arrays = {name: a[:1] for name, a in arrays.items()}
    params = dict(attention_window=2, global_tokens=global_tokens[:1], preset=preset)
    rng = np.random.default_rng(3)
    result = longformer_attention(**arrays, **params)
    dout, dlse = rng.standard_normal(result.out.shape), rng.standard_normal(result.lse.shape)
    grads = longformer_attention_vjp(dout, **arrays, **params, dlse=dlse)
    assert set(grads) == set(arrays)
    for name in arrays:
        want = finite_differences(longformer_attention, arrays, params, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, rtol=1e-6, atol=1e-8, err_msg=name)


def test_no_global_tokens_is_the_sliding_window():
    arrays, _ = _problem(4, with_projections=False)
    properties.no_global_tokens_is_the_sliding_window(longformer_attention, sliding_window_attention, **arrays,
                                                      params=dict(attention_window=4))  # fmt: skip


@pytest.mark.parametrize("with_projections", [True, False])
def test_global_rows_are_dense_attention(with_projections):
    arrays, global_tokens = _problem(5, with_projections=with_projections)
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    properties.global_rows_are_dense(longformer_attention, dense_attention, q, k, v,
                                     dict(arrays, attention_window=2, global_tokens=global_tokens))  # fmt: skip


def test_hf_padding_changes_no_real_token():
    """N = 9 padded to 12 by the hf preset with attention_window 6."""
    arrays, global_tokens = _problem(6)
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    properties.padding_changes_no_real_token(longformer_attention, q, k, v,
                                             dict(arrays, attention_window=6, global_tokens=global_tokens))  # fmt: skip


def test_output_depends_only_on_the_pattern():
    arrays, global_tokens = _problem(7, hq=1, with_projections=False)
    arrays = {name: a[:1] for name, a in arrays.items()}
    n = arrays["q"].shape[2]
    allowed = np.zeros((1, 1, n, n), dtype=bool)
    for i in range(n):
        allowed[0, 0, i, _columns(i, n, 4, global_tokens[0])] = True
    params = dict(attention_window=4, global_tokens=global_tokens[:1])
    depends_only_on_pattern(longformer_attention, longformer_attention_vjp, arrays["q"], arrays["k"], arrays["v"],
                            params, allowed)  # fmt: skip


@pytest.mark.parametrize("arguments, name", [
    (dict(attention_window=3), "attention_window"),
    (dict(attention_window=-2), "attention_window"),
    (dict(attention_window=0, preset="hf"), "attention_window"),
    (dict(attention_window=4, preset="allenai"), "preset"),
    (dict(attention_window=4, global_tokens=np.ones((2, 9))), "global_tokens"),
    (dict(attention_window=4, q_global=np.ones((2, 2, 9, 4))), "q_global, k_global, v_global"),
])  # fmt: skip
def test_bad_input(arguments, name):
    arrays, _ = _problem(8, with_projections=False)
    with pytest.raises(SpecError) as error:
        longformer_attention(**arrays, **arguments)
    assert error.value.argument == name


def test_numba_backward_of_a_global_row_with_a_large_local_logit_is_finite():
    """Found by fuzzing (shrunk): one global token whose local logit exceeds its global lse made the numba
    backward compute exp(s_local - lse) = inf, and inf times the zeroed local cotangent NaN. The reference's
    local-path gradients of q, k and v are 0 here (the global path holds every row)."""
    one = lambda value: np.full((1, 1, 1, 1), value)  # noqa: E731
    arguments = dict(attention_window=0, global_tokens=np.array([[True]]), q_global=one(-3.9631459),
                     k_global=one(3.14700351), v_global=one(0.36159505))  # fmt: skip
    q, k, v = one(-15.68245324), one(-73.24402148), one(1.14416587)
    dout, dlse = np.full((1, 1, 1, 1), -0.3064645), np.full((1, 1, 1), -0.35179661)
    want = longformer_attention_vjp(dout, q, k, v, dlse=dlse, **arguments)
    got = longformer_attention_vjp(dout, q, k, v, dlse=dlse, backend="numba", **arguments)
    for name in ("q", "k", "v"):
        assert np.isfinite(got[name]).all() and want[name] == 0.0
        np.testing.assert_allclose(got[name], want[name], atol=1e-12)
