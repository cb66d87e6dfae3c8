"""RoPE: closed forms, the published formulas (HF Llama / GPT-NeoX / GPT-J, Meta's Llama)
written in torch, the hand-derived VJP against finite differences, bad input, the
numba backend against the reference, and the invariants."""

import functools
import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import SpecError, dense_attention
from refattn.position.rope import (
    apply_rope,
    properties,
    rope_angles,
    rope_attention,
    rope_attention_vjp,
)
from refattn.position.rope.cases import cases
from refattn.strategies import dense_problems
from tests.agreement import check_numba_agreement
from tests.finite_differences import finite_differences
from tests.naive_dense import naive_dense

# --------------------------------------------------------------------------
# A second formulation, written from the paper's eq. (34) with plain loops.
# --------------------------------------------------------------------------


def naive_rotation(x, positions, rotary_dim=None, base=10000.0, position_scale=1.0, layout="half"):
    """Rotate pair t of each vector by (p / position_scale) * base^(-2t/r), one scalar at a time."""
    r = x.shape[-1] if rotary_dim is None else rotary_dim
    out = np.array(x, dtype=np.float64)
    for b, h, n in np.ndindex(x.shape[:3]):
        for t in range(r // 2):
            i, j = (t, t + r // 2) if layout == "half" else (2 * t, 2 * t + 1)
            angle = positions[n] / position_scale * base ** (-2 * t / r)
            c, s = math.cos(angle), math.sin(angle)
            out[b, h, n, i] = x[b, h, n, i] * c - x[b, h, n, j] * s
            out[b, h, n, j] = x[b, h, n, j] * c + x[b, h, n, i] * s
    return out


RNG = np.random.default_rng(20240917)
X = RNG.standard_normal((2, 3, 5, 12))
POSITIONS = np.array([0, 1, 7, 130, 4097])


def test_angles_closed_form():
    # base 100, r = 4: frequencies 1 and 100^(-1/2) = 0.1.
    np.testing.assert_allclose(rope_angles(np.array([0, 1, 3]), 4, base=100.0), [[0, 0], [1, 0.1], [3, 0.3]], rtol=1e-15)
    np.testing.assert_allclose(rope_angles(np.array([3]), 4, base=100.0, position_scale=2.0), [[1.5, 0.15]], rtol=1e-15)


def test_unit_vector_turns_by_the_angle():
    # r = 2: the pair (1, 0) at position p becomes (cos p, sin p), in both layouts.
    x = np.zeros((1, 1, 3, 2))
    x[..., 0] = 1.0
    positions = np.array([0, 1, 5])
    for layout in ("half", "interleaved"):
        out = apply_rope(x, positions, layout=layout)
        np.testing.assert_allclose(out[0, 0], np.stack([np.cos(positions), np.sin(positions)], -1), rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotary_dim, base, position_scale", [(None, 10000.0, 1.0), (8, 500000.0, 1.0), (6, 10000.0, 4.0)])
def test_apply_rope_matches_the_loops(layout, rotary_dim, base, position_scale):
    params = dict(rotary_dim=rotary_dim, base=base, position_scale=position_scale, layout=layout)
    np.testing.assert_allclose(apply_rope(X, POSITIONS, **params), naive_rotation(X, POSITIONS, **params), rtol=0, atol=1e-12)


def test_interleaved_is_meta_complex_multiplication():
    # Meta's Llama: view pairs (2t, 2t+1) as complex numbers and multiply by exp(i theta).
    theta = POSITIONS[:, None] * 10000.0 ** (-np.arange(0, 12, 2) / 12)
    x_complex = X[..., 0::2] + 1j * X[..., 1::2]
    rotated = x_complex * np.exp(1j * theta)
    expected = np.stack([rotated.real, rotated.imag], axis=-1).reshape(X.shape)
    np.testing.assert_allclose(apply_rope(X, POSITIONS, layout="interleaved"), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_layouts_are_one_permutation_apart(rotary_dim):
    # interleaved(x) = P^-1 half(P x), P gathering the even then the odd rotated dims
    # (the permutation HF's convert_llama_weights_to_hf.py applies to Meta's q/k weights).
    r = rotary_dim or X.shape[-1]
    gather = np.r_[np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, X.shape[-1])]
    half = apply_rope(X[..., gather], POSITIONS, rotary_dim=rotary_dim, layout="half")
    interleaved = apply_rope(X, POSITIONS, rotary_dim=rotary_dim, layout="interleaved")
    np.testing.assert_allclose(half[..., np.argsort(gather)], interleaved, atol=1e-13)


def test_partial_rotary_leaves_the_tail_and_uses_r_for_frequencies():
    out = apply_rope(X, POSITIONS, rotary_dim=4)
    np.testing.assert_array_equal(out[..., 4:], X[..., 4:])
    # Pair 1 of r = 4 in the half layout is dims (1, 3), turned by p * 10000^(-2/4) = p / 100.
    angle = POSITIONS / 100.0
    np.testing.assert_allclose(out[..., 1], X[..., 1] * np.cos(angle) - X[..., 3] * np.sin(angle), atol=1e-13)


def test_float32_emulation_is_close_but_not_exact():
    exact = apply_rope(X, POSITIONS)
    emulated = apply_rope(X, POSITIONS, precision="float32")
    difference = np.max(np.abs(emulated - exact)) / np.max(np.abs(exact))
    assert 1e-9 < difference < 1e-3  # angles near 4097 radians are formed in float32


# --------------------------------------------------------------------------
# The published formulas, written in torch from their code.
# --------------------------------------------------------------------------


def _hf_inv_freq(torch, dim, base, dtype):
    """HF _compute_default_rope_parameters: 1 / base^(arange(0, dim, 2) / dim), in ``dtype`` (float32 in HF)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))


def _hf_rotate_half(torch, x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _hf_llama(torch, q, positions, *, base=10000.0, factor=1.0, rotary_dim=None, dtype=None):
    """HF LlamaRotaryEmbedding.forward + apply_rotary_pos_emb (q (B, H, N, D)); linear scaling
    divides inv_freq by ``factor``; a partial ``rotary_dim`` rotates q[..., :r] as GPT-NeoX does."""
    dtype = dtype or torch.float64
    r = rotary_dim or q.shape[-1]
    inv_freq = _hf_inv_freq(torch, r, base, dtype) / factor
    freqs = positions.to(dtype)[:, None] * inv_freq[None, :]  # (N, r/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, r)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    q_rot, q_pass = q[..., :r], q[..., r:]
    return torch.cat((q_rot * cos + _hf_rotate_half(torch, q_rot) * sin, q_pass), dim=-1)


def _gptj(torch, q, positions, rotary_dim):
    """HF GPT-J: create_sinusoidal_positions + rotate_every_two + repeat_interleave on q[..., :rotary_dim]."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    sinusoid = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    sin = torch.repeat_interleave(torch.sin(sinusoid), 2, dim=-1)
    cos = torch.repeat_interleave(torch.cos(sinusoid), 2, dim=-1)
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    every_two = torch.stack((-q_rot[..., 1::2], q_rot[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((q_rot * cos + every_two * sin, q_pass), dim=-1)


def _meta_llama(torch, q, positions, base=10000.0):
    """Meta's llama/model.py: precompute_freqs_cis + view_as_complex."""
    dim = q.shape[-1]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    freqs_cis = torch.polar(torch.ones(len(positions), dim // 2, dtype=torch.float64), positions.double()[:, None] * freqs)
    q_complex = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(q_complex * freqs_cis).flatten(-2)


def test_hf_llama_half_layout_base_and_linear_scaling():
    torch = pytest.importorskip("torch")
    q, p = torch.from_numpy(X), torch.from_numpy(POSITIONS)
    for base, factor in [(10000.0, 1.0), (500000.0, 1.0), (10000.0, 8.0)]:
        expected = _hf_llama(torch, q, p, base=base, factor=factor).numpy()
        got = apply_rope(X, POSITIONS, base=base, position_scale=factor, layout="half")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-11)


def test_gpt_neox_partial_rotary():
    torch = pytest.importorskip("torch")
    rotary_ndims = int(X.shape[-1] * 0.5)  # GPT-NeoX rotary_pct = 0.5: pairs (t, t + 3), not (t, t + 6)
    expected = _hf_llama(torch, torch.from_numpy(X), torch.from_numpy(POSITIONS), rotary_dim=rotary_ndims).numpy()
    np.testing.assert_allclose(apply_rope(X, POSITIONS, rotary_dim=rotary_ndims, layout="half"), expected, atol=1e-11)


def test_gptj_interleaved_partial_rotary():
    torch = pytest.importorskip("torch")
    expected = _gptj(torch, torch.from_numpy(X), torch.from_numpy(POSITIONS), rotary_dim=8).numpy()
    np.testing.assert_allclose(apply_rope(X, POSITIONS, rotary_dim=8, layout="interleaved"), expected, atol=1e-11)


def test_meta_llama_complex_view():
    torch = pytest.importorskip("torch")
    expected = _meta_llama(torch, torch.from_numpy(X), torch.from_numpy(POSITIONS), base=500000.0).numpy()
    np.testing.assert_allclose(apply_rope(X, POSITIONS, base=500000.0, layout="interleaved"), expected, atol=1e-11)


def test_hf_float32_angles_differ_by_float32_rounding_of_the_angle():
    # HF forms inv_freq and the angles in float32 even for a float64 model: at position 4097
    # its rotation is off by about eps32 * 4097 radians, far above the float64 budget 1e-10
    # and within a few float32 roundoffs of the angle.
    torch = pytest.importorskip("torch")
    hf = _hf_llama(torch, torch.from_numpy(X), torch.from_numpy(POSITIONS), dtype=torch.float32).numpy()
    exact = apply_rope(X, POSITIONS)
    off = np.max(np.abs(hf - exact)) / np.max(np.abs(X))
    assert 1e-10 < off <= 4 * 2.0**-24 * POSITIONS.max()


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


def test_attention_is_dense_attention_on_rotated_queries_and_keys():
    arrays, _ = _problem(1, b=2, nq=4, nk=7, d=10)
    positions = dict(q_positions=np.arange(3, 7) + 40, k_positions=np.arange(7) + 40)
    rope = dict(rotary_dim=6, base=500.0, position_scale=2.0, layout="interleaved")
    got = rope_attention(**arrays, **positions, **rope, causal=True, softcap=3.0)
    q = naive_rotation(arrays["q"], positions["q_positions"], **rope)
    k = naive_rotation(arrays["k"], positions["k_positions"], **rope)
    out, lse = naive_dense(q, k, arrays["v"], causal=True, softcap=3.0)
    np.testing.assert_allclose(got.out, out, atol=1e-13)
    np.testing.assert_allclose(got.lse, lse, atol=1e-13)


def test_cached_decoding_matches_the_full_sequence():
    # The last two queries of a causal pass over 9 tokens equal a decode of 2 queries at
    # positions 7, 8 over the 9 cached keys (bottom-right alignment).
    arrays, _ = _problem(2, nq=9, nk=9)
    full = rope_attention(**arrays, q_positions=np.arange(9), k_positions=np.arange(9), causal=True)
    step = rope_attention(arrays["q"][:, :, 7:], arrays["k"], arrays["v"], q_positions=np.arange(7, 9),
                          k_positions=np.arange(9), causal=True)  # fmt: skip
    np.testing.assert_allclose(step.out, full.out[:, :, 7:], atol=1e-14)
    np.testing.assert_allclose(step.lse, full.lse[:, :, 7:], atol=1e-14)


def _finite_differences(params, dout, dlse, arrays, name):
    return finite_differences(rope_attention, arrays, params, dout, dlse, name)


VJP_COMBINATIONS = list(
    itertools.product(
        [None, "bottom_right"],  # causal
        ["half", "interleaved"],  # layout
        [None, 4],  # rotary_dim of D = 6
        [True, False],  # with dlse
    )
)


@pytest.mark.parametrize("causal, layout, rotary_dim, with_dlse", VJP_COMBINATIONS)
def test_vjp_matches_finite_differences(causal, layout, rotary_dim, with_dlse):
    arrays, rng = _problem(3)  # GQA 4:2, Nq = 3 < Nk = 5
    arrays["bias"] = rng.standard_normal((4, 1, 5))
    params = dict(q_positions=np.arange(2, 5) + 11, k_positions=np.arange(5) + 11, rotary_dim=rotary_dim,
                  layout=layout, base=100.0, causal=causal is not None)  # fmt: skip
    dout = rng.standard_normal((1, 4, 3, 2))
    dlse = rng.standard_normal((1, 4, 3)) if with_dlse else None
    grads = rope_attention_vjp(dout, **arrays, dlse=dlse, **params)
    assert set(grads) == {"q", "k", "v", "bias"}
    for name in arrays:
        numeric = _finite_differences(params, dout, dlse, arrays, name)
        assert grads[name].shape == arrays[name].shape
        assert np.max(np.abs(grads[name] - numeric)) <= 1e-7 * max(np.max(np.abs(numeric)), 1e-3), name


def test_vjp_rotates_the_gradient_back():
    # With one key, the weights are 1 and d lse / d q~ = scale * k~: dq = R(theta_q)^T (scale * k~).
    arrays, _ = _problem(4, hq=1, hkv=1, nq=2, nk=1)
    params = dict(q_positions=np.array([5, 9]), k_positions=np.array([2]))
    grads = rope_attention_vjp(np.zeros((1, 1, 2, 2)), **arrays, dlse=np.ones((1, 1, 2)), **params)
    k_rotated = naive_rotation(arrays["k"], params["k_positions"])  # (1, 1, 1, 6)
    for i, p in enumerate(params["q_positions"]):
        back = naive_rotation(k_rotated[:, :, :1] / np.sqrt(6), [-p])  # R(theta_p)^T = R(-theta_p)
        np.testing.assert_allclose(grads.q[:, :, i], back[:, :, 0], atol=1e-14)


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------

Q, K, V = RNG.standard_normal((1, 4, 3, 6)), RNG.standard_normal((1, 2, 5, 6)), RNG.standard_normal((1, 2, 5, 4))
GOOD = dict(q=Q, k=K, v=V, q_positions=np.arange(2, 5), k_positions=np.arange(5))

BAD = {
    "odd rotary_dim": (dict(rotary_dim=3), "rotary_dim", "even int"),
    "rotary_dim above D": (dict(rotary_dim=8), "rotary_dim", "at most the head dim 6"),
    "rotary_dim zero": (dict(rotary_dim=0), "rotary_dim", "even int >= 2"),
    "rotary_dim negative": (dict(rotary_dim=-2), "rotary_dim", "even int >= 2"),
    "rotary_dim float": (dict(rotary_dim=4.0), "rotary_dim", "even int"),
    "rotary_dim bool": (dict(rotary_dim=True), "rotary_dim", "even int"),
    "odd head dim without rotary_dim": (dict(q=Q[..., :5], k=K[..., :5]), "rotary_dim", "head dim 5 is odd"),
    "base zero": (dict(base=0.0), "base", "(0.0, inf)"),
    "base negative": (dict(base=-10000.0), "base", "(0.0, inf)"),
    "base nan": (dict(base=float("nan")), "base", "finite"),
    "position_scale zero": (dict(position_scale=0.0), "position_scale", "(0.0, inf)"),
    "position_scale negative": (dict(position_scale=-2.0), "position_scale", "(0.0, inf)"),
    "layout unknown": (dict(layout="neox"), "layout", "interleaved"),
    "q_positions too short": (dict(q_positions=np.arange(2)), "q_positions", "shape (3,)"),
    "k_positions too long": (dict(k_positions=np.arange(6)), "k_positions", "shape (5,)"),
    "q_positions float": (dict(q_positions=np.arange(3.0)), "q_positions", "integer"),
    "k_positions list": (dict(k_positions=[0, 1, 2, 3, 4]), "k_positions", "numpy array"),
    "q_positions 2-d": (dict(q_positions=np.arange(3)[None]), "q_positions", "shape (3,)"),
    "q rank": (dict(q=Q[0]), "q", "4 dimensions"),
    "mask wrong shape": (dict(mask=np.ones((3, 4), bool)), "mask", "broadcastable"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
    "backend": (dict(backend="cuda"), "backend", "numba"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_forward_rejects(case):
    overrides, argument, expected = BAD[case]
    with pytest.raises(SpecError) as info:
        rope_attention(**(GOOD | overrides))
    assert info.value.argument == argument
    assert expected in str(info.value)


@pytest.mark.parametrize("case", ["odd rotary_dim", "q_positions float", "layout unknown", "q rank"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_vjp_and_numba_reject_the_same(case, backend):
    overrides, argument, _ = BAD[case]
    with pytest.raises(SpecError) as info:
        rope_attention_vjp(np.zeros((1, 4, 3, 4)), **(GOOD | {"backend": backend} | overrides))
    assert info.value.argument == argument


@pytest.mark.parametrize("name, value", [("dout", np.zeros((1, 4, 3, 6))), ("dlse", np.zeros((1, 4, 4)))])
def test_vjp_rejects_cotangents_of_the_wrong_shape(name, value):
    cotangents = {"dout": np.zeros((1, 4, 3, 4))} | {name: value}
    with pytest.raises(SpecError) as info:
        rope_attention_vjp(cotangents.pop("dout"), **GOOD, **cotangents)
    assert info.value.argument == name


@pytest.mark.parametrize("function, args", [(apply_rope, (X, np.arange(4))), (rope_angles, (np.arange(3), 5))])
def test_encoding_functions_reject(function, args):
    with pytest.raises(SpecError):
        function(*args)


# --------------------------------------------------------------------------
# Random problems: the numba backend and the invariants.
# --------------------------------------------------------------------------


@st.composite
def rotary_problems(draw, max_offset=5000):
    """A dense problem (head dim >= 2) with q/k positions and rotary parameters in ``params``."""
    problem = draw(dense_problems(max_len=20).filter(lambda p: p.shape.head_dim >= 2))
    s = problem.shape
    params = dict(problem.params)
    rotary = st.integers(1, s.head_dim // 2).map(lambda half: 2 * half)
    params["rotary_dim"] = draw(rotary if s.head_dim % 2 else st.one_of(st.none(), rotary))
    params["layout"] = draw(st.sampled_from(["half", "interleaved"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):  # a KV cache at some offset
        offset = draw(st.integers(-max_offset, max_offset))
        params["k_positions"] = offset + np.arange(s.kv_len)
        params["q_positions"] = offset + s.kv_len - s.q_len + np.arange(s.q_len)
    else:  # anything: packed, shuffled, repeated positions
        params["q_positions"] = rng.integers(-max_offset, max_offset, s.q_len)
        params["k_positions"] = rng.integers(-max_offset, max_offset, s.kv_len)
    return problem.q, problem.k, problem.v, params


@given(problem=rotary_problems(), base=st.sampled_from([10000.0, 500000.0, 7.0]), precision=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_numba_matches_reference(problem, base, precision, seed):
    q, k, v, params = problem
    check_numba_agreement(rope_attention, rope_attention_vjp, q, k, v, dict(params, base=base), precision, seed)


@given(problem=rotary_problems(), base=st.sampled_from([10000.0, 500000.0, 7.0]))
def test_encoding_invariants(problem, base):
    q, k, _, params = problem
    encoding = {"base": base} | ({} if params["rotary_dim"] is None else {"rotary_dim": params["rotary_dim"]})
    with_layout = dict(encoding, layout=params["layout"])
    properties.rotation_preserves_norms(apply_rope, q, params["q_positions"], with_layout)
    properties.position_zero_is_identity(apply_rope, q, with_layout)
    properties.layouts_agree_under_permutation(apply_rope, q, params["q_positions"], encoding)
    group = q.shape[1] // k.shape[1]
    properties.relative_dot_products(apply_rope, q, np.repeat(k, group, axis=1), params["q_positions"],
                                     params["k_positions"], with_layout, rtol=1e-9)  # fmt: skip


@given(problem=rotary_problems(max_offset=1000), shift=st.integers(-3000, 3000), backend=st.sampled_from(["reference", "numba"]))
def test_shifting_every_position_changes_nothing(problem, shift, backend):
    q, k, v, params = problem
    attend = functools.partial(rope_attention, backend=backend)
    properties.position_shift_invariance(attend, q, k, v, params, shift=shift, rtol=1e-9)


def test_rotary_dim_equal_to_head_dim_is_the_default():
    arrays, _ = _problem(5)
    positions = dict(q_positions=np.arange(3), k_positions=np.arange(5))
    default = rope_attention(**arrays, **positions)
    explicit = rope_attention(**arrays, **positions, rotary_dim=6)
    np.testing.assert_array_equal(default.out, explicit.out)


def test_at_position_zero_rope_attention_is_dense_attention():
    arrays, _ = _problem(6, nq=1, nk=1)
    zero = np.zeros(1, np.int64)
    result = rope_attention(**arrays, q_positions=zero, k_positions=zero)
    np.testing.assert_allclose(result.out, dense_attention(**arrays).out, rtol=1e-15)


# --------------------------------------------------------------------------
# The cases.
# --------------------------------------------------------------------------


def test_cases_are_small_and_well_formed():
    ids = [case.id for case in cases()]
    assert len(ids) == len(set(ids))
    for case in cases():
        arrays = case.arrays(np.random.default_rng(case.seed))
        assert case.id.startswith("rope/") and case.mechanism == "rope"
        assert arrays["q_positions"].dtype == np.int64 and arrays["k_positions"].dtype == np.int64
        assert sum(a.nbytes for a in arrays.values()) < 64_000, case.id
        rope_attention(**arrays, **case.params)  # the parameters are accepted
