"""The numba backend agrees with the reference across the Hypothesis shapes and options,
in float64 and float32, forward and backward, within the conformance tolerance policy
(refattn/conformance/tolerance.py): float64 to 1e-10 normwise; float32 within
c x the reference's own float32 error (the largest over its plain and jittered
evaluations) plus the rounding floor, whose sensitivity terms cover rounding the
logits in another order and recomputing P from the lse."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refattn import dense_attention, dense_attention_vjp
from refattn.conformance.tolerance import ROUNDING_TRIALS, budgets, error, sensitivities
from refattn.core.precision import jittered
from refattn.strategies import dense_problems


def _outputs(result, grads):
    return {"out": result.out, "lse": result.lse, **{f"grad.{name}": value for name, value in grads.items()}}


def _reference_outputs(q, k, v, dout, dlse, params, precision):
    result = dense_attention(q, k, v, **params, precision=precision)
    return _outputs(result, dense_attention_vjp(dout, q, k, v, dlse=dlse, **params, precision=precision))


@given(problem=dense_problems(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(problem, precision, seed):
    rng = np.random.default_rng(seed)
    q, k, v = problem.qkv
    exact = dense_attention(q, k, v, **problem.params)
    dout = rng.standard_normal(exact.out.shape)
    dlse = np.where(np.isfinite(exact.lse), rng.standard_normal(exact.lse.shape), 0.0)
    exact_grads = dense_attention_vjp(dout, q, k, v, dlse=dlse, **problem.params)
    want = _outputs(exact, exact_grads)

    cast = [x.astype(precision) for x in (q, k, v)]
    fast = dense_attention(*cast, **problem.params, backend="numba")
    fast_grads = dense_attention_vjp(dout.astype(precision), *cast, dlse=dlse.astype(precision), **problem.params, backend="numba")
    assert fast.out.dtype == np.dtype(precision)
    got = _outputs(fast, fast_grads)
    assert set(got) == set(want)

    emulated = []
    if precision != "float64":
        trials = [precision] + [jittered(precision, seed + trial) for trial in range(ROUNDING_TRIALS)]
        emulated = [_reference_outputs(q, k, v, dout, dlse, problem.params, p) for p in trials]
    sensitivity = sensitivities(dense_attention_vjp, {"q": q, "k": k, "v": v, **problem.params}, dout, exact, exact_grads)
    for name in want:
        allowed = budgets(name, want[name], {precision: [e[name] for e in emulated]} if emulated else {}, sensitivity.get(name, 0.0))[precision]
        found = error(name, got[name], want[name])
        assert found <= allowed, f"{name}: error {found:.3e} > budget {allowed:.3e} ({precision})"
