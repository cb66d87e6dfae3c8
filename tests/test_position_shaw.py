"""Shaw relative position representations, the reference: closed forms, a loop
formulation written here from the paper, the published implementations
(tensor2tensor, Hugging Face BERT) ported to PyTorch, the hand-derived VJP
against central finite differences, bad input, and the invariants."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import SpecError
from refattn.position.shaw import (
    properties,
    relative_index,
    shaw_attention,
    shaw_attention_vjp,
)
from tests.finite_differences import finite_differences

# --------------------------------------------------------------------------
# The relative index.
# --------------------------------------------------------------------------


def test_relative_index_is_clipped_key_minus_query():
    index = relative_index(np.array([0, 1, 2]), np.arange(5), 1)
    np.testing.assert_array_equal(index, [[1, 2, 2, 2, 2], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2]])
    assert index.dtype == np.int64


def test_relative_index_reads_positions_not_indices():
    # A decoding query at position 6 over keys with a gap: distances -6, -5, -1, 0, clipped to K = 2.
    np.testing.assert_array_equal(relative_index(np.array([6]), np.array([0, 1, 5, 6]), 2), [[0, 0, 1, 2]])


def test_relative_index_with_zero_distance_is_all_zeros():
    np.testing.assert_array_equal(relative_index(np.arange(4), np.arange(-3, 3), 0), np.zeros((4, 6), int))


# --------------------------------------------------------------------------
# The forward against a loop over (b, h, i, j) written from Shaw eqs. (3)-(5).
# --------------------------------------------------------------------------


def _loop_shaw(q, k, v, rel_k, rel_v, q_positions, k_positions, clip, *, causal=False,
               causal_alignment="bottom_right", window=None, scale=None, softcap=0.0, bias=None, mask=None,
               dropout_keep=None, dropout_p=0.0):  # fmt: skip
    """out, lse one scalar at a time: s = scale (q·k + q·a^K), cap, bias, mask, softmax, sum P (v + a^V)."""
    b_, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / np.sqrt(d) if scale is None else scale
    offset = nk - nq if causal_alignment == "bottom_right" else 0
    full = (b_, hq, nq, nk)
    bias = np.zeros(full) if bias is None else np.broadcast_to(bias, full)
    mask = np.ones(full, bool) if mask is None else np.broadcast_to(mask, full)
    keep = np.ones(full, bool) if dropout_keep is None else np.broadcast_to(dropout_keep, full)
    out, lse = np.zeros((b_, hq, nq, dv)), np.full((b_, hq, nq), -np.inf)
    for b, h, i in itertools.product(range(b_), range(hq), range(nq)):
        g = h // (hq // hkv)
        logits, rows = {}, {}
        for j in range(nk):
            aligned = i + offset
            if (causal and j > aligned) or not mask[b, h, i, j]:
                continue
            if window is not None and ((window[0] is not None and j < aligned - window[0]) or
                                       (window[1] is not None and j > aligned + window[1])):  # fmt: skip
                continue
            rows[j] = min(max(k_positions[j] - q_positions[i], -clip), clip) + clip
            s = scale * (q[b, h, i] @ k[b, g, j] + q[b, h, i] @ rel_k[rows[j]])
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            logits[j] = s + bias[b, h, i, j]
        if not logits:
            continue
        top = max(logits.values())
        lse[b, h, i] = top + np.log(sum(np.exp(s - top) for s in logits.values()))
        for j, s in logits.items():
            weight = np.exp(s - lse[b, h, i]) * keep[b, h, i, j] / (1 - dropout_p)
            out[b, h, i] += weight * (v[b, g, j] + rel_v[rows[j]])
    return out, lse


def _problem(seed, b=1, hq=4, hkv=2, nq=3, nk=5, d=3, dv=2, clip=1, q_offset=10):
    """Arrays (q, k, v and both tables) and positions: keys at 10.., queries at the last Nq of them."""
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=rng.standard_normal((b, hq, nq, d)),
        k=rng.standard_normal((b, hkv, nk, d)),
        v=rng.standard_normal((b, hkv, nk, dv)),
        rel_k=rng.standard_normal((2 * clip + 1, d)),
        rel_v=rng.standard_normal((2 * clip + 1, dv)),
    )
    positions = dict(
        q_positions=np.arange(nq) + q_offset + (nk - nq),
        k_positions=np.arange(nk) + q_offset,
        max_relative_position=clip,
    )
    return rng, arrays, positions


LOOP_OPTIONS = {
    "plain": {},
    "causal bottom-right, Nq < Nk": dict(causal=True),
    "causal top-left": dict(causal=True, causal_alignment="top_left"),
    "window": dict(window=(2, 1)),
    "scale and softcap": dict(scale=0.9, softcap=1.2),
}


@pytest.mark.parametrize("options", list(LOOP_OPTIONS))
def test_forward_matches_the_loop(options):
    rng, arrays, positions = _problem(1, b=2, nq=6, nk=9, d=5, dv=4, clip=2)
    params = dict(
        LOOP_OPTIONS[options], bias=rng.standard_normal((4, 6, 9)), mask=rng.random((2, 1, 6, 9)) < 0.8,
        dropout_p=0.3, dropout_keep=rng.random((2, 4, 6, 9)) > 0.3,
    )  # fmt: skip
    result = shaw_attention(**arrays, **positions, **params)
    out, lse = _loop_shaw(*arrays.values(), *positions.values(), **params)
    np.testing.assert_allclose(result.out, out, rtol=0, atol=1e-13)
    np.testing.assert_allclose(result.lse, lse, rtol=1e-14)
    index = relative_index(positions["q_positions"], positions["k_positions"], 2)
    np.testing.assert_array_equal(result.aux["relative_index"], index)


def test_fully_masked_rows_are_zero_with_lse_minus_infinity():
    _, arrays, positions = _problem(2, nq=7, nk=4)
    result = shaw_attention(**arrays, **positions, causal=True)  # bottom-right: queries 0..2 see no key
    assert np.all(result.out[:, :, :3] == 0) and np.all(result.lse[:, :, :3] == -np.inf)
    assert np.all(np.isfinite(result.lse[:, :, 3:]))


# --------------------------------------------------------------------------
# The published implementations, ported to PyTorch.
# --------------------------------------------------------------------------


def _t2t_relative_attention(q, k, v, bias, max_relative_position, keys_table, values_table):
    """tensor2tensor's dot_product_attention_relative, in PyTorch (its structure, not its code).

    As in tensor2tensor, ``q`` arrives already multiplied by depth**-0.5
    (multihead_attention does that), the relative matrix puts the queries at the
    last ``length_q`` key positions and clips ``j - i`` to ``[-K, K]``, both
    tables are gathered to (length_q, length_k, depth) and the softmax weights
    multiply the values and the gathered value rows.
    """
    import torch

    length_q, length_k = q.shape[2], k.shape[2]
    range_k = torch.arange(length_k)
    range_q = range_k[-length_q:]
    distance = range_k[None, :] - range_q[:, None]
    index = distance.clamp(-max_relative_position, max_relative_position) + max_relative_position
    relations_keys, relations_values = keys_table[index], values_table[index]
    logits = torch.einsum("bhxd,bhyd->bhxy", q, k) + torch.einsum("bhxd,xyd->bhxy", q, relations_keys) + bias
    weights = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhxy,bhyd->bhxd", weights, v) + torch.einsum("bhxy,xyd->bhxd", weights, relations_values)
    return out, torch.logsumexp(logits, dim=-1)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_tensor2tensor_ported_to_torch(causal):
    torch = pytest.importorskip("torch")
    nq, nk, d, clip = (6, 6, 4, 2) if causal else (4, 9, 4, 3)
    rng, arrays, _ = _problem(3, b=2, hq=3, hkv=3, nq=nq, nk=nk, d=d, dv=d, clip=clip)
    positions = dict(q_positions=np.arange(nk - nq, nk), k_positions=np.arange(nk), max_relative_position=clip)
    dout, dlse = rng.standard_normal((2, 3, nq, d)), rng.standard_normal((2, 3, nq))
    # tensor2tensor masks with a bias of -1e9 (attention_bias_lower_triangle); in float64
    # exp(-1e9) is exactly 0, so it is the exact causal mask.
    t2t_bias = -1e9 * np.triu(np.ones((nq, nk)), 1) if causal else np.zeros((nq, nk))

    tensors = {name: torch.tensor(a, requires_grad=True) for name, a in arrays.items()}
    scaled_q = tensors["q"] * d**-0.5
    out, lse = _t2t_relative_attention(scaled_q, tensors["k"], tensors["v"], torch.tensor(t2t_bias), clip,
                                       tensors["rel_k"], tensors["rel_v"])  # fmt: skip
    ((out * torch.tensor(dout)).sum() + (lse * torch.tensor(dlse)).sum()).backward()

    ours = shaw_attention(**arrays, **positions, causal=causal)
    grads = shaw_attention_vjp(dout, **arrays, dlse=dlse, **positions, causal=causal)
    np.testing.assert_allclose(ours.out, out.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ours.lse, lse.detach().numpy(), rtol=1e-12)
    for name, tensor in tensors.items():
        np.testing.assert_allclose(grads[name], tensor.grad.numpy(), rtol=1e-11, atol=1e-12, err_msg=name)


def _hf_bert_relative_key(query_layer, key_layer, value_layer, distance_embedding, max_position_embeddings):
    """Hugging Face BertSelfAttention with position_embedding_type="relative_key", in PyTorch (no cache, no mask).

    Its distance is query minus key, ``position_ids_l - position_ids_r``, looked
    up unclipped at ``distance + max_position_embeddings - 1`` in a (2M - 1,
    head_size) table; the sum is divided by sqrt(head_size); there is no value term.
    """
    import torch

    seq_length = query_layer.shape[2]
    distance = torch.arange(seq_length).view(-1, 1) - torch.arange(seq_length).view(1, -1)
    positional_embedding = distance_embedding[distance + max_position_embeddings - 1]
    scores = query_layer @ key_layer.transpose(-1, -2)
    scores = scores + torch.einsum("bhld,lrd->bhlr", query_layer, positional_embedding)
    probs = torch.softmax(scores / query_layer.shape[-1] ** 0.5, dim=-1)
    return probs @ value_layer


def test_matches_hugging_face_relative_key_with_the_table_mirrored():
    torch = pytest.importorskip("torch")
    max_position_embeddings, n, d = 8, 7, 5
    rng, arrays, _ = _problem(4, b=2, hq=3, hkv=3, nq=n, nk=n, d=d, dv=d, clip=max_position_embeddings - 1)
    hf_table = arrays["rel_k"]  # (2M - 1, D): row t is distance i - j = t - (M - 1)
    qkv = (torch.tensor(arrays[x]) for x in "qkv")
    hf_out = _hf_bert_relative_key(*qkv, torch.tensor(hf_table), max_position_embeddings)
    # refattn's row r is distance j - i = r - K: with K = M - 1 (no distance is clipped) that is HF's row 2K - r.
    mirrored = dict(arrays, rel_k=hf_table[::-1].copy(), rel_v=np.zeros_like(arrays["rel_v"]))
    positions = dict(q_positions=np.arange(n), k_positions=np.arange(n), max_relative_position=hf_table.shape[0] // 2)
    np.testing.assert_allclose(shaw_attention(**mirrored, **positions).out, hf_out.numpy(), rtol=1e-12, atol=1e-13)
    unmirrored = dict(mirrored, rel_k=hf_table)
    assert np.max(np.abs(shaw_attention(**unmirrored, **positions).out - hf_out.numpy())) > 1e-3


# --------------------------------------------------------------------------
# The hand-derived VJP against central finite differences.
# --------------------------------------------------------------------------

def _finite_differences(params, dout, dlse, arrays, name):
    return finite_differences(shaw_attention, arrays, params, dout, dlse, name)


def _gradient_problem(seed, causal, bias, mask, extras):
    """GQA 4:2, 3 queries over 5 keys at positions offset by 10, K = 1 (so that far keys are clipped)."""
    rng, arrays, positions = _problem(seed)
    params = dict(positions)
    if causal:
        params.update(causal=True, causal_alignment=causal)
    if bias:
        arrays["bias"] = rng.standard_normal((4, 3, 5))
    if mask:
        params["mask"] = rng.random((1, 4, 3, 5)) < 0.7
        params["mask"][0, 1, 2] = False  # a fully masked row
    if extras:
        params.update(softcap=0.8, dropout_p=0.3, dropout_keep=rng.random((1, 4, 3, 5)) >= 0.3)
    return arrays, params, rng.standard_normal((1, 4, 3, 2)), rng.standard_normal((1, 4, 3))


def _assert_matches_finite_differences(arrays, params, dout, dlse):
    grads = shaw_attention_vjp(dout, **arrays, dlse=dlse, **params)
    assert set(grads) == set(arrays)
    for name in arrays:
        numeric = _finite_differences(params, dout, dlse, arrays, name)
        assert grads[name].shape == arrays[name].shape
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-3), name


@pytest.mark.parametrize(
    "causal, bias, mask, extras",
    list(itertools.product([None, "bottom_right", "top_left"], [False, True], [False, True], [False, True])),
)
def test_vjp_matches_finite_differences(causal, bias, mask, extras):
    arrays, params, dout, dlse = _gradient_problem(7, causal, bias, mask, extras)
    dlse = np.where(np.isfinite(shaw_attention(**arrays, **params).lse), dlse, 0.0)
    _assert_matches_finite_differences(arrays, params, dout, dlse)


@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_vjp_without_dlse_matches_finite_differences(causal):
    arrays, params, dout, _ = _gradient_problem(8, causal, True, True, False)
    _assert_matches_finite_differences(arrays, params, dout, None)


def test_table_gradients_in_closed_form_with_zero_distance():
    # K = 0: every pair reads row 0, so out = dense out + rel_v[0] on rows with a key,
    # d rel_v[0] = sum of dout over those rows, and the key term (a row constant) has
    # d rel_k[0] = scale * sum_i dlse_i q_i (the softmax absorbs it for the output).
    rng, arrays, positions = _problem(9, clip=0)
    positions["max_relative_position"] = 0
    dout, dlse = rng.standard_normal((1, 4, 3, 2)), rng.standard_normal((1, 4, 3))
    grads = shaw_attention_vjp(dout, **arrays, dlse=dlse, **positions)
    np.testing.assert_allclose(grads.rel_v[0], dout.sum(axis=(0, 1, 2)), rtol=1e-13)
    np.testing.assert_allclose(grads.rel_k[0], np.einsum("bhq,bhqd->d", dlse, arrays["q"]) / np.sqrt(3), rtol=1e-12)


def test_fully_masked_rows_have_zero_gradient():
    arrays, params, dout, dlse = _gradient_problem(9, None, True, False, False)
    params["mask"] = np.zeros((3, 5), bool)
    grads = shaw_attention_vjp(dout, **arrays, dlse=np.zeros_like(dlse), **params)
    for name, grad in grads.items():
        assert np.all(grad == 0), name


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------

_, GOOD, GOOD_POSITIONS = _problem(0)
BAD = {
    "negative K": (dict(max_relative_position=-1), "max_relative_position", "integer >= 0"),
    "float K": (dict(max_relative_position=1.0), "max_relative_position", "integer >= 0"),
    "bool K": (dict(max_relative_position=True), "max_relative_position", "integer >= 0"),
    "rel_k rows": (dict(rel_k=np.zeros((5, 3))), "rel_k", "(2K+1, D) = (3, 3)"),
    "rel_k width": (dict(rel_k=np.zeros((3, 2))), "rel_k", "(2K+1, D) = (3, 3)"),
    "rel_v width": (dict(rel_v=np.zeros((3, 3))), "rel_v", "(2K+1, Dv) = (3, 2)"),
    "rel_k not an array": (dict(rel_k=[[0.0] * 3] * 3), "rel_k", "numpy array"),
    "rel_v nan": (dict(rel_v=np.full((3, 2), np.nan)), "rel_v", "finite"),
    "q_positions float": (dict(q_positions=np.arange(3.0)), "q_positions", "integer dtype"),
    "q_positions length": (dict(q_positions=np.arange(4)), "q_positions", "shape (3,)"),
    "k_positions 2-d": (dict(k_positions=np.arange(5)[None]), "k_positions", "shape (5,)"),
    "k_positions list": (dict(k_positions=list(range(5))), "k_positions", "numpy array"),
    "k_positions huge": (dict(k_positions=np.array([0, 1, 2, 3, 2**63 - 1])), "k_positions", "2**52"),
    "missing rel_v": (dict(rel_v=None), "rel_v", "numpy array"),
    "dense option": (dict(window=(-1, 0)), "window", "non-negative"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_forward_rejects(case):
    overrides, argument, expected = BAD[case]
    with pytest.raises(SpecError) as info:
        shaw_attention(**(GOOD | GOOD_POSITIONS | overrides))
    assert info.value.argument == argument
    assert expected in str(info.value)


@pytest.mark.parametrize("case", ["negative K", "rel_v width", "q_positions length", "dense option"])
def test_vjp_rejects_the_same(case):
    overrides, argument, _ = BAD[case]
    with pytest.raises(SpecError) as info:
        shaw_attention_vjp(np.zeros((1, 4, 3, 2)), **(GOOD | GOOD_POSITIONS | overrides))
    assert info.value.argument == argument


def test_relative_index_rejects_bad_positions():
    with pytest.raises(SpecError) as info:
        relative_index(np.arange(3), np.arange(4.0), 2)
    assert info.value.argument == "k_positions"


# --------------------------------------------------------------------------
# The invariants, on the reference.
# --------------------------------------------------------------------------


@st.composite
def shaw_problems(draw, clips=(0, 1, 3, 40)):
    """A small Shaw problem: shapes with GQA and Nq != Nk, contiguous, gapped or
    shuffled positions, any of the dense options."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    b, nq, nk = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 11))
    d, dv = draw(st.sampled_from([1, 4, 7])), draw(st.sampled_from([1, 3]))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]))
    clip = draw(st.sampled_from(clips))
    layout = draw(st.sampled_from(["contiguous", "gaps", "shuffled"]))
    if layout == "contiguous":
        k_positions = np.arange(nk) + int(rng.integers(-50, 50))
        q_positions = k_positions[-1] - (nq - 1) + np.arange(nq)
    else:
        k_positions = np.cumsum(rng.integers(0, 4, nk)) if layout == "gaps" else rng.integers(-20, 20, nk)
        q_positions = np.sort(rng.integers(-5, 25, nq)) if layout == "gaps" else rng.integers(-20, 20, nq)
    params = dict(
        rel_k=rng.standard_normal((2 * clip + 1, d)), rel_v=rng.standard_normal((2 * clip + 1, dv)),
        q_positions=q_positions, k_positions=k_positions, max_relative_position=clip,
    )  # fmt: skip
    if draw(st.booleans()):
        params.update(causal=True, causal_alignment=draw(st.sampled_from(["bottom_right", "top_left"])))
    if draw(st.booleans()):
        params["window"] = (draw(st.sampled_from([None, 0, 2])), draw(st.sampled_from([None, 1, 30])))
    if draw(st.booleans()):
        params["bias"] = rng.standard_normal((hq, nq, nk))
    if draw(st.booleans()):
        params["mask"] = rng.random((b, 1, nq, nk)) < 0.7
    if draw(st.booleans()):
        params["softcap"] = 2.0
    if draw(st.booleans()):
        params["scale"] = 0.7
    if draw(st.booleans()):
        params.update(dropout_p=0.25, dropout_keep=rng.random((b, hq, nq, nk)) >= 0.25)
    q = draw(st.sampled_from([0.1, 1.0, 3.0])) * rng.standard_normal((b, hq, nq, d))
    k, v = rng.standard_normal((b, hkv, nk, d)), rng.standard_normal((b, hkv, nk, dv))
    return q, k, v, params


def _without(params, *names):
    return {name: value for name, value in params.items() if name not in names}


@given(shaw_problems())
def test_position_shift_invariance(problem):
    properties.position_shift_invariance(shaw_attention, *problem)


@given(shaw_problems())
def test_zero_tables_equal_dense(problem):
    properties.zero_tables_equal_dense(shaw_attention, *problem)


@given(shaw_problems(clips=(0,)))
def test_zero_distance_adds_a_row_constant(problem):
    q, k, v, params = problem
    params = _without(params, "softcap", "dropout_keep", "dropout_p")
    properties.zero_distance_adds_a_row_constant(shaw_attention, q, k, v, params)


@given(shaw_problems())
def test_key_term_is_a_query_dependent_bias(problem):
    q, k, v, params = problem
    properties.key_term_is_a_query_dependent_bias(shaw_attention, q, k, v, _without(params, "softcap"))


@given(shaw_problems())
def test_causal_independence(problem):
    q, k, v, params = problem
    properties.causal_independence(shaw_attention, q, k, v, dict(params, causal=True))


@given(shaw_problems())
def test_gqa_equals_repeated_heads(problem):
    properties.gqa_equals_repeated_heads(shaw_attention, *problem)


def test_properties_refuse_problems_they_are_not_stated_for():
    _, arrays, positions = _problem(0)
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")
    with pytest.raises(ValueError, match="max_relative_position = 0"):
        properties.zero_distance_adds_a_row_constant(shaw_attention, q, k, v, arrays | positions)
    with pytest.raises(ValueError, match="no soft-cap"):
        properties.key_term_is_a_query_dependent_bias(shaw_attention, q, k, v, arrays | positions | dict(softcap=1.0))


def test_a_wrong_direction_breaks_the_bias_property():
    # The property is not vacuous: reading the key table mirrored (i - j) fails it.
    _, arrays, positions = _problem(5, nq=5, nk=5, clip=2)
    q, k, v = arrays.pop("q"), arrays.pop("k"), arrays.pop("v")

    def mirrored(q, k, v, **params):
        return shaw_attention(q, k, v, **dict(params, rel_k=params["rel_k"][::-1]))

    with pytest.raises(AssertionError, match="out"):
        properties.key_term_is_a_query_dependent_bias(mirrored, q, k, v, arrays | positions)
