"""The Shaw numba backend agrees with the reference within the conformance tolerance
policy (refattn/conformance/tolerance.py): float64 to 1e-10 normwise; float32 within
c x the reference's own float32 error (plain and jittered) plus the rounding floor.
Also on sizes that cross its 64-wide tiles, with every table row range (K = 0, K
small, K larger than the sequence), and on the invariants."""

from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import dense_attention
from refattn.conformance.tolerance import ROUNDING_TRIALS, budgets, error, sensitivities
from refattn.core.precision import jittered
from refattn.position.shaw import properties, shaw_attention, shaw_attention_vjp
from tests.test_position_shaw import shaw_problems

DIFFERENTIABLE = ("q", "k", "v", "rel_k", "rel_v", "bias")


def _split(q, k, v, params):
    """(arrays that get gradients, the other keyword arguments)."""
    arrays = dict(q=q, k=k, v=v, **{n: params[n] for n in DIFFERENTIABLE[3:] if params.get(n) is not None})
    return arrays, {n: value for n, value in params.items() if n not in arrays}


def _outputs(result, grads):
    return {"out": result.out, "lse": result.lse, **{f"grad.{name}": value for name, value in grads.items()}}


def _reference_outputs(arrays, others, dout, dlse, precision):
    result = shaw_attention(**arrays, **others, precision=precision)
    return _outputs(result, shaw_attention_vjp(dout, **arrays, dlse=dlse, **others, precision=precision))


def _assert_agrees(q, k, v, params, precision, seed):
    rng = np.random.default_rng(seed)
    arrays, others = _split(q, k, v, params)
    exact = shaw_attention(**arrays, **others)
    dout = rng.standard_normal(exact.out.shape)
    dlse = np.where(np.isfinite(exact.lse), rng.standard_normal(exact.lse.shape), 0.0)
    exact_grads = shaw_attention_vjp(dout, **arrays, dlse=dlse, **others)
    want = _outputs(exact, exact_grads)

    cast = {name: x.astype(precision) for name, x in arrays.items()}
    fast = shaw_attention(**cast, **others, backend="numba")
    fast_grads = shaw_attention_vjp(
        dout.astype(precision), **cast, dlse=dlse.astype(precision), **others, backend="numba"
    )
    assert fast.out.dtype == np.dtype(precision)
    got = _outputs(fast, fast_grads)
    assert set(got) == set(want)

    emulated = []
    if precision != "float64":
        trials = [precision] + [jittered(precision, seed + trial) for trial in range(ROUNDING_TRIALS)]
        emulated = [_reference_outputs(arrays, others, dout, dlse, p) for p in trials]
    sensitivity = sensitivities(shaw_attention_vjp, {**arrays, **others}, dout, exact, exact_grads)
    for name in want:
        at_precision = {precision: [e[name] for e in emulated]} if emulated else {}
        allowed = budgets(name, want[name], at_precision, sensitivity.get(name, 0.0))[precision]
        found = error(name, got[name], want[name])
        assert found <= allowed, f"{name}: error {found:.3e} > budget {allowed:.3e} ({precision})"


@given(problem=shaw_problems(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(problem, precision, seed):
    _assert_agrees(*problem, precision, seed)


def _tiled_problem(seed, nq, nk, clip, layout, b=1, hq=4, hkv=2, d=16, dv=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, nq, d))
    k, v = rng.standard_normal((b, hkv, nk, d)), rng.standard_normal((b, hkv, nk, dv))
    if layout == "contiguous":
        k_positions = np.arange(nk)
        q_positions = np.arange(nq) + (nk - nq)
    elif layout == "gaps":
        k_positions = np.cumsum(rng.integers(0, 3, nk))
        q_positions = np.sort(rng.integers(0, k_positions[-1] + 1, nq))
    else:
        k_positions, q_positions = rng.permutation(nk) * 2, rng.permutation(nq) - 7
    params = dict(
        rel_k=rng.standard_normal((2 * clip + 1, d)), rel_v=rng.standard_normal((2 * clip + 1, dv)),
        q_positions=q_positions, k_positions=k_positions, max_relative_position=clip,
    )  # fmt: skip
    return rng, q, k, v, params


TILED = {
    "causal, K small": (150, 200, 5, "contiguous", dict(causal=True)),
    "causal top-left, K = 0": (200, 130, 0, "contiguous", dict(causal=True, causal_alignment="top_left")),
    "window, K beyond the sequence": (130, 170, 300, "contiguous", dict(window=(40, 3))),
    "gaps, bias, soft-cap": (97, 141, 12, "gaps", dict(softcap=3.0, bias="full")),
    "shuffled, mask, dropout": (129, 65, 20, "shuffled", dict(mask=True, dropout_p=0.2)),
}


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("name", list(TILED))
def test_numba_matches_reference_across_tiles(name, precision):
    nq, nk, clip, layout, options = TILED[name]
    rng, q, k, v, params = _tiled_problem(11, nq, nk, clip, layout)
    options = dict(options)
    if options.pop("bias", None):
        params["bias"] = rng.standard_normal((1, 4, nq, nk))
    if options.pop("mask", None):
        params["mask"] = rng.random((nq, nk)) < 0.6
        params["mask"][:3] = False  # fully masked rows
    if "dropout_p" in options:
        params["dropout_keep"] = rng.random((1, 4, nq, nk)) >= options["dropout_p"]
    _assert_agrees(q, k, v, params | options, precision, seed=5)


def test_numba_table_gradients_are_deterministic():
    rng, q, k, v, params = _tiled_problem(12, 200, 200, 7, "contiguous", b=2)
    dout = rng.standard_normal((2, 4, 200, 8))
    first = shaw_attention_vjp(dout, q, k, v, **params, causal=True, backend="numba")
    second = shaw_attention_vjp(dout, q, k, v, **params, causal=True, backend="numba")
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


# --------------------------------------------------------------------------
# The invariants, on the numba backend.
# --------------------------------------------------------------------------

FAST = partial(shaw_attention, backend="numba")


@given(shaw_problems())
def test_position_shift_invariance(problem):
    properties.position_shift_invariance(FAST, *problem)


@given(shaw_problems())
def test_zero_tables_equal_dense(problem):
    properties.zero_tables_equal_dense(FAST, *problem)


@given(shaw_problems())
def test_key_term_is_a_query_dependent_bias(problem):
    q, k, v, params = problem
    without_softcap = {name: value for name, value in params.items() if name != "softcap"}
    properties.key_term_is_a_query_dependent_bias(FAST, q, k, v, without_softcap)


@given(shaw_problems())
def test_causal_independence(problem):
    q, k, v, params = problem
    properties.causal_independence(FAST, q, k, v, dict(params, causal=True))


@pytest.mark.slow
@pytest.mark.parametrize("clip", [0, 64, 20000])
def test_long_sequence_zero_tables_equal_dense(clip):
    """16384 causal tokens in float32: O(N) memory (the reference's (Nq, Nk, D)
    gathers would take gigabytes); with zero tables the result is dense attention's."""
    n, d = 16384, 32
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((1, 2, n, d)).astype(np.float32) for _ in range(3))
    tables = dict(rel_k=np.zeros((2 * clip + 1, d), np.float32), rel_v=np.zeros((2 * clip + 1, d), np.float32))
    positions = dict(q_positions=np.arange(n), k_positions=np.arange(n), max_relative_position=clip)
    shaw = shaw_attention(q, k, v, **tables, **positions, causal=True, backend="numba")
    dense = dense_attention(q, k, v, causal=True, backend="numba")
    np.testing.assert_allclose(shaw.out, dense.out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(shaw.lse, dense.lse, rtol=1e-6)


def test_saved_forward_gives_the_gradients_of_the_stateless_vjp():
    rng, q, k, v, params = _tiled_problem(13, 150, 130, 7, "contiguous", b=1)
    dout = rng.standard_normal((1, 4, 150, 8))
    saved = shaw_attention(q, k, v, **params, causal=True, backend="numba")
    stateless = shaw_attention_vjp(dout, q, k, v, **params, causal=True, backend="numba")
    reused = shaw_attention_vjp(dout, q, k, v, **params, causal=True, saved=saved, backend="numba")
    for name in stateless:
        np.testing.assert_array_equal(reused[name], stateless[name], err_msg=name)
