"""LSH presets against their sources (issue 14, items 1, 5 and 7).

Each source's rule is transcribed here from the source itself, independently
of refattn's reference: trax's marks and masks (google/trax 7c189c2,
trax/layers/research/efficient_attention.py: ``LSHSelfAttention.hash_vectors``
and ``forward_unbatched``, ``attend``, ``look_adjacent``,
``mask_self_attention``) and reformer-pytorch's duplicate count
(lucidrains/reformer-pytorch 66a19b6, reformer_pytorch/reformer_pytorch.py,
``LSHAttention.forward``). Where reformer-pytorch is installed, its own
``LSHAttention`` runs the lucidrains cases too.
"""

import numpy as np
import pytest

from refattn.lsh import lsh_attention
from refattn.lsh.cases import cases


def _case(name):
    case = next(c for c in cases() if c.id == f"lsh/{name}")
    arrays = case.arrays(np.random.default_rng(case.seed))
    params = dict(case.params)
    params.update({key: arrays.pop(key) for key in list(arrays) if key not in ("qk", "v")})
    return arrays["qk"], arrays["v"], params


# --- trax, transcribed ----------------------------------------------------------


def _trax_lsh(x, v, rotations, n_buckets, n_hashes, chunk_len, causal, mask):
    """trax's LSHSelfAttention.forward_unbatched for one (example, head), NumPy float64.

    ``rotations`` is (R, D, P) (trax's (D, R, P) transposed); ``mask`` True = valid or None.
    """
    seqlen = x.shape[0]
    factors = n_buckets if isinstance(n_buckets, list) else [n_buckets]
    rotated = np.einsum("tf,hfb->htb", x, rotations)
    buckets, cur_sum, cur_product = 0, 0, 1
    for factor in factors:  # hash_vecs
        rv = rotated[..., cur_sum : cur_sum + factor // 2]
        cur_sum += factor // 2
        buckets = buckets + cur_product * np.argmax(np.concatenate([rv, -rv], axis=-1), axis=-1)
        cur_product *= factor
    total = cur_product
    if mask is not None:  # hash_vectors: an extra bucket for padding tokens only
        total += 1
        buckets = np.where(mask[None, :], buckets, total - 1)
    buckets = (buckets + np.arange(n_hashes)[:, None] * total).reshape(-1)
    ticker = np.arange(n_hashes * seqlen)
    sticker = np.argsort(seqlen * buckets + ticker % seqlen)
    undo_sort = np.argsort(sticker)
    st = sticker % seqlen
    q_info = st.copy()
    kv_info = q_info * np.where(mask[st], 1, -1) if mask is not None else None
    # attend(): 1-indexed infos, chunks, one chunk back (look_adjacent), shared-QK keys normalised.
    q_info = q_info + 1
    kv_info = q_info if kv_info is None else kv_info + 1
    sq = x[st].reshape(-1, chunk_len, x.shape[1])
    sv = v[st].reshape(-1, chunk_len, v.shape[1])
    q_info, kv_info = q_info.reshape(-1, chunk_len), kv_info.reshape(-1, chunk_len)
    k = sq / np.sqrt(np.mean(sq**2, axis=-1, keepdims=True) + 1e-6) / np.sqrt(x.shape[1])

    def look_adjacent(a):
        return np.concatenate([a, np.concatenate([a[-1:], a[:-1]], axis=0)], axis=1)

    k, sv, kv_info = look_adjacent(k), look_adjacent(sv), look_adjacent(kv_info)
    dots = np.matmul(sq, np.swapaxes(k, -1, -2))
    qi, ki = q_info[..., :, None].astype(float), kv_info[..., None, :].astype(float)
    if causal:  # mask_self_attention
        dots = dots - 1e9 * (qi < ki)
    dots = dots - 1e5 * (qi == ki)
    if mask is not None:
        dots = dots - 1e9 * (ki < 0)
    lse = np.log(np.sum(np.exp(dots - dots.max(-1, keepdims=True)), -1, keepdims=True)) + dots.max(-1, keepdims=True)
    so = np.matmul(np.exp(dots - lse), sv).reshape(-1, v.shape[1])
    slogits = lse.reshape(-1)
    o, logits = so[undo_sort].reshape(n_hashes, seqlen, -1), slogits[undo_sort].reshape(n_hashes, seqlen, 1)
    top = logits.max(0, keepdims=True)
    combined = np.log(np.sum(np.exp(logits - top), 0, keepdims=True)) + top
    return np.sum(o * np.exp(logits - combined), axis=0)


@pytest.mark.parametrize("name", ["trax_masked", "trax_leading_padding", "trax_causal"])
def test_trax_preset_is_trax(name):
    qk, v, params = _case(name)
    got = lsh_attention(qk, v, **params).out
    rotations = np.broadcast_to(params["rotations"], (qk.shape[0],) + params["rotations"].shape[-4:])
    mask = params.get("key_padding_mask")
    for b in range(qk.shape[0]):
        for h in range(qk.shape[1]):
            want = _trax_lsh(qk[b, h], v[b, h], rotations[b, h], params["num_buckets"], params["num_hashes"],
                             params["chunk_len"], params["causal"], None if mask is None else mask[b])  # fmt: skip
            np.testing.assert_allclose(got[b, h], want, rtol=0, atol=1e-6)  # logits near -1e9 carry 1e-7 rounding


@pytest.mark.parametrize("name", ["trax_masked", "trax_leading_padding"])
def test_trax_cases_fail_the_self_value_on_every_padded_self_pair(name):
    """Before issue 14 refattn gave every i == j the self value and masked padded keys by the mask alone."""
    qk, v, params = _case(name)
    new = lsh_attention(qk, v, **params).out
    old = lsh_attention(qk, v, **dict(params, padding_marks="mask")).out
    assert np.abs(new - old).max() > 0.1


# --- reformer-pytorch's duplicate count, transcribed -------------------------------


def _reformer_counts(buckets, n, chunk_len):
    """dup_counts of LSHAttention.forward: Σ_r [locs1_r(i) == locs1_r(j)] + [locs1_r(i) == locs2_r(j)]."""
    rounds = len(buckets) // n
    sticker = np.argsort(n * buckets + np.arange(rounds * n) % n, kind="stable")
    undo_sort = np.argsort(sticker)
    chunk_size = rounds * n // chunk_len
    locs1 = (undo_sort // chunk_len).reshape(rounds, n)
    locs2 = (locs1 + 1) % chunk_size
    return sum((locs1[r][:, None] == locs1[r][None, :]).astype(int) + (locs1[r][:, None] == locs2[r][None, :])
               for r in range(rounds))  # fmt: skip


def test_reformer_pytorch_count_rule_is_its_source():
    qk, v, params = _case("lucidrains_dup_correction")
    result = lsh_attention(qk, v, **params)
    n = qk.shape[2]
    exact = lsh_attention(qk, v, **dict(params, dup_count="occurrences"))
    assert np.abs(result.out - exact.out).max() > 0.1  # the defect changes the case
    # The dense form of reformer-pytorch's rule: key j weighs (occurrences) · exp(z - log32(n' + 1e-9)).
    from refattn.lsh.properties import window_counts

    buckets = result.aux["buckets"]
    occurrences = window_counts(buckets, params["chunk_len"], 1, 0)
    for h in range(qk.shape[1]):
        same_round = _reformer_counts(buckets[0, h].reshape(-1), n, params["chunk_len"])
        assert (same_round <= occurrences[0, h]).all() and (same_round < occurrences[0, h]).any()
        x, values = qk[0, h], v[0, h]
        keys = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        z = x @ keys.T / np.sqrt(x.shape[1])
        np.fill_diagonal(z, -5e4)
        log_count = np.log(same_round.astype(np.float32) + np.float32(1e-9)).astype(np.float64)
        weights = np.where(occurrences[0, h] > 0, occurrences[0, h] * np.exp(z - log_count - z.max()), 0.0)
        want = weights @ values / weights.sum(-1, keepdims=True)
        np.testing.assert_allclose(result.out[0, h], want, rtol=0, atol=1e-6)  # numpy's float32 log may differ by an ulp


# --- reformer-pytorch itself --------------------------------------------------------


@pytest.mark.parametrize("name", ["lucidrains_two_rounds", "lucidrains_padded_queries", "lucidrains_dup_correction"])
def test_lucidrains_preset_is_reformer_pytorch(name, monkeypatch):
    torch = pytest.importorskip("torch")
    reformer = pytest.importorskip("reformer_pytorch.reformer_pytorch")
    qk, v, params = _case(name)
    got = lsh_attention(qk, v, **params).out
    mask = params.get("key_padding_mask")
    for h in range(qk.shape[1]):
        rotations = torch.from_numpy(np.ascontiguousarray(params["rotations"][h].transpose(1, 0, 2)))[None]  # (1, D, R, P)
        monkeypatch.setattr(reformer.torch, "randn", lambda *shape, dtype=None, device=None, **_: rotations.to(dtype))
        attention = reformer.LSHAttention(bucket_size=params["chunk_len"], n_hashes=params["num_hashes"],
                                          causal=params["causal"],
                                          allow_duplicate_attention=not params["dup_correction"])  # fmt: skip
        with torch.no_grad():
            out, _, _ = attention(torch.from_numpy(qk[:, h]), torch.from_numpy(v[:, h]),
                                  input_mask=None if mask is None else torch.from_numpy(mask))  # fmt: skip
        np.testing.assert_allclose(got[:, h], out.numpy(), rtol=0, atol=1e-10)


# --- item 8: the padding bucket with a mask and no padded token ------------------------------


def test_if_mask_adds_the_padding_bucket_without_padded_tokens():
    """trax's hash_vectors adds the bucket whenever a mask is given; HF's only when some token is padded."""
    qk, v, params = _case("mask_without_padding")
    mask = params["key_padding_mask"]
    assert mask.all() and params.get("padding_bucket", "if_mask") == "if_mask"
    got = lsh_attention(qk, v, **params).aux["buckets"]
    # The rule, written out (trax): n_buckets + 1 ids per round, so round r is offset by r (F + 1).
    num_buckets, rounds = params["num_buckets"], params["num_hashes"]
    rotated = np.einsum("bhnd,hrdp->bhrnp", qk, params["rotations"])
    plain = np.argmax(np.concatenate([rotated, -rotated], axis=-1), axis=-1)  # (B, H, R, N)
    offsets = np.arange(rounds)[:, None]
    np.testing.assert_array_equal(got, plain + offsets * (num_buckets + 1))
    # The wrong reading, written out (HF's "if_padded": no padded token, no extra bucket): offsets r F.
    assert not np.array_equal(got, plain + offsets * num_buckets)
    assert not np.array_equal(got, lsh_attention(qk, v, **dict(params, padding_bucket="if_padded")).aux["buckets"])


# --- item 7: the tie case decides the argmax's and the sort's tie order --------------------------


def _last_index_on_ties(rotated, factors):
    """_factor_buckets with numpy's argmax rule reversed: the last of equal maxima (a transcription, not refattn's)."""
    bucket = np.zeros(rotated.shape[:-1], dtype=np.int64)
    base, start = 1, 0
    for factor in factors:
        part = rotated[..., start : start + factor // 2]
        both = np.concatenate([part, -part], axis=-1)
        bucket += base * (factor - 1 - np.argmax(both[..., ::-1], axis=-1))
        base, start = base * factor, start + factor // 2
    return bucket


def _higher_position_first(buckets):
    """sort_items with equal buckets in decreasing position (an unstable sort's possible order)."""
    b, h, r, n = buckets.shape
    flat = buckets.reshape(b, h, r * n)
    permutation = (r * n - 1 - np.argsort(flat[..., ::-1], axis=-1, kind="stable")).astype(np.int64)
    return permutation, np.argsort(permutation, axis=-1, kind="stable")


@pytest.fixture(scope="module")
def lsh_suite(tmp_path_factory):
    """The LSH cases, exported to a temporary folder."""
    from refattn.conformance.export import export

    folder = tmp_path_factory.mktemp("lsh_suite")
    export(folder, mechanisms=["lsh"])
    return folder


@pytest.mark.parametrize("name, replacement", [("_factor_buckets", _last_index_on_ties),
                                               ("sort_items", _higher_position_first)])  # fmt: skip
def test_the_reference_with_reversed_ties_fails_the_tie_case(name, replacement, lsh_suite, monkeypatch):
    """refattn's LSH reference with a tied argmax to the last index, or equal buckets sorted by decreasing position,
    fails lsh/ties, reported as a tie-order difference; unchanged, it passes."""
    from refattn.conformance.verify import verify
    from refattn.lsh import reference

    assert verify(backend="reference", mechanism="lsh", suite=lsh_suite, ids=["lsh/ties"]).ok
    monkeypatch.setattr(reference, name, replacement)
    report = verify(backend="reference", mechanism="lsh", suite=lsh_suite, ids=["lsh/ties"])
    (tie_case,) = report.cases
    decisions = [c for c in tie_case.failed_checks if c.name.startswith("aux.")]
    assert decisions and all(c.describe().split(": ", 1)[1].startswith("tie order differs: ") for c in decisions)
