"""H-Transformer-1D (refattn.hierarchical.h1d) against independent transcriptions.

The expected values are built here, by loops over levels and blocks written
from the definitions in spec/hierarchical.md (the paper's hierarchical matrix)
and from h-transformer-1d 0.1.9's source (the ``lucidrains`` preset), never
from the code under test.
"""

import numpy as np
import pytest

import refattn
from refattn.hierarchical import h1d_attention, h1d_attention_vjp
from refattn.hierarchical.h1d import properties
from tests.finite_differences import finite_differences


def qkv(rng, b=1, h=2, n=16, d=5, dv=None, hkv=None):
    hkv = h if hkv is None else hkv
    return (rng.standard_normal((b, h, n, d)), rng.standard_normal((b, hkv, n, d)),
            rng.standard_normal((b, hkv, n, dv or d)))  # fmt: skip


# --------------------------------------------------------------------------
# The paper's hierarchical matrix, transcribed by loops.
# --------------------------------------------------------------------------


def coverage(n, block, levels, causal=False, neighbours="tridiagonal"):
    """(level, count): which level covers each (query, key) pair, and how many levels do, counted pair by pair.

    Transcribed from the authors' code (google/flaxformer, flaxformer/architectures/h_transformer/, commit
    399ea3a85e9807ada653fd0de1a9de627eb0acde): at every level each block meets the block before and after it
    (``TokenBlockName.LEFT``, ``RIGHT``; causal: only before), level 0 also itself (``ANCHOR``, triangular when
    causal), and at levels >= 1 the quarter of a neighbour pair made of adjacent half-blocks is zeroed
    (``OneDimHierarchicalAttention._gen_correction_mask``). ``neighbours="siblings"``: block 2m meets 2m + 1.
    """
    level_of = np.full((n, n), -1)
    count = np.zeros((n, n), dtype=int)
    for level in range(levels):
        width = block << level  # tokens per block at this level
        half = width // 2
        blocks = n // width
        for qb in range(blocks):
            for kb in range(blocks):
                own = level == 0 and qb == kb
                near = kb == qb ^ 1 if neighbours == "siblings" else abs(kb - qb) == 1
                if causal and near and kb > qb:
                    continue
                if not (own or near):
                    continue
                for i in range(qb * width, (qb + 1) * width):
                    for j in range(kb * width, (kb + 1) * width):
                        if causal and own and j > i:
                            continue
                        first_i, first_j = i - qb * width < half, j - kb * width < half
                        if neighbours == "tridiagonal" and level > 0 and kb == qb - 1 and first_i and not first_j:
                            continue  # the left block's correction: adjacent half-blocks
                        if neighbours == "tridiagonal" and level > 0 and kb == qb + 1 and not first_i and first_j:
                            continue  # the right block's
                        level_of[i, j] = level
                        count[i, j] += 1
    return level_of, count


def implied_logits(q, k, block, levels, scale, causal=False):
    """(B, H, N, N) logits of the implied matrix: scale · q̃ · mean(k over j's group), -inf uncovered.

    q̃ is the mean of q over i's group, or (causal) the query of the group's first token (the authors' decoder
    coarsens queries by ``TokenCoarseningMethod.SAMPLE``, token_hierarchy.py).
    """
    n = q.shape[2]
    level_of, _ = coverage(n, block, levels, causal)
    logits = np.full(q.shape[:2] + (n, n), -np.inf)
    for i in range(n):
        for j in range(n):
            level = level_of[i, j]
            if level < 0:
                continue
            size = 1 << level
            group = q[:, :, (i // size) * size:(i // size + 1) * size]
            qi = group[:, :, 0] if causal else group.mean(axis=2)
            kj = k[:, :, (j // size) * size:(j // size + 1) * size].mean(axis=2)
            logits[:, :, i, j] = scale * np.sum(qi * kj, axis=-1)
    return logits


def implied_attention(q, k, v, block, levels, causal=False, scale=None):
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = implied_logits(q, k, block, levels, scale, causal)
    top = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - top)
    weights = e / e.sum(axis=-1, keepdims=True)
    lse = (top + np.log(e.sum(axis=-1, keepdims=True)))[..., 0]
    return weights @ v, lse


@pytest.mark.parametrize("n, block, causal, neighbours", [(16, 2, False, "tridiagonal"), (16, 4, True, "tridiagonal"),
                                                           (32, 4, False, "tridiagonal"), (64, 4, True, "tridiagonal"),
                                                           (8, 8, False, "tridiagonal"), (24, 3, True, "siblings"),
                                                           (32, 4, False, "siblings")])  # fmt: skip
def test_every_pair_is_covered_by_exactly_one_level(n, block, causal, neighbours):
    levels = max(1, int(np.log2(n // block)))
    _, count = coverage(n, block, levels, causal, neighbours)
    want = np.tril(np.ones((n, n), dtype=int)) if causal else np.ones((n, n), dtype=int)
    np.testing.assert_array_equal(count, want)


@pytest.mark.parametrize("n, block, causal", [(16, 2, False), (16, 4, True), (32, 8, False), (24, 6, False), (24, 6, True),
                                              (64, 4, False), (64, 2, True)])  # fmt: skip
def test_equals_the_implied_matrix_built_by_loops(n, block, causal):
    q, k, v = qkv(np.random.default_rng(n + block), n=n)
    levels = max(1, int(np.log2(n // block)))
    want_out, want_lse = implied_attention(q, k, v, block, levels, causal)
    got = h1d_attention(q, k, v, block_size=block, causal=causal)
    np.testing.assert_allclose(got.out, want_out, atol=1e-12)
    np.testing.assert_allclose(got.lse, want_lse, atol=1e-12)


def test_fewer_levels_leave_the_far_pairs_out():
    q, k, v = qkv(np.random.default_rng(3), n=32)
    want_out, want_lse = implied_attention(q, k, v, 4, 2)
    got = h1d_attention(q, k, v, block_size=4, num_levels=2)
    np.testing.assert_allclose(got.out, want_out, atol=1e-12)
    np.testing.assert_allclose(got.lse, want_lse, atol=1e-12)


def test_one_level_with_block_n_is_dense_attention():
    q, k, v = qkv(np.random.default_rng(4), n=12, hkv=1, dv=3)
    properties.one_block_is_dense(h1d_attention, q, k, v, {"block_size": 12})
    properties.one_block_is_dense(h1d_attention, q, k, v, {"block_size": 12, "causal": True})


@pytest.mark.parametrize("params", [{"block_size": 4}, {"block_size": 2, "causal": True}, {"block_size": 1, "neighbours": "siblings"}])
def test_implied_rows_sum_to_one(params):
    q, k, _ = qkv(np.random.default_rng(5), n=16)
    properties.rows_sum_to_one(h1d_attention, q, k, params)


def test_lucidrains_rows_do_not_sum_to_one():
    """Unweighted coarse denominators: a coarse key adds 1 to the normaliser but the sum of 2**l values to the output."""
    q, k, _ = qkv(np.random.default_rng(5), n=16)
    with pytest.raises(AssertionError, match="row sums"):
        properties.rows_sum_to_one(h1d_attention, q, k, {"block_size": 2, "causal": True, "preset": "lucidrains"}, rtol=1e-3)


@pytest.mark.parametrize("params", [{"block_size": 4, "causal": True}, {"block_size": 2, "causal": True, "preset": "lucidrains"}])
def test_causal_outputs_ignore_later_keys(params):
    q, k, v = qkv(np.random.default_rng(6), n=16)
    for i in (0, 5, 8, 14):
        properties.ignores_later_keys(h1d_attention, q, k, v, params, i)


def test_causal_first_token_queries_ignore_later_queries():
    """Causal coarse queries are the group's first token's (the authors' decoder): no output reads a later query.
    Group means ("all") would read them."""
    q, k, v = qkv(np.random.default_rng(8), n=16)
    later = q.copy()
    later[:, :, 5:] += 1.0  # token 4 shares its level-1 group {4, 5} with a later token
    for coarse_queries, reads_later in (("first", False), ("all", True)):
        params = {"block_size": 2, "causal": True, "coarse_queries": coarse_queries}
        before, after = (h1d_attention(a, k, v, **params).out[:, :, :5] for a in (q, later))
        assert np.array_equal(before, after) != reads_later, coarse_queries


def test_padding_drops_the_padded_tokens_exactly():
    """N = 13 padded to 16: the same as the implied matrix over the 13 real tokens with means over real tokens only."""
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, n=13)
    got = h1d_attention(q, k, v, block_size=4, padding=True)
    # Pad by hand with tokens whose weight is zero: their keys' logits are -inf, and means count real tokens only.
    n, block, levels, scale = 16, 4, 2, 1 / np.sqrt(5)
    level_of, _ = coverage(n, block, levels)
    logits = np.full((1, 2, 13, 13), -np.inf)
    for i in range(13):
        for j in range(13):
            size = 1 << level_of[i, j]
            gi, gj = range((i // size) * size, min((i // size + 1) * size, 13)), range((j // size) * size, min((j // size + 1) * size, 13))
            logits[:, :, i, j] = scale * np.sum(q[:, :, list(gi)].mean(axis=2) * k[:, :, list(gj)].mean(axis=2), axis=-1)
    want = refattn.dense_attention(q, k, v, bias=logits - scale * q @ np.swapaxes(k, -1, -2))
    np.testing.assert_allclose(got.out, want.out, atol=1e-12)
    np.testing.assert_allclose(got.lse, want.lse, atol=1e-12)


# --------------------------------------------------------------------------
# h-transformer-1d 0.1.9 (lucidrains/h-transformer-1d, h_transformer_1d/h_transformer_1d.py at
# 66227df1f6923ff6834686fa7d27b6f9e19a8391), transcribed loop by loop.
# --------------------------------------------------------------------------


def lucidrains_rule(q, k, v, block, causal, eps=1e-8):
    """HAttention1D / CausalHAttention1D on one (b, h): per-entry row maxima, unweighted denominators, eps."""
    n, scale = q.shape[0], q.shape[-1] ** -0.5
    q = q * scale
    coarse_levels = int(np.log2(n // block)) - (1 if causal else 2)
    pyramid = [(q, k, v)]
    for _ in range(coarse_levels):
        q, k, v = q.reshape(-1, 2, q.shape[-1]).mean(1), k.reshape(-1, 2, k.shape[-1]).mean(1), v.reshape(-1, 2, v.shape[-1]).sum(1)
        pyramid.append((q, k, v))
    # entries: (level, sibling); non-causal duplicates the finest level for the diagonal.
    entries = [(0, False)] + ([] if causal else [(0, True)]) + [(level, True) for level in range(1, coarse_levels + 1)]
    y_total, a_total = np.zeros((n, v.shape[-1])), np.zeros(n)
    for level, sibling in entries:
        lq, lk, lv = pyramid[level]
        size = 1 << level
        blocks = lq.shape[0] // block
        for qb in range(blocks):
            kb = qb ^ 1 if sibling else qb
            if causal and sibling and qb % 2 == 0:
                continue
            s = lq[qb * block:(qb + 1) * block] @ lk[kb * block:(kb + 1) * block].T
            if causal and not sibling:
                s = np.where(np.tri(block, dtype=bool), s, -np.finfo(float).max)
            e = np.exp(s - s.max(axis=1, keepdims=True))
            y, a = e @ lv[kb * block:(kb + 1) * block], e.sum(axis=1)
            for row in range(block):
                tokens = range((qb * block + row) * size, (qb * block + row + 1) * size)
                if causal and level > 0:
                    tokens = [tokens[-1]]  # its mask keeps only the last token of each group
                for i in tokens:
                    y_total[i] += y[row]
                    a_total[i] += a[row]
    return y_total / (a_total + eps)[:, None]


@pytest.mark.parametrize("n, block, causal", [(16, 2, False), (32, 4, False), (16, 4, True), (32, 2, True)])
def test_lucidrains_preset_equals_the_library_rule(n, block, causal):
    q, k, v = qkv(np.random.default_rng(n * block), n=n)
    got = h1d_attention(q, k, v, block_size=block, causal=causal, preset="lucidrains")
    assert got.lse is None
    for h in range(2):
        np.testing.assert_allclose(got.out[0, h], lucidrains_rule(q[0, h], k[0, h], v[0, h], block, causal), atol=1e-12)


@pytest.mark.parametrize("n, block", [(16, 4), (32, 4), (64, 16), (128, 16)])
def test_lucidrains_non_causal_misses_half_of_the_pairs(n, block):
    """HAttention1D stops at 4 top blocks, paired (0,1) and (2,3): exactly half of the pairs are never attended."""
    q, k, _ = qkv(np.random.default_rng(n), h=1, n=n)
    identity = np.eye(n)[None, None]
    lucid = h1d_attention(q, k, identity, block_size=block, preset="lucidrains").out[0, 0]
    assert np.mean(lucid == 0.0) == 0.5
    assert lucid[0, n - 1] == 0.0
    paper = h1d_attention(q, k, identity, block_size=block).out[0, 0]
    assert np.all(paper > 0.0)
    # With the level count corrected every pair is covered, but the normalisation still differs from the paper.
    corrected = h1d_attention(q, k, identity, block_size=block, preset="lucidrains", num_levels=int(np.log2(n // block))).out[0, 0]
    assert np.all(corrected > 0.0)
    assert np.max(np.abs(corrected - paper)) > 1e-3


# --------------------------------------------------------------------------
# Gradients: the hand-derived VJP against central differences.
# --------------------------------------------------------------------------

GRADIENT_PROBLEMS = [
    dict(n=8, block=2, params={}),
    dict(n=8, block=2, params={"causal": True}, hkv=1),
    dict(n=7, block=2, params={"padding": True}),
    dict(n=16, block=4, params={"preset": "lucidrains"}),
    dict(n=8, block=2, params={"preset": "lucidrains", "causal": True}),
    dict(n=12, block=3, params={"neighbours": "siblings", "causal": True}),
    dict(n=16, block=2, params={"coarse_queries": "first"}),
]


@pytest.mark.parametrize("problem", GRADIENT_PROBLEMS, ids=lambda p: str(p["params"]))
def test_vjp_matches_finite_differences(problem):
    rng = np.random.default_rng(problem["n"])
    q, k, v = qkv(rng, n=problem["n"], d=3, hkv=problem.get("hkv"))
    params = dict(block_size=problem["block"], **problem["params"])
    result = h1d_attention(q, k, v, **params)
    dout = rng.standard_normal(result.out.shape)
    dlse = None if result.lse is None else rng.standard_normal(result.lse.shape)
    grads = h1d_attention_vjp(dout, q, k, v, dlse=dlse, **params)
    arrays = {"q": q, "k": k, "v": v}
    for name in arrays:
        want = finite_differences(h1d_attention, arrays, params, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, atol=1e-7, err_msg=name)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n, params, argument", [
    (12, {"block_size": 4}, "q"),  # 12 = 4 · 3, not 4 · 2**k
    (10, {"block_size": 4}, "q"),
    (16, {"block_size": 0}, "block_size"),
    (16, {"block_size": 4, "num_levels": 3}, "num_levels"),
    (16, {"block_size": 4, "num_levels": 0}, "num_levels"),
    (16, {"block_size": 4, "preset": "google"}, "preset"),
    (16, {"block_size": 4, "row_max": "global"}, "row_max"),
    (16, {"block_size": 4, "neighbours": "ring"}, "neighbours"),
    (24, {"block_size": 3}, "block_size"),  # tridiagonal levels halve the blocks
    (16, {"block_size": 4, "coarse_queries": "middle"}, "coarse_queries"),
    (16, {"block_size": 4, "denominator_eps": 1e-8}, "denominator_eps"),
    (8, {"block_size": 4, "preset": "lucidrains"}, "q"),  # HAttention1D needs N >= 4 blocks
    (13, {"block_size": 4, "padding": True, "preset": "lucidrains"}, "padding"),
])  # fmt: skip
def test_bad_input_is_a_spec_error(n, params, argument):
    q, k, v = qkv(np.random.default_rng(0), n=n)
    with pytest.raises(refattn.SpecError) as error:
        h1d_attention(q, k, v, **params)
    assert error.value.argument == argument


def test_unequal_lengths_are_a_spec_error():
    rng = np.random.default_rng(0)
    with pytest.raises(refattn.SpecError, match="k"):
        h1d_attention(rng.standard_normal((1, 1, 8, 4)), rng.standard_normal((1, 1, 16, 4)),
                      rng.standard_normal((1, 1, 16, 4)), block_size=4)  # fmt: skip
