"""LSH attention (refattn/lsh): the stages against hand-worked examples, the whole
mechanism against closed forms and against the dense identity (Hypothesis, random
sizes and options), the hand-derived VJP against central differences (buckets held
fixed by a recorded margin), presets' constants and bad input."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import SpecError
from refattn.core import registry
from refattn.lsh import (
    PRESETS,
    bucket_margins,
    chunk_windows,
    hash_buckets,
    lsh_attention,
    lsh_attention_vjp,
    normalised_keys,
    pair_counts,
    properties,
    sort_items,
    window_multiplicity,
)
from refattn.lsh.cases import MIN_MARGIN, cases, draw_qk
from refattn.lsh.inputs import check_lsh_inputs
from refattn.lsh.presets import preset_values


def problem(seed, *, b=1, h=2, n=16, d=6, dv=5, num_buckets=4, num_hashes=2, padded=(), per_example=False):
    """qk with bucket margins >= MIN_MARGIN, v, rotations and (optionally) a padding mask."""
    rng = np.random.default_rng(seed)
    half = sum(num_buckets if isinstance(num_buckets, list) else [num_buckets]) // 2
    rotations = rng.standard_normal(((b,) if per_example else ()) + (h, num_hashes, d, half))
    qk = draw_qk(rng, rotations, num_buckets, (b, h, n, d))
    v = rng.standard_normal((b, h, n, dv))
    params = dict(rotations=rotations, num_buckets=num_buckets, num_hashes=num_hashes)
    if padded:
        valid = np.ones((b, n), dtype=bool)
        for i, count in enumerate(padded):
            valid[i, n - count :] = False
        params["key_padding_mask"] = valid
    return qk, v, params


# --- stages, by hand --------------------------------------------------------------


def test_hash_buckets_by_hand():
    # One head, two rounds, D = 2; round 0 rotates by the identity, round 1 swaps the axes.
    rotations = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # (H, R, D, P) = (1, 2, 2, 2)
    qk = np.array([[[[3.0, 1.0], [-1.0, -3.0], [0.5, -2.0]]]])  # (1, 1, 3, 2)
    # [y, -y] over 4 buckets: (3, 1) -> [3, 1, -3, -1] -> 0; (-1, -3) -> 3; (0.5, -2) -> 3.
    # Round 1 sees (x1, x0): (1, 3) -> 1; (-3, -1) -> 2; (-2, 0.5) -> 2; offset 4.
    assert hash_buckets(qk, rotations, 4).tolist() == [[[[0, 3, 3], [5, 6, 6]]]]
    # Factorised [2, 2]: factor 0 reads column 0, factor 1 column 1; bucket = b0 + 2 b1.
    # (3, 1): b0 = 0, b1 = 0 -> 0; (-1, -3): 1 + 2 = 3; (0.5, -2): 0 + 2 = 2.
    assert hash_buckets(qk, rotations[:, :1], [2, 2]).tolist() == [[[[0, 3, 2]]]]
    # Padding bucket: token 2 padded -> bucket 4 in every round, rounds offset by 4 + 1.
    valid = np.array([[True, True, False]])
    assert hash_buckets(qk, rotations, 4, key_padding_mask=valid).tolist() == [[[[0, 3, 4], [6, 7, 9]]]]
    assert hash_buckets(qk, rotations, 4, key_padding_mask=valid, padding_bucket="none").tolist() == [[[[0, 3, 3], [5, 6, 6]]]]
    # HF's rule: a mask with nothing padded adds no bucket; trax's ("if_mask") does.
    everything = np.ones((1, 3), dtype=bool)
    assert hash_buckets(qk, rotations, 4, key_padding_mask=everything, padding_bucket="if_padded")[0, 0, 1].tolist() == [5, 6, 6]
    assert hash_buckets(qk, rotations, 4, key_padding_mask=everything)[0, 0, 1].tolist() == [6, 7, 7]


def test_bucket_margins_by_hand():
    rotations = np.eye(2)[None, None]  # (1, 1, 2, 2)
    qk = np.array([[[[3.0, 1.0]]]])
    # [3, 1, -3, -1]: gap 3 - 1 = 2, scale max(|3|·1, |1|·1) = 3.
    assert bucket_margins(qk, rotations, 4)[0, 0, 0, 0] == pytest.approx(2 / 3)


def test_sort_is_by_bucket_then_position():
    buckets = np.array([[[[2, 0, 2, 1], [5, 4, 4, 6]]]])  # (1, 1, R=2, N=4), offsets included
    permutation, inverse = sort_items(buckets)
    # Items t = r·4 + n: round 0 buckets 2, 0, 2, 1 -> items 1, 3, 0, 2; round 1: 4, 4, 5, 6 -> 5, 6, 4, 7.
    assert permutation.tolist() == [[[1, 3, 0, 2, 5, 6, 4, 7]]]
    assert np.array_equal(np.take_along_axis(permutation, inverse, axis=-1), np.arange(8)[None, None])
    assert np.array_equal(properties.sorted_slots(buckets), inverse)


def test_chunk_windows_wrap_and_repeat():
    chunks = chunk_windows(10, 4, 1, 0)
    assert [c.query_slots.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunks[0].key_slots.tolist() == [8, 9, 0, 1, 2, 3]  # the last (short) chunk, then its own
    assert chunks[2].key_slots.tolist() == [4, 5, 6, 7, 8, 9]
    assert chunk_windows(10, 4, 0, 1)[2].key_slots.tolist() == [8, 9, 0, 1, 2, 3]  # look-ahead wraps to chunk 0
    # One chunk and a window of three: the chunk occurs three times.
    assert chunk_windows(3, 4, 1, 1)[0].key_slots.tolist() == [0, 1, 2] * 3
    assert window_multiplicity(1, 1, 1).tolist() == [3]
    assert window_multiplicity(3, 1, 0).tolist() == [1, 0, 1]
    assert window_multiplicity(2, 2, 1).tolist() == [2, 2]


def test_pair_counts_by_hand():
    # Two rounds, four tokens, chunks of 2 (C = 4), one chunk before. Chunks of the items:
    # round 0: tokens 0, 1 in chunk 0, tokens 2, 3 in chunk 1; round 1: tokens 3, 0 in chunk 2, 1, 2 in chunk 3.
    item_chunk = np.array([[[[0, 0, 1, 1], [2, 3, 3, 2]]]])
    counts = pair_counts(item_chunk, np.array([[[0]]]), np.arange(4)[None, None], window_multiplicity(4, 1, 0))
    # Token 0's windows: round 0 chunk 0 -> chunks 3, 0 (tokens 1, 2 of round 1; 0, 1 of round 0);
    # round 1 chunk 2 -> chunks 1, 2 (tokens 2, 3 of round 0; 3, 0 of round 1).
    assert counts.tolist() == [[[[2, 2, 2, 2]]]]


def test_rms_keys_are_hf_s_and_l2_keys_are_torch_s():
    x = np.array([[[[3.0, 4.0], [0.0, 0.0]]]])
    rms = normalised_keys(x, "rms", 1e-6)
    # HF: x * rsqrt(mean(x²) + 1e-6) / sqrt(D).
    assert np.allclose(rms[0, 0, 0], x[0, 0, 0] / np.sqrt(12.5 + 1e-6) / np.sqrt(2), rtol=1e-15)
    assert np.array_equal(normalised_keys(x, "l2", 1e-12)[0, 0], [[0.6, 0.8], [0.0, 0.0]])


# --- the mechanism: closed forms -------------------------------------------------


def test_two_tokens_see_each_other_exactly():
    """One round, one chunk, no neighbours: token 0 sees token 1 (its own logit is -1e5), and vice versa."""
    qk = np.array([[[[1.0, 2.0], [3.0, -1.0]]]])
    v = np.array([[[[10.0], [20.0]]]])
    rotations = np.ones((1, 1, 2, 1))
    result = lsh_attention(qk, v, rotations=rotations, num_buckets=2, num_hashes=1, chunk_len=2, num_chunks_before=0)
    assert result.out[0, 0, :, 0].tolist() == [20.0, 10.0]
    unit = qk[0, 0] / np.sqrt(np.sum(qk[0, 0] ** 2, axis=-1, keepdims=True) + 2e-6)
    assert result.lse[0, 0] == pytest.approx([qk[0, 0, 0] @ unit[1], qk[0, 0, 1] @ unit[0]], rel=1e-15)


def test_one_round_one_chunk_is_full_attention_with_the_self_value():
    qk, v, params = problem(1, n=8, num_hashes=1)
    result = lsh_attention(qk, v, **params, chunk_len=8, num_chunks_before=0, causal=True)
    keys = normalised_keys(qk)
    logits = np.einsum("bhid,bhjd->bhij", qk, keys)
    logits = np.where(np.tril(np.ones((8, 8), bool), -1), logits, -np.inf)
    logits[..., np.arange(8), np.arange(8)] = -1e5
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("bhij,bhje->bhie", weights / weights.sum(-1, keepdims=True), v)
    assert np.allclose(result.out, expected, rtol=0, atol=1e-13)
    # Token 0 sees only itself: out v_0, lse the self value exactly.
    assert np.array_equal(result.out[..., 0, :], v[..., 0, :]) and np.all(result.lse[..., 0] == -1e5)


def test_self_only_token_under_several_rounds():
    """Causal token 0 has only itself, n_00 times over its windows: lse = -1e5 + log n_00 (replace), s_00 - 1e5 + log n_00 (add)."""
    qk, v, params = problem(2, n=16, num_hashes=3)
    for mode in ("replace", "add"):
        result = lsh_attention(qk, v, **params, chunk_len=4, causal=True, mask_mode=mode, mask_value=-1e9)
        n00 = properties.window_counts(result.aux["buckets"], 4, 1, 0)[..., 0, 0]
        own = 0.0 if mode == "replace" else np.einsum("bhd,bhd->bh", qk[..., 0, :], normalised_keys(qk)[..., 0, :])
        assert np.allclose(result.lse[..., 0], -1e5 + own + np.log(n00), rtol=0, atol=1e-9)
        # The round weights exp(lse_r - LSE) are formed from numbers near -1e5: float64 keeps them to ~1e-11.
        assert np.allclose(result.out[..., 0, :], v[..., 0, :], rtol=0, atol=1e-10)


def test_rounds_combine_by_their_lse():
    qk, v, params = problem(3, n=16, num_hashes=3)
    result = lsh_attention(qk, v, **params, chunk_len=4, return_rounds=True)
    weights = np.exp(result.aux["round_lse"] - result.lse[:, :, None])
    assert np.allclose(np.sum(weights, axis=2), 1.0, rtol=0, atol=1e-14)
    assert np.allclose(np.einsum("bhrn,bhrne->bhne", weights, result.aux["round_out"]), result.out, rtol=0, atol=1e-14)


def test_short_sequence_is_one_dense_round():
    qk, v, params = problem(4, n=12, num_hashes=3)
    short = lsh_attention(qk, v, **params, chunk_len=16, preset="hf")
    assert short.aux == {}
    single = lsh_attention(qk, v, **{**params, "rotations": params["rotations"][:, :1], "num_hashes": 1}, chunk_len=12,
                           num_chunks_before=0)  # fmt: skip
    assert np.allclose(short.out, single.out, rtol=0, atol=1e-14) and np.allclose(short.lse, single.lse, rtol=0, atol=1e-14)


def test_duplicate_correction_counts_every_visible_key_once():
    """With the correction, the output is plain attention over the union of the windows."""
    qk, v, params = problem(5, n=16, num_hashes=4, num_buckets=2)
    result = lsh_attention(qk, v, **params, chunk_len=4, dup_correction=True)
    counts = properties.window_counts(result.aux["buckets"], 4, 1, 0)
    logits = np.einsum("bhid,bhjd->bhij", qk, normalised_keys(qk))
    logits[..., np.arange(16), np.arange(16)] = -1e5
    logits = np.where(counts > 0, logits, -np.inf)
    lse = np.log(np.sum(np.exp(logits), axis=-1))
    assert np.allclose(result.lse, lse, rtol=0, atol=1e-12)
    assert np.allclose(result.out, np.einsum("bhij,bhje->bhie", np.exp(logits - lse[..., None]), v), rtol=0, atol=1e-12)


def test_lucidrains_same_round_count_misses_cross_round_windows():
    """The count reformer-pytorch computes (same-round locations) is below the true one for keys
    that a round's first chunk sees in the previous round (or, for round 0, by wrapping)."""
    qk, v, params = problem(6, n=16, num_hashes=2)
    buckets = lsh_attention(qk, v, **params, chunk_len=4).aux["buckets"]
    _, inverse = sort_items(buckets)
    chunk = (inverse // 4).reshape(buckets.shape)  # (B, H, R, N)
    c = 2 * 16 // 4
    # Key j's round-r copy is in query i's round-r window: the same chunk, or the one before.
    query, key = chunk[..., :, :, None], chunk[..., :, None, :]  # (B, H, R, N, 1), (B, H, R, 1, N)
    same_round = np.sum((key == query) | ((key + 1) % c == query), axis=2)  # (B, H, N, N)
    true = properties.window_counts(buckets, 4, 1, 0)
    assert np.all(same_round <= true) and np.any((same_round == 0) & (true > 0))


def test_causal_outputs_ignore_later_values():
    qk, v, params = problem(7, n=16, padded=(3,))
    properties.causal_prefix(lsh_attention, qk, v, dict(params, chunk_len=4, causal=True))


# --- the dense identity, at random sizes ----------------------------------------------


@st.composite
def lsh_problems(draw):
    """Random sizes and options (no margins needed: the identity holds for whatever buckets come out)."""
    b, h, n, d = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 20)), draw(st.integers(1, 6))
    num_hashes = draw(st.integers(1, 4))
    num_buckets = draw(st.sampled_from([2, 4, 6, [2, 2], [4, 2]]))
    half = sum(num_buckets if isinstance(num_buckets, list) else [num_buckets]) // 2
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    params = preset_values(PRESETS[draw(st.sampled_from(list(PRESETS)))])  # spelled out: no preset length rules
    params.update(
        rotations=rng.standard_normal(((b,) if draw(st.booleans()) else ()) + (h, num_hashes, d, half)),
        num_buckets=num_buckets, num_hashes=num_hashes, chunk_len=draw(st.integers(1, 12)),
        num_chunks_before=draw(st.integers(0, 2)), num_chunks_after=draw(st.integers(0, 2)), causal=draw(st.booleans()),
        dup_correction=draw(st.booleans()),
    )  # fmt: skip
    for name, options in (("mask_mode", ["replace", "add"]), ("mask_value", [None, -1e9]), ("short_sequence", ["lsh", "full"])):
        if draw(st.booleans()):
            params[name] = draw(st.sampled_from(options))
    if draw(st.booleans()):
        params["key_padding_mask"] = rng.random((b, n)) < 0.7
    qk = draw(st.sampled_from([0.5, 1.0, 3.0])) * rng.standard_normal((b, h, n, d))
    return qk, rng.standard_normal((b, h, n, draw(st.integers(1, 4)))), params


@given(lsh_problems())
def test_dense_identity(problem_):
    """out and lse are one softmax over the keys weighted by their window counts (properties.lsh_as_dense)."""
    qk, v, params = problem_
    properties.dense_identity(lsh_attention, qk, v, params, rtol=1e-10)


@given(lsh_problems())
def test_chunk_offset_counts_equal_enumerated_counts(problem_):
    """The reference's n_ij (chunk-offset formula) equals the counts found by enumerating windows."""
    qk, v, params = problem_
    params = dict(params, short_sequence="lsh")
    buckets = lsh_attention(qk, v, **params).aux["buckets"]
    b, h, r, n = buckets.shape
    _, inverse = sort_items(buckets)
    chunk_len, before, after = params["chunk_len"], params["num_chunks_before"], params["num_chunks_after"]
    multiplicity = window_multiplicity(-(-(r * n) // chunk_len), before, after)
    positions = np.broadcast_to(np.arange(n), (b, h, n))
    counts = pair_counts((inverse // chunk_len).reshape(b, h, r, n), positions, positions, multiplicity)
    assert np.array_equal(counts, properties.window_counts(buckets, chunk_len, before, after))


# --- gradients: central differences, buckets held fixed ----------------------------------

GRADIENT_SETTINGS = {
    "canonical": dict(chunk_len=4),
    "causal_padded": dict(chunk_len=4, causal=True, padded=(0, 5)),
    "dup_correction_look_ahead": dict(chunk_len=4, dup_correction=True, num_chunks_after=1),
    "trax_add_mode": dict(chunk_len=8, preset="trax", padded=(0, 6)),
    "lucidrains_l2": dict(chunk_len=8, preset="lucidrains", padded=(4, 0)),
    "short_sequence": dict(chunk_len=16, preset="hf", causal=True),
    "factorised_partial_chunk": dict(chunk_len=5, num_buckets=[2, 4]),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_SETTINGS))
def test_vjp_matches_central_differences(name):
    setting = dict(GRADIENT_SETTINGS[name])
    qk, v, params = problem(8, b=2, n=16, num_buckets=setting.pop("num_buckets", 4), padded=setting.pop("padded", ()))
    params.update(setting)
    rng = np.random.default_rng(9)
    result = lsh_attention(qk, v, **params)
    dout, dlse = rng.standard_normal(result.out.shape), rng.standard_normal(result.lse.shape)
    grads = lsh_attention_vjp(dout, qk, v, dlse=dlse, **params)

    def loss(qk_, v_):
        moved = lsh_attention(qk_, v_, **params)
        assert all(np.array_equal(moved.aux[k], result.aux[k]) for k in result.aux)  # the margin holds the buckets
        return np.sum(moved.out * dout) + np.sum((moved.lse - result.lse) * dlse)  # lse near -1e5 cancels first

    step = 1e-6
    for _ in range(3):
        d_qk, d_v = rng.standard_normal(qk.shape), rng.standard_normal(v.shape)
        numeric = (loss(qk + step * d_qk, v + step * d_v) - loss(qk - step * d_qk, v - step * d_v)) / (2 * step)
        analytic = np.sum(grads.qk * d_qk) + np.sum(grads.v * d_v)
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-6)


def test_gradient_includes_the_key_normalisation():
    """Scaling a token's vector moves its key only through eps, so along that direction the key path of
    the gradient is (almost) 0: a VJP that treats the norm ρ as a constant fails here."""
    qk, v, params = problem(10, n=8, num_hashes=1)
    params.update(chunk_len=8, num_chunks_before=0)
    grads = lsh_attention_vjp(np.ones((1, 2, 8, 5)), qk, v, **params)
    radial = np.zeros_like(qk)
    radial[:, :, 3] = qk[:, :, 3]
    step = 1e-6
    plus = lsh_attention(qk + step * radial, v, **params).out.sum()
    minus = lsh_attention(qk - step * radial, v, **params).out.sum()
    assert (plus - minus) / (2 * step) == pytest.approx(np.sum(grads.qk * radial), rel=1e-6)


def test_lower_precision_keeps_the_buckets():
    for case in cases():
        arrays = case.arrays(np.random.default_rng(case.seed))
        margins = bucket_margins(arrays["qk"], arrays["rotations"], case.params["num_buckets"])
        if "LSH_TIES" in case.flags:  # the zero token ties exactly (margin 0) in every precision
            zero = ~np.any(arrays["qk"], axis=-1)[:, :, None, :]  # (B, H, 1, N)
            margins = np.where(zero, np.inf, margins)
        assert np.min(margins) >= MIN_MARGIN
        for precision in ("float32", "float16", "bfloat16"):
            params = {name: arrays[name] for name in arrays if name not in ("qk", "v")}
            low = lsh_attention(arrays["qk"], arrays["v"], **case.params, **params, precision=precision)
            high = lsh_attention(arrays["qk"], arrays["v"], **case.params, **params)
            assert np.array_equal(low.aux.get("buckets"), high.aux.get("buckets")), (case.id, precision)
    qk, v, params = problem(11, n=16)
    base = lsh_attention(qk, v, **params, chunk_len=4)
    for precision in ("float32", "float16", "bfloat16"):
        low = lsh_attention(qk, v, **params, chunk_len=4, precision=precision)
        assert np.array_equal(low.aux["buckets"], base.aux["buckets"])
        assert np.allclose(low.out, base.out, atol=0.1)


# --- presets ---------------------------------------------------------------------------


def test_presets_state_each_implementation_s_constants():
    hf, trax, lucidrains, canonical = (PRESETS[name] for name in ("hf", "trax", "lucidrains", None))
    assert (hf.self_mask_value, hf.mask_value, hf.self_mask_value_float16, hf.mask_value_float16) == (-1e5, -1e9, -1e3, -1e4)
    assert (hf.mask_mode, hf.padding_bucket, hf.short_sequence, hf.length_rule) == ("replace", "if_padded", "full", "rounds_multiple")
    assert (trax.mask_mode, trax.mask_value, trax.self_mask_value, trax.padding_bucket) == ("add", -1e9, -1e5, "if_mask")
    assert lucidrains.self_mask_value == lucidrains.self_mask_value_float16 == -5e4
    assert lucidrains.mask_value == -float(np.finfo(np.float32).max)
    assert (lucidrains.key_norm, lucidrains.key_norm_eps, lucidrains.scale) == ("l2", 1e-12, None)
    assert (lucidrains.mask_padded_queries, lucidrains.padding_bucket, lucidrains.length_rule) == (True, "none", "double_chunk")
    assert (canonical.mask_value, canonical.scale, canonical.key_norm, canonical.key_norm_eps) == (None, 1.0, "rms", 1e-6)
    assert all(p.num_chunks_before == 1 and p.num_chunks_after == 0 and not p.dup_correction for p in PRESETS.values())


def test_a_preset_equals_its_values_spelled_out_and_explicit_arguments_win():
    qk, v, params = problem(12, n=16, padded=(3,))
    by_name = lsh_attention(qk, v, **params, chunk_len=8, preset="lucidrains")
    spelled = lsh_attention(qk, v, **params, chunk_len=8, **preset_values(PRESETS["lucidrains"]))
    assert np.array_equal(by_name.out, spelled.out) and np.array_equal(by_name.lse, spelled.lse)
    overridden = lsh_attention(qk, v, **params, chunk_len=8, preset="lucidrains", scale=1.0)
    assert not np.allclose(overridden.out, by_name.out)
    assert overridden.out == pytest.approx(
        lsh_attention(qk, v, **params, chunk_len=8, **{**preset_values(PRESETS["lucidrains"]), "scale": 1.0}).out
    )


def test_masked_value_matters_only_without_the_self_entry():
    """Replace mode: -1e9 and exact exclusion agree (every row keeps its self entry); add mode they do not."""
    qk, v, params = problem(13, n=16, padded=(10,))
    exact = lsh_attention(qk, v, **params, chunk_len=4, causal=True)
    finite = lsh_attention(qk, v, **params, chunk_len=4, causal=True, mask_value=-1e9)
    assert np.array_equal(exact.out, finite.out)
    added = lsh_attention(qk, v, **params, chunk_len=4, causal=True, mask_value=-1e9, mask_mode="add")
    assert not np.allclose(added.out, exact.out)


def test_registered():
    mechanism = registry.get("lsh")
    assert mechanism.forward is lsh_attention and mechanism.vjp is lsh_attention_vjp
    assert mechanism.check_inputs is check_lsh_inputs and mechanism.positional == ("qk", "v")
    assert mechanism.backends == ("reference", "numba", "cupy") and mechanism.spec == "spec/lsh.md"


# --- bad input --------------------------------------------------------------------------

BAD_INPUT = {
    "odd bucket count": (dict(num_buckets=5), "num_buckets"),
    "odd factor": (dict(num_buckets=[4, 3]), "num_buckets"),
    "empty factors": (dict(num_buckets=[]), "num_buckets"),
    "chunk_len 0": (dict(chunk_len=0), "chunk_len"),
    "chunk_len float": (dict(chunk_len=4.0), "chunk_len"),
    "num_hashes 0": (dict(num_hashes=0), "num_hashes"),
    "rotations of 3 rounds for num_hashes 2": (dict(rotations=np.zeros((2, 3, 6, 2))), "rotations"),
    "rotations in HF's layout": (dict(rotations=np.zeros((2, 6, 2, 2))), "rotations"),
    "rotations for 4 buckets, 8 asked": (dict(num_buckets=8), "rotations"),
    "rotations with NaN": (dict(rotations=np.full((2, 2, 6, 2), np.nan)), "rotations"),
    "hf: num_hashes·N not a multiple of chunk_len": (dict(preset="hf", chunk_len=12), "chunk_len"),
    "trax: num_hashes·N not a multiple of chunk_len": (dict(preset="trax", chunk_len=5), "chunk_len"),
    "lucidrains: N not a multiple of 2·chunk_len": (dict(preset="lucidrains", chunk_len=12), "chunk_len"),
    "unknown preset": (dict(preset="fairseq"), "preset"),
    "mask of ints": (dict(key_padding_mask=np.ones((1, 16), dtype=int)), "key_padding_mask"),
    "mask of one row per head": (dict(key_padding_mask=np.ones((2, 16), dtype=bool)), "key_padding_mask"),
    "infinite mask value": (dict(mask_value=-np.inf), "mask_value"),
    "self mask None": (dict(self_mask_value=None), "self_mask_value"),
    "unknown mask mode": (dict(mask_mode="subtract"), "mask_mode"),
    "unknown key norm": (dict(key_norm="l1"), "key_norm"),
    "eps 0": (dict(key_norm_eps=0.0), "key_norm_eps"),
    "negative look-back": (dict(num_chunks_before=-1), "num_chunks_before"),
    "unknown padding rule": (dict(padding_bucket="always"), "padding_bucket"),
    "causal 1": (dict(causal=1), "causal"),
    "return_rounds 1": (dict(return_rounds=1), "return_rounds"),
    "scale 0": (dict(scale=0.0), "scale"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_input_is_rejected_naming_the_argument(name):
    changes, argument = BAD_INPUT[name]
    qk, v, params = problem(14, n=16)
    params = {**params, "chunk_len": 4, **changes}
    with pytest.raises(SpecError) as error:
        lsh_attention(qk, v, **params)
    assert error.value.argument == argument
    with pytest.raises(SpecError):
        lsh_attention_vjp(np.zeros((1, 2, 16, 5)), qk, v, **params)


@pytest.mark.parametrize("where", ["qk", "v"])
def test_non_finite_inputs_are_rejected(where):
    qk, v, params = problem(15, n=8)
    arrays = {"qk": qk.copy(), "v": v.copy()}
    arrays[where][0, 1, 3, 2] = np.inf
    with pytest.raises(SpecError, match=r"index \(0, 1, 3, 2\)") as error:
        lsh_attention(arrays["qk"], arrays["v"], **params, chunk_len=4)
    assert error.value.argument == where


def test_shapes_are_checked():
    qk, v, params = problem(16, n=8)
    with pytest.raises(SpecError, match="as qk"):
        lsh_attention(qk, v[:, :, :5], **params, chunk_len=4)
    with pytest.raises(SpecError, match="4 dimensions"):
        lsh_attention(qk[0], v, **params, chunk_len=4)
    with pytest.raises(SpecError, match="shape"):
        lsh_attention_vjp(np.zeros((1, 2, 8, 4)), qk, v, **params, chunk_len=4)
    assert math.isfinite(lsh_attention(qk, v, **params, chunk_len=4).lse.sum())
