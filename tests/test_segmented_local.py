"""lucidrains' local-attention: the canonical form against the pattern written out key by key,
the "lucidrains" preset against a NumPy transcription of LocalAttention.forward (local-attention
1.11.2, local_attention/local_attention.py and rotary.py) written here, the VJP against finite
differences, and the invariants."""


import numpy as np
import pytest

from refattn import SpecError, dense_attention
from refattn.position import apply_rope
from refattn.segmented import local_attention, local_attention_vjp
from refattn.segmented.local import properties
from refattn.segmented.pattern import depends_only_on_pattern
from tests.finite_differences import finite_differences

MAX_NEG = -np.finfo(np.float64).max


def _rotary(x, positions):
    """rotary.py: freqs = t * inv_freq, cat(freqs, freqs); x cos + rotate_half(x) sin."""
    d = x.shape[-1]
    inv_freq = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    freqs = np.concatenate([positions[:, None] * inv_freq] * 2, axis=-1)
    half = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(freqs) + half * np.sin(freqs)


def _look_around(x, backward, forward, pad_value):
    """look_around over axis 1 (windows): window w gets windows w - backward ... w + forward, flattened."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (backward, forward)
    padded = np.pad(x, pad, constant_values=pad_value)
    windows = x.shape[1]
    return np.concatenate([padded[:, w: w + windows] for w in range(backward + forward + 1)], axis=2)


def _lucidrains(q, k, v, *, window_size, causal=False, look_backward=1, look_forward=None, exact_windowsize=False,
                shared_qk=False, rotary=False, autopad=False):  # fmt: skip
    """LocalAttention.forward for (B, H, N, D) inputs, heads folded into batch, no input mask."""
    look_forward = (0 if causal else 1) if look_forward is None else look_forward
    b, h, n, d = q.shape
    q, k, v = (x.reshape(b * h, n, -1) for x in (q, k, v))
    if autopad:
        extra = -n % window_size
        q, k, v = (np.pad(x, [(0, 0), (0, extra), (0, 0)]) for x in (q, k, v))
    length = q.shape[1]
    windows = length // window_size
    if shared_qk:
        k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
    b_t = np.arange(length).reshape(1, windows, window_size)
    bq, bk, bv = (x.reshape(x.shape[0], windows, window_size, -1) for x in (q, k, v))
    bq = bq * d ** -0.5
    bk, bv = (_look_around(x, look_backward, look_forward, -1) for x in (bk, bv))
    if rotary:
        frame = np.arange(bk.shape[2])
        bq = _rotary(bq, frame[-window_size:])  # q_freqs = freqs[..., -q_len:, :]
        bk = _rotary(bk, frame)
    bq_k = _look_around(b_t, look_backward, look_forward, -1)[:, :, None, :]
    bq_t = b_t[:, :, :, None]
    pad_mask = bq_k == -1
    sim = np.einsum("bwie,bwje->bwij", bq, bk)
    if shared_qk:
        sim = np.where(bq_t == bq_k, -5e4, sim)
    if causal:
        causal_mask = bq_t < bq_k
        if exact_windowsize:
            causal_mask = causal_mask | (bq_t > bq_k + window_size * look_backward)
        sim = np.where(causal_mask, MAX_NEG, sim)
    if not causal and exact_windowsize:
        window_mask = (bq_k - window_size * look_forward > bq_t) | (bq_t > bq_k + window_size * look_backward) | pad_mask
        sim = np.where(window_mask, MAX_NEG, sim)
    else:
        sim = np.where(pad_mask, MAX_NEG, sim)
    attn = np.exp(sim - sim.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    out = np.einsum("bwij,bwje->bwie", attn, bv).reshape(b * h, length, -1)[:, :n]
    return out.reshape(b, h, n, -1)


def _qkv(seed, n=12, h=2, d=4):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((1, h, n, d)) for _ in range(3))


LUCIDRAINS_OPTIONS = [
    dict(window_size=3),
    dict(window_size=3, causal=True, look_backward=2),
    dict(window_size=3, exact_windowsize=True),
    dict(window_size=3, causal=True, exact_windowsize=True),
    dict(window_size=4, look_backward=0, look_forward=2, shared_qk=True),
    dict(window_size=3, causal=True, shared_qk=True),
    dict(window_size=3, rotary=True),
    dict(window_size=3, causal=True, rotary=True),
    dict(window_size=5, autopad=True),
    dict(window_size=5, autopad=True, causal=True, rotary=True, shared_qk=True),
]


@pytest.mark.parametrize("options", LUCIDRAINS_OPTIONS, ids=lambda o: "-".join(f"{a}={b}" for a, b in o.items()))
def test_lucidrains_preset_is_the_package(options):
    q, k, v = _qkv(1)
    got = local_attention(q, k, v, **options, preset="lucidrains")
    np.testing.assert_allclose(got.out, _lucidrains(q, k, v, **options), atol=1e-12)


def _canonical_pattern(n, ws, lb, lf, causal, exact):
    """Key j is in query i's look-around blocks (and the causal/exact trims): the definition, by loops."""
    return np.array([[i // ws - lb <= j // ws <= i // ws + lf and (not causal or j <= i)
                      and (not exact or (i - ws * lb <= j and (causal or j <= i + ws * lf)))
                      for j in range(n)] for i in range(n)])  # fmt: skip


@pytest.mark.parametrize("options", [
    dict(window_size=3, look_backward=1, look_forward=1),
    dict(window_size=3, look_backward=2, look_forward=0, causal=True, exact_windowsize=True),
    dict(window_size=5, look_backward=1, look_forward=1, autopad=True, exact_windowsize=True),
])  # fmt: skip
def test_canonical_is_dense_attention_over_the_pattern(options):
    q, k, v = _qkv(2)
    got = local_attention(q, k, v, **options)
    allowed = _canonical_pattern(12, options["window_size"], options["look_backward"], options["look_forward"],
                                 options.get("causal", False), options.get("exact_windowsize", False))  # fmt: skip
    want = dense_attention(q, k, v, mask=allowed)
    np.testing.assert_allclose(got.out, want.out, atol=1e-13)
    np.testing.assert_allclose(got.lse, want.lse, atol=1e-13)


def test_canonical_rotary_is_absolute_rope_and_shared_qk_is_a_self_score():
    q, k, v = _qkv(3)
    got = local_attention(q, k, v, window_size=3, rotary=True, shared_qk=True)
    k_hat = k / np.linalg.norm(k, axis=-1, keepdims=True)
    positions = np.arange(12)
    rq, rk = apply_rope(q, positions), apply_rope(k_hat, positions)
    s = np.einsum("bhid,bhjd->bhij", rq, rk) / 2.0
    s = np.where(np.eye(12, dtype=bool), -5e4, s)
    s = np.where(_canonical_pattern(12, 3, 1, 1, False, False), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhij,bhje->bhie", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(got.out, want, atol=1e-12)


def test_the_two_lucidrains_defects_are_what_the_flags_say():
    """Looking forward, the package's rotary differs from absolute RoPE; autopadding attends zero keys."""
    q, k, v = _qkv(4, n=10)
    shifted = local_attention(q, k, v, window_size=5, rotary=True, preset="lucidrains")
    canonical = local_attention(q, k, v, window_size=5, rotary=True)
    assert np.max(np.abs(shifted.out - canonical.out)) > 1e-2
    np.testing.assert_allclose(local_attention(q, k, v, window_size=5, rotary=True, rotary_query_shift=False,
                                               preset="lucidrains").out, canonical.out, atol=1e-13)  # fmt: skip
    padded = local_attention(q, k, v, window_size=4, autopad=True, preset="lucidrains")
    masked = local_attention(q, k, v, window_size=4, autopad=True)
    assert np.max(np.abs(padded.out - masked.out)) > 1e-2


@pytest.mark.parametrize("options", [
    dict(window_size=2, causal=True, exact_windowsize=True, look_backward=1),
    dict(window_size=2, shared_qk=True, rotary=True),
    dict(window_size=3, autopad=True, preset="lucidrains", shared_qk=True),
])  # fmt: skip
def test_vjp_matches_finite_differences(options):
    q, k, v = _qkv(5, n=5, d=2)
    if not options.get("autopad"):
        q, k, v = (x[:, :, :4] for x in (q, k, v))
    arrays = dict(q=q, k=k, v=v)
    rng = np.random.default_rng(6)
    result = local_attention(**arrays, **options)
    dout, dlse = rng.standard_normal(result.out.shape), rng.standard_normal(result.lse.shape)
    grads = local_attention_vjp(dout, **arrays, **options, dlse=dlse)
    for name in arrays:
        want = finite_differences(local_attention, arrays, options, dout, dlse, name)
        np.testing.assert_allclose(grads[name], want, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_everything_is_dense(causal):
    q, k, v = _qkv(7)
    properties.covering_window_is_dense(local_attention, dense_attention, q, k, v,
                                        dict(window_size=5, autopad=True, causal=causal))  # fmt: skip


def test_output_depends_only_on_the_pattern():
    q, k, v = _qkv(8, n=9, h=1)
    options = dict(window_size=3, look_backward=1, look_forward=0, causal=True)
    depends_only_on_pattern(local_attention, local_attention_vjp, q, k, v, options,
                            _canonical_pattern(9, 3, 1, 0, True, False))  # fmt: skip


@pytest.mark.parametrize("change, name", [
    (dict(window_size=5), "window_size"),
    (dict(window_size=0), "window_size"),
    (dict(causal=True, look_forward=1), "look_forward"),
    (dict(look_backward=-1), "look_backward"),
    (dict(preset="x"), "preset"),
    (dict(attend_padding="yes"), "attend_padding"),
])  # fmt: skip
def test_bad_input(change, name):
    q, k, v = _qkv(9)
    with pytest.raises(SpecError) as error:
        local_attention(q, k, v, **dict(dict(window_size=3), **change))
    assert error.value.argument == name
