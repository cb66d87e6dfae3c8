"""xPos: closed forms, torchscale's and rotary-embedding-torch's formulas written in torch,
the hand-derived VJP against finite differences, bad input, the numba backend against the
reference, and the invariants."""

import functools
import inspect
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import SpecError
from refattn.conformance.flags import FLAGS as SHARED_FLAGS
from refattn.core import registry
from refattn.position.rope import apply_rope, rope_attention
from refattn.position.rope import properties as rope_properties
from refattn.position.xpos import (
    apply_xpos,
    properties,
    xpos_attention,
    xpos_attention_vjp,
    xpos_scales,
)
from refattn.position.xpos.cases import FLAGS, cases
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences
from tests.naive_dense import naive_dense
from tests.test_position_rope import naive_rotation, rotary_problems

RNG = np.random.default_rng(20221220)
X = RNG.standard_normal((2, 3, 6, 8))
POSITIONS = np.array([0, 1, 5, 40, -17, 300])


def test_scales_closed_form():
    # r = 4, gamma = 0.4: zeta = (0/4 + 0.4)/1.4 = 2/7 and (2/4 + 0.4)/1.4 = 9/14.
    zeta = np.array([2 / 7, 9 / 14])
    positions = np.array([0, 512, -1024])
    up = xpos_scales(positions, 4)
    np.testing.assert_allclose(up, [[1, 1], zeta, zeta**-2], rtol=1e-14)
    np.testing.assert_allclose(xpos_scales(positions, 4, downscale=True), 1 / up, rtol=1e-14)
    np.testing.assert_allclose(xpos_scales(np.array([8]), 4, scale_base=16.0, gamma=1.0), [[0.5**0.5, 0.75**0.5]], rtol=1e-15)


@pytest.mark.parametrize("layout, rotary_dim", [("interleaved", None), ("half", None), ("interleaved", 6), ("half", 4)])
@pytest.mark.parametrize("downscale", [False, True])
def test_xpos_is_rope_with_each_pair_scaled(layout, rotary_dim, downscale):
    r = rotary_dim or X.shape[-1]
    rope = naive_rotation(X, POSITIONS, rotary_dim=r, layout=layout)
    factors = xpos_scales(POSITIONS, r, downscale=downscale, scale_base=64.0)  # (N, r/2)
    t = np.arange(r // 2)
    pairs = (t, t + r // 2) if layout == "half" else (2 * t, 2 * t + 1)
    expected = rope.copy()
    for dims in pairs:
        expected[..., dims] *= factors
    got = apply_xpos(X, POSITIONS, downscale=downscale, rotary_dim=rotary_dim, scale_base=64.0, layout=layout)
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------
# The published formulas, written in torch from their code (float64 instead of
# their float32, to compare formulas rather than roundings).
# --------------------------------------------------------------------------


def _torchscale_xpos(torch, x, offset=0, downscale=False, scale_base=512):
    """torchscale XPOS.forward (xpos_relative_position.py) on x (B, H, L, D)."""
    head_dim, length = x.shape[-1], x.shape[-2]
    scale_buffer = (torch.arange(0, head_dim, 2, dtype=torch.float64) + 0.4 * head_dim) / (1.4 * head_dim)
    min_pos = -(length + offset) // 2
    max_pos = length + offset + min_pos
    scale = scale_buffer ** (torch.arange(min_pos, max_pos, 1, dtype=torch.float64) / scale_base)[:, None]
    # fixed_pos_embedding(scale): angles at positions 0 .. length + offset - 1, inv_freq over dim = D/2.
    seq_len, dim = scale.shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, dtype=torch.float64) / dim))
    sinusoid = torch.arange(0, seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    sin, cos = torch.sin(sinusoid), torch.cos(sinusoid)
    if scale.shape[0] > length:
        scale, sin, cos = scale[-length:], sin[-length:], cos[-length:]
    if downscale:
        scale = 1 / scale
    sin, cos = (torch.repeat_interleave(t * scale, 2, dim=-1) for t in (sin, cos))  # duplicate_interleave
    every_two = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)  # rotate_every_two
    return x * cos + every_two * sin


def _torchscale_attention(torch, q, k, v, incremental=False):
    """torchscale MultiheadAttention's core: q * D^-1/2, xPos on k (offset 0, downscale) and q, softmax, v."""
    q = q * q.shape[-1] ** -0.5
    offset = k.shape[-2] - 1 if incremental else 0
    k = _torchscale_xpos(torch, k, offset=0, downscale=True)
    q = _torchscale_xpos(torch, q, offset=offset, downscale=False)
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def test_torchscale_transform_is_ours_at_uncentred_rotation_and_centred_scale():
    # torchscale rotates at positions 0 .. L-1 but scales at n + min_pos, min_pos = -(L // 2) rounded down:
    # its q equals zeta^(min_pos / scale_base) times ours at positions 0 .. L-1.
    torch = pytest.importorskip("torch")
    length = X.shape[2]
    min_pos = -length // 2
    for downscale in (False, True):
        theirs = _torchscale_xpos(torch, torch.from_numpy(X), downscale=downscale).numpy()
        ours = apply_xpos(X, np.arange(length), downscale=downscale, layout="interleaved")
        shift = xpos_scales(np.array([min_pos]), X.shape[-1], downscale=downscale)[0]  # (r/2,)
        np.testing.assert_allclose(theirs, ours * np.repeat(shift, 2), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("centred", [False, True])
def test_torchscale_attention_output(centred):
    # Scores depend only on n - m, so uncentred and centred positions both give torchscale's output.
    torch = pytest.importorskip("torch")
    q, k, v = RNG.standard_normal((3, 1, 2, 9, 8))
    expected = _torchscale_attention(torch, *map(torch.from_numpy, (q, k, v))).numpy()
    positions = np.arange(9) - (9 // 2 + 1 if centred else 0)
    got = xpos_attention(q, k, v, q_positions=positions, k_positions=positions, layout="interleaved")
    np.testing.assert_allclose(got.out, expected, atol=1e-13)


def test_torchscale_incremental_decoding():
    # One new query with offset = src_len - 1 over src_len cached keys.
    torch = pytest.importorskip("torch")
    q, k, v = RNG.standard_normal((1, 2, 1, 8)), RNG.standard_normal((1, 2, 11, 8)), RNG.standard_normal((1, 2, 11, 8))
    expected = _torchscale_attention(torch, *map(torch.from_numpy, (q, k, v)), incremental=True).numpy()
    got = xpos_attention(q, k, v, q_positions=np.array([10]), k_positions=np.arange(11), layout="interleaved")
    np.testing.assert_allclose(got.out, expected, atol=1e-13)


def _lucidrains_rotate_queries_and_keys(torch, q, k, dim, scale_base=512):
    """rotary-embedding-torch RotaryEmbedding(dim, use_xpos=True).rotate_queries_and_keys (current
    src/ version): interleaved pairs over the first ``dim`` features, scale repeated per pair."""
    seq = torch.arange(q.shape[-2], dtype=torch.float64)
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    angles = torch.repeat_interleave(seq[:, None] * freqs[None, :], 2, dim=-1)  # '... n -> ... (n r)'
    zeta = (torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)
    power = (seq - len(seq) // 2) / scale_base
    scale = torch.repeat_interleave(zeta[None, :] ** power[:, None], 2, dim=-1)

    def apply(t, s):
        middle, right = t[..., :dim], t[..., dim:]
        pairs = middle.reshape(*middle.shape[:-1], -1, 2)
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        return torch.cat((middle * angles.cos() * s + rotated_half * angles.sin() * s, right), dim=-1)

    return apply(q, scale), apply(k, scale**-1)


def test_lucidrains_xpos_partial_rotary():
    torch = pytest.importorskip("torch")
    q, k, v = RNG.standard_normal((3, 1, 2, 10, 12))
    q_theirs, k_theirs = _lucidrains_rotate_queries_and_keys(torch, torch.from_numpy(q), torch.from_numpy(k), dim=8)
    expected = torch.softmax(q_theirs @ k_theirs.transpose(-1, -2) / np.sqrt(12), dim=-1) @ torch.from_numpy(v)
    positions = np.arange(10)
    got = xpos_attention(q, k, v, q_positions=positions, k_positions=positions, rotary_dim=8, layout="interleaved")
    np.testing.assert_allclose(got.out, expected.numpy(), atol=1e-13)
    # Per vector: its scale is centred at len // 2, its rotation is not.
    shift = np.repeat(xpos_scales(np.array([-(10 // 2)]), 8)[0], 2)
    np.testing.assert_allclose(q_theirs.numpy()[..., :8], apply_xpos(q, positions, rotary_dim=8, layout="interleaved")[..., :8] * shift, atol=1e-13)


# --------------------------------------------------------------------------
# The mechanism.
# --------------------------------------------------------------------------


def _problem(seed, b=1, hq=4, hkv=2, nq=3, nk=5, d=6, dv=2):
    rng = np.random.default_rng(seed)
    return dict(
        q=rng.standard_normal((b, hq, nq, d)),
        k=rng.standard_normal((b, hkv, nk, d)),
        v=rng.standard_normal((b, hkv, nk, dv)),
    ), rng


def test_attention_is_dense_attention_on_transformed_queries_and_keys():
    arrays, _ = _problem(1, b=2, nq=4, nk=7, d=10)
    positions = dict(q_positions=np.arange(3, 7) - 5, k_positions=np.arange(7) - 5)
    xpos = dict(rotary_dim=6, base=500.0, scale_base=4.0, gamma=0.7, layout="half")
    got = xpos_attention(**arrays, **positions, **xpos, causal=True)
    q = apply_xpos(arrays["q"], positions["q_positions"], **xpos)
    k = apply_xpos(arrays["k"], positions["k_positions"], downscale=True, **xpos)
    out, lse = naive_dense(q, k, arrays["v"], causal=True)
    np.testing.assert_allclose(got.out, out, atol=1e-13)
    np.testing.assert_allclose(got.lse, lse, atol=1e-13)


def _finite_differences(params, dout, dlse, arrays, name):
    return finite_differences(xpos_attention, arrays, params, dout, dlse, name)


@pytest.mark.parametrize(
    "causal, layout, rotary_dim, with_dlse",
    list(itertools.product([False, True], ["interleaved", "half"], [None, 4], [True, False])),
)
def test_vjp_matches_finite_differences(causal, layout, rotary_dim, with_dlse):
    arrays, rng = _problem(3)  # GQA 4:2, Nq = 3 < Nk = 5
    arrays["bias"] = rng.standard_normal((4, 1, 5))
    params = dict(q_positions=np.arange(2, 5) + 6, k_positions=np.arange(5) + 6, rotary_dim=rotary_dim,
                  layout=layout, scale_base=3.0, gamma=0.5, causal=causal)  # fmt: skip
    dout = rng.standard_normal((1, 4, 3, 2))
    dlse = rng.standard_normal((1, 4, 3)) if with_dlse else None
    grads = xpos_attention_vjp(dout, **arrays, dlse=dlse, **params)
    assert set(grads) == {"q", "k", "v", "bias"}
    for name in arrays:
        numeric = _finite_differences(params, dout, dlse, arrays, name)
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-3), name


def test_logits_closed_form():
    # q = k = (1, 0), one query at 7 over keys at 0..7, r = D = 2 (one pair, zeta = 0.4/1.4 = 2/7),
    # scale 1: the logit of key m is zeta^((7 - m)/scale_base) * cos(7 - m).
    q = np.array([[[[1.0, 0.0]]]])
    k = np.broadcast_to(q, (1, 1, 8, 2)).copy()
    result = xpos_attention(q, k, np.eye(8)[None, None], q_positions=np.array([7]), k_positions=np.arange(8),
                            scale_base=4.0, scale=1.0)  # fmt: skip
    angle = (7 - np.arange(8)).astype(float)
    logits = (2 / 7) ** ((7 - np.arange(8)) / 4.0) * np.cos(angle)
    np.testing.assert_allclose(result.out[0, 0, 0], np.exp(logits) / np.exp(logits).sum(), rtol=1e-13)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------

Q, K, V = RNG.standard_normal((1, 4, 3, 6)), RNG.standard_normal((1, 2, 5, 6)), RNG.standard_normal((1, 2, 5, 4))
GOOD = dict(q=Q, k=K, v=V, q_positions=np.arange(2, 5), k_positions=np.arange(5))

BAD = {
    "odd rotary_dim": (dict(rotary_dim=5), "rotary_dim", "even int"),
    "rotary_dim above D": (dict(rotary_dim=8), "rotary_dim", "head dim 6"),
    "scale_base zero": (dict(scale_base=0.0), "scale_base", "(0.0, inf)"),
    "scale_base negative": (dict(scale_base=-512.0), "scale_base", "(0.0, inf)"),
    "gamma zero": (dict(gamma=0.0), "gamma", "(0.0, inf)"),
    "gamma inf": (dict(gamma=float("inf")), "gamma", "finite"),
    "base zero": (dict(base=0.0), "base", "(0.0, inf)"),
    "layout unknown": (dict(layout="every_two"), "layout", "interleaved"),
    "q_positions too long": (dict(q_positions=np.arange(4)), "q_positions", "shape (3,)"),
    "k_positions float": (dict(k_positions=np.arange(5.0)), "k_positions", "integer"),
    "positions overflow the scale": (dict(k_positions=np.arange(5) + 10**6), "k_positions", "|positions| <= 286"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_forward_rejects(case):
    overrides, argument, expected = BAD[case]
    with pytest.raises(SpecError) as info:
        xpos_attention(**(GOOD | overrides))
    assert info.value.argument == argument
    assert expected in str(info.value)


@pytest.mark.parametrize("case", ["scale_base zero", "gamma zero", "positions overflow the scale"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_vjp_and_numba_reject_the_same(case, backend):
    overrides, argument, _ = BAD[case]
    with pytest.raises(SpecError) as info:
        xpos_attention_vjp(np.zeros((1, 4, 3, 4)), **(GOOD | {"backend": backend} | overrides))
    assert info.value.argument == argument


def test_encoding_functions_reject():
    with pytest.raises(SpecError, match="downscale"):
        apply_xpos(X, POSITIONS, downscale="keys")
    with pytest.raises(SpecError, match="rotary_dim"):
        xpos_scales(POSITIONS, 3)


# --------------------------------------------------------------------------
# Random problems: the numba backend and the invariants.
# --------------------------------------------------------------------------


#: With |positions| up to about 130, |n| / scale_base stays below 5, so the scale factors stay
#: below (1.4 / 0.4) ** 5 ~ 500 and logits ordinary. A scale_base of 8 gives factors of 10**6
#: and logits of 10**13, where float32 results carry no information to compare.
SCALE_BASES = st.sampled_from([32.0, 64.0, 512.0])


@given(problem=rotary_problems(max_offset=100), scale_base=SCALE_BASES, precision=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_numba_matches_reference(problem, scale_base, precision, seed):
    q, k, v, params = problem
    check_numba_agreement(xpos_attention, xpos_attention_vjp, q, k, v, dict(params, scale_base=scale_base), precision, seed)


@given(problem=rotary_problems(max_offset=100), scale_base=SCALE_BASES, gamma=st.sampled_from([0.4, 0.05, 2.0]))
def test_encoding_invariants(problem, scale_base, gamma):
    q, k, _, params = problem
    encoding = {"scale_base": scale_base, "gamma": gamma}
    encoding |= {} if params["rotary_dim"] is None else {"rotary_dim": params["rotary_dim"]}
    with_layout = dict(encoding, layout=params["layout"])
    properties.pair_norms_scale(apply_xpos, q, params["q_positions"], with_layout, rtol=1e-9)
    properties.position_zero_is_identity(apply_xpos, q, with_layout)
    group = q.shape[1] // k.shape[1]
    properties.relative_dot_products(apply_xpos, q, np.repeat(k, group, axis=1), params["q_positions"],
                                     params["k_positions"], with_layout, rtol=1e-9)  # fmt: skip
    for downscale in (False, True):
        transform = functools.partial(apply_xpos, downscale=downscale)
        rope_properties.layouts_agree_under_permutation(transform, q, params["q_positions"], encoding)


@given(problem=rotary_problems(max_offset=100), shift=st.integers(-300, 300), backend=st.sampled_from(["reference", "numba"]))
def test_shifting_every_position_changes_nothing(problem, shift, backend):
    q, k, v, params = problem
    params = dict(params, scale_base=64.0)
    rope_properties.position_shift_invariance(functools.partial(xpos_attention, backend=backend), q, k, v, params,
                                              shift=shift, rtol=1e-9)  # fmt: skip


def test_at_position_zero_xpos_is_rope():
    zero = np.zeros(X.shape[2], np.int64)
    np.testing.assert_array_equal(apply_xpos(X, zero), X)
    np.testing.assert_allclose(apply_xpos(X, zero, layout="half"), apply_rope(X, zero), rtol=0)


# --------------------------------------------------------------------------
# The cases.
# --------------------------------------------------------------------------


def test_cases_are_small_and_well_formed():
    ids = [case.id for case in cases()]
    assert len(ids) == len(set(ids))
    for case in cases():
        arrays = case.arrays(np.random.default_rng(case.seed))
        assert case.id.startswith("xpos/") and case.mechanism == "xpos"
        assert sum(a.nbytes for a in arrays.values()) < 64_000, case.id
        xpos_attention(**arrays, **case.params)
    assert registry.get("xpos").flags() == FLAGS
    assert {flag for case in cases() for flag in case.flags} <= set(FLAGS) | set(SHARED_FLAGS)


def test_layout_defaults_agree_with_rope_and_torchscale_cases_name_theirs():
    # The layout default is RoPE's ("half", HF); torchscale's interleaved layout is always explicit in the cases.
    for function in (xpos_attention, apply_xpos, rope_attention, apply_rope):
        assert inspect.signature(function).parameters["layout"].default == "half", function.__name__
    assert all(case.params["layout"] in ("half", "interleaved") for case in cases())
