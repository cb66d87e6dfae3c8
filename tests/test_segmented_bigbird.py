"""BigBird against two transcriptions written here: the paper's pattern as a set of key blocks per
query block (Zaheer et al. 2020, section 2), and HF's BigBirdBlockSparseAttention as the list of
key-block columns it concatenates for each query block (repeats counted)."""

import math

import numpy as np
import pytest

from refattn import SpecError, dense_attention
from refattn.segmented import bigbird_attention, bigbird_attention_vjp
from refattn.segmented.bigbird import properties
from refattn.segmented.pattern import depends_only_on_pattern
from tests.finite_differences import finite_differences


def _paper_blocks(t, nb, random_row):
    """The set of key blocks query block t attends to: global, sliding, random."""
    if t in (0, nb - 1):
        return set(range(nb))
    return {0, nb - 1, t - 1, t, t + 1} | set(int(s) for s in random_row)


def _hf_columns(t, nb, random_row):
    """HF's key-block columns for query block t (first/last: all; second and second-to-last: four
    fixed blocks; middle: sliding, first, last), then the random blocks, repeats kept."""
    if t in (0, nb - 1):
        return list(range(nb))
    if t == 1:
        fixed = [0, 1, 2, nb - 1]
    elif t == nb - 2:
        fixed = [0, nb - 3, nb - 2, nb - 1]
    else:
        fixed = [t - 1, t, t + 1, 0, nb - 1]
    return fixed + [int(s) for s in random_row]


def _expected(q, k, v, block, random_blocks, columns_of):
    b_size, hq, n, _ = q.shape
    nb, group = n // block, hq // k.shape[1]
    out, lse = np.zeros(q.shape[:3] + (v.shape[3],)), np.zeros(q.shape[:3])
    for b in range(b_size):
        for h in range(hq):
            for i in range(n):
                t = i // block
                row = random_blocks[h, t - 1] if 1 <= t <= nb - 2 else []
                keys = [s * block + c for s in columns_of(t, nb, row) for c in range(block)]
                s = np.array([q[b, h, i] @ k[b, h // group, j] / math.sqrt(q.shape[3]) for j in keys])
                p = np.exp(s - s.max())
                out[b, h, i] = sum(pj * v[b, h // group, j] for pj, j in zip(p, keys)) / p.sum()
                lse[b, h, i] = s.max() + math.log(p.sum())
    return out, lse


def _problem(seed, nb=8, block=2, hq=2, hkv=1, d=4, r=2, avoid=False):
    rng = np.random.default_rng(seed)
    n = nb * block
    q, k, v = rng.standard_normal((1, hq, n, d)), rng.standard_normal((1, hkv, n, d)), rng.standard_normal((1, hkv, n, 3))
    if avoid:
        random_blocks = np.array([[rng.choice([s for s in range(1, nb - 1) if abs(s - t) > 1], r, replace=False)
                                   for t in range(1, nb - 1)] for _ in range(hq)])  # fmt: skip
    else:
        random_blocks = rng.integers(0, nb, (hq, nb - 2, r))
    return q, k, v, random_blocks


def test_canonical_is_the_papers_union():
    q, k, v, random_blocks = _problem(1)
    random_blocks[0, 2, 0] = 3  # a random block that is also a sliding block: counted once
    got = bigbird_attention(q, k, v, block_size=2, random_blocks=random_blocks)
    want = _expected(q, k, v, 2, random_blocks, lambda t, nb, row: sorted(_paper_blocks(t, nb, row)))
    np.testing.assert_allclose(got.out, want[0], atol=1e-12)
    np.testing.assert_allclose(got.lse, want[1], atol=1e-12)


@pytest.mark.parametrize("preset", ["hf", "hf_train"])
def test_hf_presets_are_hfs_columns(preset):
    q, k, v, random_blocks = _problem(2, nb=10, avoid=preset == "hf_train")  # N = 20 > (5 + 2 r) * 2
    if preset == "hf":
        random_blocks[:] = 0  # HF eval mode
    got = bigbird_attention(q, k, v, block_size=2, random_blocks=random_blocks, preset=preset)
    want = _expected(q, k, v, 2, random_blocks, _hf_columns)
    np.testing.assert_allclose(got.out, want[0], atol=1e-12)
    np.testing.assert_allclose(got.lse, want[1], atol=1e-12)


def test_hf_eval_weights_block_zero_one_plus_r_times():
    """HF eval (random indices all 0) is ITC with key block 0 weighted 1 + r times on middle query blocks."""
    q, k, v, random_blocks = _problem(3, nb=10, r=2)
    got = bigbird_attention(q, k, v, block_size=2, random_blocks=np.zeros_like(random_blocks), preset="hf")
    n, block = q.shape[2], 2
    bias = np.zeros((n, n))
    bias[2:n - 2, :block] = math.log(3)
    allowed = np.array([[(j // 2) in _paper_blocks(i // 2, 10, []) for j in range(n)] for i in range(n)])
    want = dense_attention(q, k, v, mask=allowed, bias=bias)
    np.testing.assert_allclose(got.out, want.out, atol=1e-12)


def test_hf_short_sequences_are_full_attention():
    q, k, v, random_blocks = _problem(4, nb=7, r=1)  # N = 14 <= (5 + 2) * 2
    got = bigbird_attention(q, k, v, block_size=2, random_blocks=random_blocks, preset="hf")
    np.testing.assert_allclose(got.out, dense_attention(q, k, v).out, atol=1e-13)


def test_global_rows_are_dense_attention():
    q, k, v, random_blocks = _problem(5)
    properties.global_blocks_are_dense(bigbird_attention, dense_attention, q, k, v,
                                       dict(block_size=2, random_blocks=random_blocks))  # fmt: skip


def test_three_blocks_are_dense_attention():
    q, k, v, _ = _problem(5, nb=3)
    properties.three_blocks_are_dense(bigbird_attention, dense_attention, q, k, v, dict(block_size=2))


@pytest.mark.parametrize("construction, change", [
    ("itc", dict(preset=None)),
    ("itc", dict(preset="hf")),
    ("etc", dict(count_repeated_blocks=False)),
    ("etc", dict(count_repeated_blocks=True)),
])  # fmt: skip
def test_vjp_matches_finite_differences(construction, change):
    if construction == "itc":
        q, k, v, random_blocks = _problem(6, nb=6, block=1, d=3, r=1)
        params = dict(block_size=1, random_blocks=random_blocks, short_sequence_full=False, **change)
    else:
        q, k, v, random_blocks = _etc_problem(12, g=2, nb=5, block=1, r=2)
        params = dict(block_size=1, random_blocks=random_blocks, extra_global_tokens=2, **change)
    arrays = dict(q=q, k=k, v=v)
    rng = np.random.default_rng(7)
    result = bigbird_attention(**arrays, **params)
    dout, dlse = rng.standard_normal(result.out.shape), rng.standard_normal(result.lse.shape)
    grads = bigbird_attention_vjp(dout, **arrays, **params, dlse=dlse)
    for name in arrays:
        want = finite_differences(bigbird_attention, arrays, params, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, rtol=1e-6, atol=1e-8, err_msg=name)


def test_output_depends_only_on_the_pattern():
    q, k, v, random_blocks = _problem(8, nb=7, hq=1)
    n = q.shape[2]
    allowed = np.array([[(j // 2) in _paper_blocks(i // 2, 7, random_blocks[0, i // 2 - 1] if 1 <= i // 2 <= 5 else [])
                         for j in range(n)] for i in range(n)])[None, None]  # fmt: skip
    depends_only_on_pattern(bigbird_attention, bigbird_attention_vjp, q, k, v,
                            dict(block_size=2, random_blocks=random_blocks), allowed)  # fmt: skip


# --------------------------------------------------------------------------
# ETC (Zaheer et al. 2020, section 2, "global tokens": BIGBIRD-ETC)
# --------------------------------------------------------------------------


def _etc_problem(seed, g=3, nb=6, block=2, hq=2, hkv=1, r=2):
    rng = np.random.default_rng(seed)
    n = g + nb * block
    q, k, v = rng.standard_normal((1, hq, n, 4)), rng.standard_normal((1, hkv, n, 4)), rng.standard_normal((1, hkv, n, 3))
    return q, k, v, rng.integers(0, nb, (hq, nb, r))


def _etc_mask(g, nb, block, random_blocks):
    """The paper's B, one (i, j) at a time: B[i, :] = B[:, i] = 1 for the g extra tokens, B[g + i, g + j] = A[i, j]
    with A the sliding blocks and the random blocks of block(i) (row block(i): every sequence block has one)."""
    heads, n = random_blocks.shape[0], g + nb * block
    mask = np.zeros((1, heads, n, n), dtype=bool)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                if i < g or j < g:
                    mask[0, h, i, j] = True
                    continue
                t, s = (i - g) // block, (j - g) // block
                mask[0, h, i, j] = abs(t - s) <= 1 or s in random_blocks[h, t]
    return mask


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_etc_is_dense_attention_under_the_papers_mask(backend):
    q, k, v, random_blocks = _etc_problem(10)
    random_blocks[1, 2, 0] = 3  # a random block that is also sliding: one key, counted once
    got = bigbird_attention(q, k, v, block_size=2, random_blocks=random_blocks, extra_global_tokens=3, backend=backend)
    want = dense_attention(q, k, v, mask=_etc_mask(3, 6, 2, random_blocks))
    np.testing.assert_allclose(got.out, want.out, atol=1e-12)
    np.testing.assert_allclose(got.lse, want.lse, atol=1e-12)


def test_etc_extra_global_tokens_are_dense_attention():
    q, k, v, random_blocks = _etc_problem(11)
    properties.extra_global_tokens_are_dense(bigbird_attention, dense_attention, q, k, v,
                                             dict(block_size=2, random_blocks=random_blocks, extra_global_tokens=3))  # fmt: skip


def test_etc_output_depends_only_on_the_pattern():
    q, k, v, random_blocks = _etc_problem(14, hq=1, r=1)
    depends_only_on_pattern(bigbird_attention, bigbird_attention_vjp, q, k, v,
                            dict(block_size=2, random_blocks=random_blocks, extra_global_tokens=3),
                            _etc_mask(3, 6, 2, random_blocks))  # fmt: skip


@pytest.mark.parametrize("change, name", [
    (dict(extra_global_tokens=-1), "extra_global_tokens"),
    (dict(extra_global_tokens=15), "extra_global_tokens"),
    (dict(extra_global_tokens=2), "block_size"),
    (dict(preset="hf"), "preset"),
    (dict(short_sequence_full=True), "short_sequence_full"),
    (dict(random_blocks=np.zeros((2, 4, 1), dtype=int)), "random_blocks"),
    (dict(random_blocks=np.full((2, 6, 1), 6)), "random_blocks"),
    (dict(random_blocks=np.full((2, 6, 1), 1), random_blocks_avoid_pattern=True), "random_blocks"),
])  # fmt: skip
def test_etc_bad_input(change, name):
    q, k, v, random_blocks = _etc_problem(15)  # N = 3 + 12
    params = dict(dict(block_size=2, random_blocks=random_blocks, extra_global_tokens=3), **change)
    with pytest.raises(SpecError) as error:
        bigbird_attention(q, k, v, **params)
    assert error.value.argument == name


@pytest.mark.parametrize("change, name", [
    (dict(block_size=3), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(random_blocks=np.full((2, 6, 1), 8)), "random_blocks"),
    (dict(random_blocks=np.full((2, 6, 1), -1)), "random_blocks"),
    (dict(random_blocks=np.zeros((2, 5, 1), dtype=int)), "random_blocks"),
    (dict(random_blocks=np.zeros((2, 6, 1))), "random_blocks"),
    (dict(random_blocks=np.zeros((2, 6, 1), dtype=int), preset="hf_train"), "random_blocks"),
    (dict(random_blocks=np.full((2, 6, 1), 4), preset="hf_train"), "random_blocks"),
    (dict(preset="google"), "preset"),
    (dict(count_repeated_blocks=1), "count_repeated_blocks"),
])  # fmt: skip
def test_bad_input(change, name):
    q, k, v, _ = _problem(9)
    params = dict(dict(block_size=2), **change)
    with pytest.raises(SpecError) as error:
        bigbird_attention(q, k, v, **params)
    assert error.value.argument == name
