"""The Numba backend (refattn/dense/numba.py) computes the reference's function.

Each case runs the forward (out, lse) and the VJP (every gradient, with and
without a log-sum-exp cotangent) on both backends and compares them normwise,
``max|x - ref| / max|ref|``:

* float64 inputs: at most 1e-10 (the conformance tolerance for float64).
* float32 inputs: at most 1e-5. The kernel computes in float32 (eps 6e-8):
  a dot product of D <= 64 terms, an exp and sums over <= 130 keys each add
  a few eps of relative error, so 1e-5 leaves a margin of ~10x over what we
  observe without letting an algorithmic error (a wrong mask, a missing
  rescale, a dropped tile) through -- those give errors of order 1e-2 and
  more. Two cases are ill-conditioned in float32 whatever the algorithm, and
  get the conformance policy's budget instead: 4x the error of the reference
  itself evaluated in float32 (``precision="float32"``), or 4 float32
  roundings of the largest logit if that is more.
  - A soft-cap of 0.5 on logits of size ~200: the derivative 1 - (capped/c)^2
    cancels, and the reference in float32 errs by ~5e-5 as the kernel does.
  - Logit scale 1e3, logits (and lse) of size ~3e4, where a float32 ulp is
    0.004: the backward recomputes the logits tile by tile (as FlashAttention
    does, with other tile shapes and so other roundings in BLAS) and uses the
    float32 lse, so P = exp(s - lse) is only good to ~1e-3 relative; dv and
    dk, sums of P, inherit that. The forward agrees to 8e-5.

Sizes are small and awkward on purpose (D = 59, lengths 67 and 130 that are
not multiples of the 64-row tiles, Nq != Nk, N = 1), so the whole file runs
in seconds once the kernels are compiled (compiling all of them, both
dtypes, takes ~40 s on two cores; ``cache=True`` keeps them afterwards).
"""

from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn import SpecError, dense_attention, dense_attention_vjp

FLOAT64_TOL = 1e-10
FLOAT32_TOL = 1e-5


def normwise_error(got, want) -> float:
    """max|got - want| / max|want| over finite entries; infinities must coincide exactly."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert not np.any(np.isnan(got)), "NaN in the numba result"
    finite = np.isfinite(want)
    assert np.array_equal(got[~finite], want[~finite]), "infinities differ"
    assert np.all(np.isfinite(got[finite])), "numba result is infinite where the reference is finite"
    if not finite.any():
        return 0.0
    scale = np.max(np.abs(want[finite]))
    if scale == 0:
        # A structurally zero output (one key: the softmax is constant, so dq =
        # dk = 0 without dlse): the kernel must give 0 up to rounding of O(1) terms.
        return float(np.max(np.abs(got[finite])))
    return float(np.max(np.abs(got[finite] - want[finite])) / scale)


def make_problem(seed, b, hq, hkv, nq, nk, d, dv, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, nq, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, nk, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, nk, dv)).astype(dtype)
    dout = rng.standard_normal((b, hq, nq, dv)).astype(dtype)
    dlse = rng.standard_normal((b, hq, nq)).astype(dtype)
    return rng, (q, k, v), dout, dlse


# name: ((B, Hq, Hkv, Nq, Nk, D, Dv), params or a function rng -> params)
SHAPE = (2, 2, 1, 67, 130, 59, 40)
CASES = {
    "plain": ((1, 2, 2, 67, 67, 59, 59), {}),
    "n1": ((1, 2, 1, 1, 1, 8, 8), {}),
    "decode_causal": ((1, 2, 1, 1, 130, 16, 16), {"causal": True}),
    "nq_lt_nk_causal_bottom_right": ((1, 2, 1, 67, 130, 59, 40), {"causal": True}),
    "nq_lt_nk_causal_top_left": ((1, 2, 1, 67, 130, 59, 40), {"causal": True, "causal_alignment": "top_left"}),
    # Nq > Nk bottom-right: the first Nq - Nk queries see no key at all.
    "nq_gt_nk_causal_bottom_right": ((1, 2, 1, 130, 67, 59, 40), {"causal": True}),
    "nq_gt_nk_causal_top_left": ((1, 2, 1, 130, 67, 59, 40), {"causal": True, "causal_alignment": "top_left"}),
    "gqa_8_2_causal": ((2, 8, 2, 67, 67, 16, 24), {"causal": True}),
    "mqa_8_1_window": ((1, 8, 1, 70, 130, 16, 16), {"window": (20, 5)}),
    "window": (SHAPE, {"window": (5, 3)}),
    "window_wider_than_sequence": (SHAPE, {"window": (1000, 1000)}),
    "window_left_only_causal": (SHAPE, {"window": (16, None), "causal": True}),
    "window_right_only_top_left": (SHAPE, {"window": (None, 4), "causal_alignment": "top_left"}),
    "softcap": (SHAPE, {"softcap": 20.0, "scale": 2.0}),
    "softcap_extreme": (SHAPE, {"softcap": 0.5, "scale": 30.0}),
    "bias_full": (SHAPE, lambda rng: {"bias": rng.standard_normal((2, 2, 67, 130))}),
    "bias_broadcast_heads_keys": (SHAPE, lambda rng: {"bias": rng.standard_normal((1, 2, 1, 130))}),
    "bias_2d": (SHAPE, lambda rng: {"bias": rng.standard_normal((67, 130)), "causal": True}),
    # Batch 0 has 130 valid keys, batch 1 has 77: mask (B, 1, 1, Nk).
    "padding_mask": (SHAPE, {"mask": np.arange(130)[None, None, None, :] < np.array([130, 77])[:, None, None, None]}),
    "dropout": (SHAPE, lambda rng: {"dropout_keep": rng.random((2, 2, 67, 130)) >= 0.3, "dropout_p": 0.3}),
    "large_logit_scale": (SHAPE, {"scale": 1e3}),
    "everything": (
        (2, 8, 2, 67, 130, 59, 40),
        lambda rng: {
            "bias": rng.standard_normal((1, 8, 1, 130)),
            "mask": rng.random((2, 1, 67, 130)) < 0.9,
            "window": (40, 2),
            "causal": True,
            "softcap": 5.0,
            "dropout_keep": rng.random((2, 8, 67, 130)) >= 0.3,
            "dropout_p": 0.3,
        },
    ),
}
FLOAT32_CASES = [
    "plain", "n1", "nq_gt_nk_causal_bottom_right", "gqa_8_2_causal", "window", "softcap_extreme",
    "bias_broadcast_heads_keys", "padding_mask", "dropout", "large_logit_scale", "everything",
]  # fmt: skip
ILL_CONDITIONED_IN_FLOAT32 = {"softcap_extreme", "large_logit_scale"}


def run_case(name, dtype, seed=0):
    shape, params = CASES[name]
    rng, qkv, dout, dlse = make_problem(seed, *shape, dtype=dtype)
    params = params(rng) if callable(params) else params
    return qkv, dout, dlse, params


def both_backends(qkv, dout, dlse, params):
    """{output name: (numba value, reference value)} for the forward and both VJPs."""
    pairs = {}
    fast = dense_attention(*qkv, **params, backend="numba")
    ref = dense_attention(*qkv, **params)
    assert fast.aux == {}
    pairs["out"], pairs["lse"] = (fast.out, ref.out), (fast.lse, ref.lse)
    for label, cot in (("", None), ("dlse.", dlse)):
        fast_g = dense_attention_vjp(dout, *qkv, dlse=cot, **params, backend="numba")
        ref_g = dense_attention_vjp(dout, *qkv, dlse=cot, **params)
        assert set(fast_g) == set(ref_g)
        for key in ref_g:
            pairs[f"{label}grad.{key}"] = (fast_g[key], ref_g[key])
    return pairs


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_matches_reference(name):
    qkv, dout, dlse, params = run_case(name, np.float64)
    for output, (got, want) in both_backends(qkv, dout, dlse, params).items():
        assert got.dtype == np.float64 and got.shape == want.shape, output
        error = normwise_error(got, want)
        assert error <= FLOAT64_TOL, f"{name} {output}: normwise error {error:.3e} > {FLOAT64_TOL}"


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_matches_reference(name):
    qkv, dout, dlse, params = run_case(name, np.float32)
    pairs = both_backends(qkv, dout, dlse, params)
    budgets = dict.fromkeys(pairs, FLOAT32_TOL)
    if name in ILL_CONDITIONED_IN_FLOAT32:
        # See the module docstring.
        emulated = both_backends_emulated(qkv, dout, dlse, params)
        lse = pairs["lse"][1]
        logit_rounding = 4 * 2.0**-24 * np.max(np.abs(lse[np.isfinite(lse)]))
        for output, (_, want) in pairs.items():
            budgets[output] = max(FLOAT32_TOL, 4 * normwise_error(emulated[output], want), logit_rounding)
    for output, (got, want) in pairs.items():
        assert got.dtype == np.float32 and got.shape == want.shape, output
        error = normwise_error(got, want)
        assert error <= budgets[output], f"{name} {output}: normwise error {error:.3e} > {budgets[output]:.3e}"


def both_backends_emulated(qkv, dout, dlse, params):
    """The reference evaluated in float32 (refattn.core.precision), same keys as both_backends."""
    res = dense_attention(*qkv, **params, precision="float32")
    out = {"out": res.out, "lse": res.lse}
    for label, cot in (("", None), ("dlse.", dlse)):
        for key, value in dense_attention_vjp(dout, *qkv, dlse=cot, **params, precision="float32").items():
            out[f"{label}grad.{key}"] = value
    return out


def test_half_precision_inputs_compute_in_float32():
    _, qkv, dout, _ = make_problem(1, 1, 2, 1, 67, 70, 16, 16, dtype=np.float16)
    fast = dense_attention(*qkv, causal=True, backend="numba")
    ref = dense_attention(*qkv, causal=True)
    assert fast.out.dtype == np.float32
    assert normwise_error(fast.out, ref.out) <= FLOAT32_TOL
    grads = dense_attention_vjp(dout, *qkv, causal=True, backend="numba")
    ref_grads = dense_attention_vjp(dout, *qkv, causal=True)
    for key in ("q", "k", "v"):
        assert grads[key].dtype == np.float32
        assert normwise_error(grads[key], ref_grads[key]) <= FLOAT32_TOL


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fully_masked_rows_are_zero_not_nan(dtype):
    """Rows with no allowed key: out 0 exactly, lse -inf, zero gradients, no NaN anywhere.

    Rows 3 and 70 see nothing. Rows 5 and 66 see keys only in the last key
    tile (so their running max is -inf through the first tiles), row 9 only
    in the first (so later tiles are fully masked for it).
    """
    _, (q, k, v), dout, dlse = make_problem(2, 2, 2, 1, 72, 130, 59, 40, dtype=dtype)
    mask = np.ones((2, 1, 72, 130), bool)
    mask[:, :, 3] = False
    mask[:, :, 70] = False
    mask[:, :, 5, :128] = False
    mask[:, :, 66, :129] = False
    mask[:, :, 9, 10:] = False
    mask[:, :, :, 100] = False  # a key nobody sees
    dlse[:, :, [3, 70]] = 0.0  # a cotangent on -inf; its gradient is 0 whatever it is
    res = dense_attention(q, k, v, mask=mask, backend="numba")
    grads = dense_attention_vjp(dout, q, k, v, dlse=dlse, mask=mask, backend="numba")
    for row in (3, 70):
        assert np.all(res.out[:, :, row] == 0)
        assert np.all(res.lse[:, :, row] == -np.inf)
        assert np.all(grads.q[:, :, row] == 0)
    assert not any(np.isnan(x).any() for x in (res.out, res.lse, *grads.values()))
    assert np.all(grads.k[:, :, 100] == 0) and np.all(grads.v[:, :, 100] == 0)
    ref = dense_attention(q, k, v, mask=mask)
    ref_grads = dense_attention_vjp(dout, q, k, v, dlse=dlse, mask=mask)
    tol = FLOAT64_TOL if dtype == np.float64 else FLOAT32_TOL
    assert normwise_error(res.out, ref.out) <= tol
    assert normwise_error(res.lse, ref.lse) <= tol
    for key in ref_grads:
        assert normwise_error(grads[key], ref_grads[key]) <= tol, key


def test_zero_stride_broadcast_mask_and_bias_shapes():
    """A mask passed as a broadcast view, and bias gradients summed to the bias's own shape.

    A bias constant along the keys does not change the softmax, so without a
    dlse its gradient is 0 up to rounding; dlse is given to make it a value.
    """
    rng, qkv, dout, dlse = make_problem(3, 2, 4, 2, 67, 130, 16, 16)
    mask = np.broadcast_to(rng.random((1, 1, 1, 130)) < 0.8, (2, 4, 67, 130))
    for bias_shape in [(1, 130), (4, 1, 1), (2, 1, 67, 130), (67, 1), (1, 1, 1, 1)]:
        bias = rng.standard_normal(bias_shape)
        fast = dense_attention_vjp(dout, *qkv, dlse=dlse, mask=mask, bias=bias, backend="numba")
        ref = dense_attention_vjp(dout, *qkv, dlse=dlse, mask=mask, bias=bias)
        assert fast.bias.shape == bias.shape
        for key in ref:
            assert normwise_error(fast[key], ref[key]) <= FLOAT64_TOL, (bias_shape, key)


def test_top_left_causal_equals_attention_on_the_prefix():
    """Key tiles the causal bound excludes are skipped; the result is attention on the keys it allows."""
    _, (q, k, v), _, _ = make_problem(4, 1, 1, 1, 64, 200, 8, 8)
    # With Nq = 64 bottom-right aligned to Nk = 200, only keys <= 199 exist; top_left sees keys <= 63.
    top_left = dense_attention(q, k, v, causal=True, causal_alignment="top_left", backend="numba")
    prefix = dense_attention(q, k[:, :, :64], v[:, :, :64], causal=True, backend="numba")
    assert normwise_error(top_left.out, prefix.out) <= FLOAT64_TOL
    assert normwise_error(top_left.lse, prefix.lse) <= FLOAT64_TOL


def test_bad_input_raises_the_same_spec_error():
    _, (q, k, v), dout, _ = make_problem(5, 1, 2, 1, 8, 8, 4, 4)
    bad_calls = [
        lambda backend: dense_attention(q, k[..., :3], v, backend=backend),
        lambda backend: dense_attention(q, k, v, window=(-1, 2), backend=backend),
        lambda backend: dense_attention(q, k, v, dropout_p=0.3, backend=backend),
        lambda backend: dense_attention(q, k, v, mask=np.ones((8, 8)), backend=backend),
        lambda backend: dense_attention_vjp(dout[..., :3], q, k, v, backend=backend),
        lambda backend: dense_attention_vjp(dout, q, k, v, dlse=np.zeros((1, 2, 7)), backend=backend),
    ]
    for call in bad_calls:
        with pytest.raises(SpecError) as from_reference:
            call("reference")
        with pytest.raises(SpecError) as from_numba:
            call("numba")
        assert str(from_numba.value) == str(from_reference.value)


def test_precision_with_numba_backend_is_rejected():
    _, (q, k, v), dout, _ = make_problem(6, 1, 1, 1, 4, 4, 4, 4)
    with pytest.raises(SpecError, match="precision"):
        dense_attention(q, k, v, precision="float32", backend="numba")
    with pytest.raises(SpecError, match="precision"):
        dense_attention_vjp(dout, q, k, v, precision="float32", backend="numba")


def test_backend_is_the_registered_module():
    from refattn.dense import numba as kernels

    assert refattn.get_mechanism("dense").backends == ("reference", "numba", "cupy")
    assert callable(kernels.forward) and callable(kernels.vjp)
    assert not hasattr(kernels, "dense_attention")  # a backend never restates the public signature


@pytest.mark.parametrize("params", [{}, {"causal": True, "bias": "per_key"}, {"window": (40, 3), "softcap": 5.0}])
def test_saved_forward_gives_the_gradients_of_the_stateless_vjp(params):
    """``saved`` (the forward's out and lse) spares recomputing them; the gradients are the same, bit for bit."""
    rng, (q, k, v), dout, dlse = make_problem(11, *SHAPE)
    if params.get("bias") == "per_key":
        params = params | {"bias": rng.standard_normal((1, 1, 1, SHAPE[4]))}
    saved = dense_attention(q, k, v, **params, backend="numba")
    stateless = dense_attention_vjp(dout, q, k, v, dlse=dlse, **params, backend="numba")
    reused = dense_attention_vjp(dout, q, k, v, dlse=dlse, **params, saved=saved, backend="numba")
    assert set(reused) == set(stateless)
    for name in stateless:
        np.testing.assert_array_equal(reused[name], stateless[name], err_msg=name)


def test_gradients_do_not_depend_on_the_number_of_threads():
    """One (batch, kv head) item and two threads: the key blocks are split and dq is summed over
    the splits' own copies (refattn/dense/numba.py); one thread runs a single split."""
    import numba

    _, (q, k, v), dout, dlse = make_problem(12, 1, 2, 1, 67, 300, 16, 16)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = dense_attention_vjp(dout, q, k, v, dlse=dlse, causal=True, backend="numba")
    finally:
        numba.set_num_threads(threads)
    many = dense_attention_vjp(dout, q, k, v, dlse=dlse, causal=True, backend="numba")
    want = dense_attention_vjp(dout, q, k, v, dlse=dlse, causal=True)
    for name in want:
        assert normwise_error(one[name], want[name]) <= FLOAT64_TOL, name
        assert normwise_error(many[name], want[name]) <= FLOAT64_TOL, name
