"""Transformer-XL relative scores: the reference against closed forms, the original code, finite differences.

The original (kimiyoung/transformer-xl, pytorch/mem_transformer.py) is
transcribed here twice, with NumPy and with torch, in its own layout
(qlen, klen, bsz, n_head): ``PositionalEmbedding``, ``_rel_shift`` and the
score of ``RelPartialLearnableMultiHeadAttn`` with its causal mask
``triu(ones(qlen, klen), 1 + mlen)``. The reference must agree with it on
every pair that mask keeps, for mem_len 0 and > 0; torch's autograd through
the transcription is an independent check of the hand-derived VJP.
"""

import itertools

import numpy as np
import pytest

from refattn import SpecError
from refattn.position.transformer_xl import (
    properties,
    rel_shift,
    relative_position_scores,
    sinusoid_relative_embeddings,
    transformer_xl_attention,
    transformer_xl_attention_vjp,
)
from tests.finite_differences import finite_differences

# --------------------------------------------------------------------------
# The sinusoid table.
# --------------------------------------------------------------------------


def test_sinusoids_closed_form():
    # Row t embeds distance klen - 1 - t; column m < d/2 is sin(d_t / 10000^(2m/d)), column d/2 + m its cosine.
    klen, d_model = 5, 6
    table = sinusoid_relative_embeddings(klen, d_model)
    for t, m in itertools.product(range(klen), range(d_model // 2)):
        angle = (klen - 1 - t) / 10000 ** (2 * m / d_model)
        assert table[t, m] == pytest.approx(np.sin(angle), abs=1e-15)
        assert table[t, d_model // 2 + m] == pytest.approx(np.cos(angle), abs=1e-15)
    np.testing.assert_array_equal(table[-1], [0, 0, 0, 1, 1, 1])  # distance 0


def test_sinusoids_are_concatenated_not_interleaved():
    # XL_SINUSOID_LAYOUT (a helper-only mistake, tested here rather than by a case):
    # [sin | cos], not sin and cos alternating as in the original Transformer's absolute table.
    table = sinusoid_relative_embeddings(7, 8)
    angle = np.arange(6, -1, -1)[:, None] / 10000 ** (np.arange(0, 8, 2) / 8)
    interleaved = np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(7, 8)
    np.testing.assert_allclose(table, np.concatenate([np.sin(angle), np.cos(angle)], axis=-1), rtol=0, atol=1e-15)
    assert np.max(np.abs(table - interleaved)) > 0.5


@pytest.mark.parametrize("clamp_len", [1, 3, 5])
def test_clamp_len_caps_distances(clamp_len):
    # XL_CLAMP_LEN (helper-only): every distance above clamp_len gets clamp_len's embedding, the others their own.
    klen = 8
    clamped, plain = sinusoid_relative_embeddings(klen, 4, clamp_len=clamp_len), sinusoid_relative_embeddings(klen, 4)
    distance = klen - 1 - np.arange(klen)
    row_of = {int(d): t for t, d in enumerate(distance)}
    for t, d in enumerate(distance):
        np.testing.assert_array_equal(clamped[t], plain[row_of[min(int(d), clamp_len)]])


@pytest.mark.parametrize("clamp_len", [0, -1, 7, 100])
def test_clamp_len_that_clamps_nothing(clamp_len):
    unclamped = sinusoid_relative_embeddings(8, 4)
    np.testing.assert_array_equal(sinusoid_relative_embeddings(8, 4, clamp_len=clamp_len), unclamped)


def test_sinusoids_match_the_original_code():
    torch = pytest.importorskip("torch")
    for klen, d_model, clamp_len in [(9, 8, -1), (12, 16, 5)]:
        # PositionalEmbedding(d_model)(pos_seq) with MemTransformerLM._forward's pos_seq, in float64.
        inv_freq = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0, dtype=torch.float64) / d_model))
        pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=torch.float64)
        if clamp_len > 0:
            pos_seq.clamp_(max=clamp_len)
        sinusoid_inp = torch.outer(pos_seq, inv_freq)
        pos_emb = torch.cat([sinusoid_inp.sin(), sinusoid_inp.cos()], dim=-1)
        np.testing.assert_allclose(
            sinusoid_relative_embeddings(klen, d_model, clamp_len=clamp_len), pos_emb.numpy(), rtol=0, atol=1e-15
        )


# --------------------------------------------------------------------------
# The original's shift.
# --------------------------------------------------------------------------


def _rel_shift_torch(x):
    """RelMultiHeadAttn._rel_shift (zero_triu=False) on (qlen, rlen, bsz, n_head), as the original writes it."""
    import torch

    zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), device=x.device, dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=1)
    x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])
    return x_padded[1:].view_as(x)


def _rel_shift_numpy(x):
    """The same, transcribed to NumPy in the original's layout (qlen, rlen, bsz, n_head)."""
    padded = np.concatenate([np.zeros((x.shape[0], 1) + x.shape[2:]), x], axis=1)
    return padded.reshape((x.shape[1] + 1, x.shape[0]) + x.shape[2:])[1:].reshape(x.shape)


@pytest.mark.parametrize("nq, n_rows", [(4, 4), (3, 7), (1, 5), (6, 9)])
def test_rel_shift_is_the_originals(nq, n_rows):
    x = np.random.default_rng(0).standard_normal((2, 3, nq, n_rows))  # (B, H, Nq, R)
    original_layout = x.transpose(2, 3, 0, 1)  # (qlen, rlen, bsz, n_head)
    want = _rel_shift_numpy(original_layout).transpose(2, 3, 0, 1)
    np.testing.assert_array_equal(rel_shift(x), want)
    torch = pytest.importorskip("torch")
    by_torch = _rel_shift_torch(torch.from_numpy(original_layout)).numpy()
    np.testing.assert_array_equal(rel_shift(x), by_torch.transpose(2, 3, 0, 1))


def test_rel_shift_index_formula():
    # Below and on j = i + R - Nq: the pair's own row; just above: 0; further up: the next query's scores.
    nq, n_rows = 4, 7
    x = np.arange(nq * n_rows, dtype=float).reshape(nq, n_rows) + 1
    shifted = rel_shift(x)
    for i, j in itertools.product(range(nq), range(n_rows)):
        if j <= i + n_rows - nq:
            assert shifted[i, j] == x[i, nq - 1 - i + j]
        elif j == i + n_rows - nq + 1:
            assert shifted[i, j] == 0
        else:
            assert shifted[i, j] == x[i + 1, j - i - n_rows + nq - 2]


# --------------------------------------------------------------------------
# The original's formulation against the direct one.
# --------------------------------------------------------------------------


def _original_problem(seed, mem_len, qlen=5, bsz=2, n_head=3, d_head=4):
    """Inputs in refattn's layout for the original's setup: R = klen = mem_len + qlen."""
    rng = np.random.default_rng(seed)
    klen = mem_len + qlen
    arrays = dict(
        q=rng.standard_normal((bsz, n_head, qlen, d_head)),
        k=rng.standard_normal((bsz, n_head, klen, d_head)),
        v=rng.standard_normal((bsz, n_head, klen, d_head)),
        r=rng.standard_normal((n_head, klen, d_head)),
        u=rng.standard_normal((n_head, d_head)),
        v_bias=rng.standard_normal((n_head, d_head)),
    )
    positions = dict(q_positions=mem_len + np.arange(qlen), k_positions=np.arange(klen))
    return arrays, positions


def _original_numpy(q, k, v, r, u, v_bias, mem_len):
    """RelPartialLearnableMultiHeadAttn's attention in NumPy, in its layout; (scores, out) in refattn's layout."""
    w_head_q, w_head_k, w_head_v = (x.transpose(2, 0, 1, 3) for x in (q, k, v))  # (len, bsz, n_head, d_head)
    r_head_k = r.transpose(1, 0, 2)  # (rlen, n_head, d_head)
    qlen, klen, scale = q.shape[2], k.shape[2], 1 / q.shape[3] ** 0.5
    ac = np.einsum("ibnd,jbnd->ijbn", w_head_q + u, w_head_k)
    bd = _rel_shift_numpy(np.einsum("ibnd,jnd->ijbn", w_head_q + v_bias, r_head_k))
    attn_score = (ac + bd) * scale
    attn_mask = np.triu(np.ones((qlen, klen)), k=1 + mem_len).astype(bool)
    attn_score = np.where(attn_mask[:, :, None, None], -np.inf, attn_score)
    attn_prob = np.exp(attn_score - attn_score.max(axis=1, keepdims=True))
    attn_prob /= attn_prob.sum(axis=1, keepdims=True)
    attn_vec = np.einsum("ijbn,jbnd->ibnd", attn_prob, w_head_v)
    return attn_score.transpose(2, 3, 0, 1), attn_vec.transpose(1, 2, 0, 3)


@pytest.mark.parametrize("mem_len", [0, 1, 6])
def test_direct_form_equals_the_originals_rel_shift_form(mem_len):
    arrays, positions = _original_problem(1, mem_len)
    original_scores, original_out = _original_numpy(**arrays, mem_len=mem_len)
    q, k = arrays["q"], arrays["k"]
    scale = 1 / np.sqrt(q.shape[3])
    content = np.einsum("bhqd,bhkd->bhqk", q + arrays["u"][:, None], k)
    position = relative_position_scores(q, arrays["r"], arrays["v_bias"], **positions)
    kept = np.isfinite(original_scores)
    np.testing.assert_allclose(scale * (content + position)[kept], original_scores[kept], rtol=1e-13)
    result = transformer_xl_attention(**arrays, **positions, causal=True)
    np.testing.assert_allclose(result.out, original_out, rtol=1e-12, atol=1e-14)
    # The same through the property users run on their kernels.
    tables = {name: arrays[name] for name in ("r", "u", "v_bias")}
    params = dict(tables, **positions, causal=True)
    properties.equals_rel_shift_form(transformer_xl_attention, q, k, arrays["v"], params)


def _original_torch(q, k, v, r, u, v_bias, mem_len):
    """The original's attention in torch (float64), autograd-ready; (scores, out, lse) in refattn's layout."""
    import torch

    w_head_q, w_head_k, w_head_v = (x.permute(2, 0, 1, 3) for x in (q, k, v))
    r_head_k = r.permute(1, 0, 2)
    qlen, klen, scale = q.size(2), k.size(2), 1 / q.size(3) ** 0.5
    ac = torch.einsum("ibnd,jbnd->ijbn", (w_head_q + u, w_head_k))
    bd = _rel_shift_torch(torch.einsum("ibnd,jnd->ijbn", (w_head_q + v_bias, r_head_k)))
    attn_score = (ac + bd) * scale
    dec_attn_mask = torch.triu(torch.ones((qlen, klen), dtype=torch.float64), diagonal=1 + mem_len).bool()[:, :, None]
    attn_score = attn_score.masked_fill(dec_attn_mask[:, :, :, None], -float("inf"))
    attn_prob = torch.softmax(attn_score, dim=1)
    attn_vec = torch.einsum("ijbn,jbnd->ibnd", (attn_prob, w_head_v))
    lse = torch.logsumexp(attn_score, dim=1)  # (qlen, bsz, n_head)
    return attn_score.permute(2, 3, 0, 1), attn_vec.permute(1, 2, 0, 3), lse.permute(1, 2, 0)


@pytest.mark.parametrize("mem_len", [0, 4])
def test_scores_and_vjp_equal_autograd_through_the_original(mem_len):
    torch = pytest.importorskip("torch")
    arrays, positions = _original_problem(2, mem_len, qlen=4)
    rng = np.random.default_rng(3)
    dout, dlse = rng.standard_normal(arrays["q"].shape), rng.standard_normal(arrays["q"].shape[:3])
    tensors = {name: torch.tensor(x, requires_grad=True) for name, x in arrays.items()}
    scores, out, lse = _original_torch(**tensors, mem_len=mem_len)
    ((out * torch.from_numpy(dout)).sum() + (lse * torch.from_numpy(dlse)).sum()).backward()
    # Every entry the original's mask keeps is the direct form's score.
    scores = scores.detach().numpy()
    content = np.einsum("bhqd,bhkd->bhqk", arrays["q"] + arrays["u"][:, None], arrays["k"])
    position = relative_position_scores(arrays["q"], arrays["r"], arrays["v_bias"], **positions)
    kept = np.isfinite(scores)
    np.testing.assert_allclose((content + position)[kept] / np.sqrt(arrays["q"].shape[3]), scores[kept], rtol=1e-13)
    result = transformer_xl_attention(**arrays, **positions, causal=True)
    np.testing.assert_allclose(result.out, out.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(result.lse, lse.detach().numpy(), rtol=1e-12)
    grads = transformer_xl_attention_vjp(dout, **arrays, dlse=dlse, **positions, causal=True)
    assert set(grads) == set(arrays)
    for name, tensor in tensors.items():
        np.testing.assert_allclose(grads[name], tensor.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_pairs_at_equal_distance_share_a_row():
    # The position term depends on (query, distance) only: with q's rows all equal, it is a Toeplitz matrix.
    rng = np.random.default_rng(4)
    q = np.broadcast_to(rng.standard_normal((1, 1, 1, 3)), (1, 1, 6, 3))
    scores = relative_position_scores(q, rng.standard_normal((1, 6, 3)), rng.standard_normal((1, 3)),
                                      q_positions=np.arange(6), k_positions=np.arange(6))[0, 0]  # fmt: skip
    for i, j in itertools.product(range(1, 6), range(1, 6)):
        if j <= i:
            assert scores[i, j] == scores[i - 1, j - 1]
    assert np.all(scores[np.triu_indices(6, 1)] == 0)  # negative distances have no row: 0, to be masked


# --------------------------------------------------------------------------
# The VJP against central finite differences.
# --------------------------------------------------------------------------

B, HQ, HKV, NQ, NK, D, DV = 2, 2, 1, 3, 5, 3, 2  # B = 2 (tables sum over it), MQA 2:1, Nq != Nk


def _problem(seed, causal, softcap, bias, masks):
    """A small problem; causal None means not causal, with every query after every key."""
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=rng.standard_normal((B, HQ, NQ, D)),
        k=rng.standard_normal((B, HKV, NK, D)),
        v=rng.standard_normal((B, HKV, NK, DV)),
        r=rng.standard_normal((HQ, NK + NQ + 1, D)),
        u=rng.standard_normal((HQ, D)),
        v_bias=rng.standard_normal((HQ, D)),
    )
    offset = NK if causal is None else NK - NQ  # queries after the keys, or the original's memory layout
    params = dict(q_positions=50 + offset + np.arange(NQ), k_positions=50 + np.arange(NK), softcap=softcap)
    if causal:
        params.update(causal=True, causal_alignment=causal)
    if bias:
        arrays["bias"] = rng.standard_normal((HQ, 1, NK))
    if masks:
        params["mask"] = rng.random((B, HQ, NQ, NK)) < 0.7
        params["mask"][0, 1, 2] = False  # a fully masked row
        params.update(dropout_p=0.3, dropout_keep=rng.random((B, HQ, NQ, NK)) >= 0.3)
    dout = rng.standard_normal((B, HQ, NQ, DV))
    dlse = rng.standard_normal((B, HQ, NQ))
    return arrays, params, dout, dlse


def _finite_differences(params, dout, dlse, arrays, name):
    return finite_differences(transformer_xl_attention, arrays, params, dout, dlse, name)


def _assert_matches_finite_differences(grads, params, dout, dlse, arrays):
    assert set(grads) == set(arrays)
    for name in arrays:
        numeric = _finite_differences(params, dout, dlse, arrays, name)
        assert grads[name].shape == arrays[name].shape
        scale = max(np.max(np.abs(numeric)), 1e-3)
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * scale, name


COMBINATIONS = list(
    itertools.product(
        [None, "bottom_right"],  # causal (None: queries after keys, no mask needed)
        [0.0, 0.8],  # softcap
        [False, True],  # a (Hq, 1, Nk) bias
        [False, True],  # a mask with a fully masked row, and dropout
    )
) + [("top_left", 0.0, True, True), ("top_left", 0.8, False, False)]


@pytest.mark.parametrize("causal, softcap, bias, masks", COMBINATIONS)
def test_vjp_matches_finite_differences(causal, softcap, bias, masks):
    arrays, params, dout, dlse = _problem(7, causal, softcap, bias, masks)
    lse = transformer_xl_attention(**arrays, **params).lse
    dlse = np.where(np.isfinite(lse), dlse, 0.0)
    grads = transformer_xl_attention_vjp(dout, **arrays, dlse=dlse, **params)
    _assert_matches_finite_differences(grads, params, dout, dlse, arrays)


@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_vjp_without_dlse(causal):
    arrays, params, dout, _ = _problem(8, causal, 0.0, True, False)
    grads = transformer_xl_attention_vjp(dout, **arrays, **params)
    _assert_matches_finite_differences(grads, params, dout, None, arrays)


def test_unread_rows_get_zero_gradient_and_fully_masked_rows_give_zero():
    arrays, params, dout, dlse = _problem(9, "bottom_right", 0.0, False, False)
    grads = transformer_xl_attention_vjp(dout, **arrays, dlse=dlse, **params)
    # Distances 0 ... NK - 1 read rows R - NK ... R - 1; the rows of larger distances get nothing.
    assert np.all(grads.r[:, : -NK] == 0) and np.all(np.any(grads.r[:, -NK:] != 0, axis=-1))
    params["mask"] = np.zeros((NQ, NK), bool)
    grads = transformer_xl_attention_vjp(dout, **arrays, dlse=np.zeros_like(dlse), **params)
    for name, grad in grads.items():
        assert np.all(grad == 0), name


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------

rng = np.random.default_rng(0)
GOOD = dict(
    q=rng.standard_normal((1, 4, 3, 5)),
    k=rng.standard_normal((1, 2, 6, 5)),
    v=rng.standard_normal((1, 2, 6, 7)),
    r=rng.standard_normal((4, 6, 5)),
    u=rng.standard_normal((4, 5)),
    v_bias=rng.standard_normal((4, 5)),
    q_positions=np.arange(3, 6),
    k_positions=np.arange(6),
    causal=True,
)

BAD = {
    "r rank": (dict(r=GOOD["r"][0]), "r", "(Hq, R, D)"),
    "r per kv head": (dict(r=GOOD["r"][:2]), "r", "(Hq, R, D) = (4, R, 5)"),
    "r head dim": (dict(r=GOOD["r"][..., :4]), "r", "(Hq, R, D)"),
    "r without rows": (dict(r=GOOD["r"][:, :0]), "r", "R >= 1"),
    "r not finite": (dict(r=np.where(GOOD["r"] > 1, np.inf, GOOD["r"])), "r", "finite"),
    "r a list": (dict(r=GOOD["r"].tolist()), "r", "numpy array"),
    "u shape": (dict(u=GOOD["u"][None]), "u", "(Hq, D)"),
    "u per kv head": (dict(u=GOOD["u"][:2]), "u", "(Hq, D) = (4, 5)"),
    "v_bias shape": (dict(v_bias=GOOD["v_bias"][:, :3]), "v_bias", "(Hq, D)"),
    "v_bias nan": (dict(v_bias=np.full((4, 5), np.nan)), "v_bias", "finite"),
    "q_positions missing": (dict(q_positions=None), "q_positions", "integer numpy array"),
    "q_positions float": (dict(q_positions=np.arange(3.0)), "q_positions", "integer dtype"),
    "q_positions bool": (dict(q_positions=np.ones(3, bool)), "q_positions", "integer dtype"),
    "q_positions length": (dict(q_positions=np.arange(4)), "q_positions", "shape (3,)"),
    "k_positions 2-d": (dict(k_positions=np.arange(6)[None]), "k_positions", "shape (6,)"),
    "k_positions huge": (dict(k_positions=np.full(6, 2**61)), "k_positions", "2**52"),
    "negative distance unmasked": (dict(causal=False), "r", "distance in [0, R - 1]"),
    "distance beyond R": (dict(r=GOOD["r"][:, :3]), "r", "[0, 2]"),
    "top-left alignment leaves pairs without a row": (dict(q_positions=np.arange(3), causal_alignment="top_left",
                                                            r=GOOD["r"][:, :2]), "r", "distance 2"),  # fmt: skip
    "dense argument": (dict(window=(-1, 0)), "window", "non-negative"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
    "backend": (dict(backend="cuda"), "backend", "reference"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_forward_and_vjp_reject(case):
    overrides, argument, expected = BAD[case]
    kwargs = GOOD | overrides
    with pytest.raises(SpecError) as info:
        transformer_xl_attention(**kwargs)
    assert info.value.argument == argument
    assert expected in info.value.expected or expected in info.value.given
    with pytest.raises(SpecError) as info:
        transformer_xl_attention_vjp(np.zeros((1, 4, 3, 7)), **kwargs)
    assert info.value.argument == argument


def test_masking_the_pairs_without_a_row_makes_them_valid():
    # Non-causal with negative distances is fine once a mask removes exactly those pairs.
    allowed = GOOD["q_positions"][:, None] >= GOOD["k_positions"][None, :]
    masked = transformer_xl_attention(**(GOOD | dict(causal=False, mask=allowed)))
    causal = transformer_xl_attention(**GOOD)
    np.testing.assert_array_equal(masked.out, causal.out)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(klen=0, d_model=4), "klen"),
        (dict(klen=3.0, d_model=4), "klen"),
        (dict(klen=3, d_model=5), "d_model"),
        (dict(klen=3, d_model=True), "d_model"),
        (dict(klen=3, d_model=4, clamp_len=2.5), "clamp_len"),
        (dict(klen=3, d_model=4, clamp_len=True), "clamp_len"),
        (dict(klen=3, d_model=4, clamp_len="4"), "clamp_len"),
    ],
)
def test_sinusoids_reject(kwargs, argument):
    with pytest.raises(SpecError) as info:
        sinusoid_relative_embeddings(**kwargs)
    assert info.value.argument == argument


def test_rel_shift_and_position_scores_reject():
    with pytest.raises(SpecError, match="argument `x`"):
        rel_shift(np.zeros(4))
    q, r, v_bias, q_positions = GOOD["q"], GOOD["r"], GOOD["v_bias"], GOOD["q_positions"]
    with pytest.raises(SpecError, match="argument `k_positions`"):
        relative_position_scores(q, r, v_bias, q_positions=q_positions, k_positions=np.arange(6.0))
    with pytest.raises(SpecError, match="argument `r`"):
        relative_position_scores(q, r[:2], v_bias, q_positions=q_positions, k_positions=np.arange(6))
