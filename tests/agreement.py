"""A mechanism's numba backend against its float64 reference, within the conformance budgets.

The budgets are the conformance suite's (refattn/conformance/tolerance.py): the
reference's own error in the precision under test, over its plain evaluation
and ROUNDING_TRIALS jittered ones, times c, plus the floor with the problem's
sensitivities. Float arrays among the parameters (bias, tables, s, λ vectors)
are cast to the precision too, as the verifier casts them.
"""

import numpy as np

from refattn.conformance.tolerance import ROUNDING_TRIALS, budgets, error, sensitivities
from refattn.core.precision import jittered


def outputs(result, grads) -> dict:
    """``out``, ``lse`` and ``grad.<name>`` of one forward and VJP."""
    return {"out": result.out, "lse": result.lse, **{f"grad.{name}": value for name, value in grads.items()}}


def check_numba_agreement(forward, vjp, q, k, v, params, precision, seed):
    """``forward``/``vjp`` with backend="numba" in ``precision`` against their float64 reference."""
    rng = np.random.default_rng(seed)
    exact = forward(q, k, v, **params)
    dout = rng.standard_normal(exact.out.shape)
    dlse = np.where(np.isfinite(exact.lse), rng.standard_normal(exact.lse.shape), 0.0)
    exact_grads = vjp(dout, q, k, v, dlse=dlse, **params)
    want = outputs(exact, exact_grads)

    cast = [x.astype(precision) for x in (q, k, v)]
    cast_params = {n: x.astype(precision) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x for n, x in params.items()}
    fast = forward(*cast, **cast_params, backend="numba")
    fast_grads = vjp(dout.astype(precision), *cast, dlse=dlse.astype(precision), **cast_params, backend="numba")
    assert fast.out.dtype == np.dtype(precision)
    got = outputs(fast, fast_grads)
    assert set(got) == set(want)

    emulated = {}
    if precision != "float64":
        trials = [precision] + [jittered(precision, seed + trial) for trial in range(ROUNDING_TRIALS)]
        evaluations = [
            outputs(forward(q, k, v, **params, precision=p), vjp(dout, q, k, v, dlse=dlse, **params, precision=p)) for p in trials
        ]
        emulated = {name: {precision: [e[name] for e in evaluations]} for name in want}
    sensitivity = sensitivities(vjp, {"q": q, "k": k, "v": v, **params}, dout, exact, exact_grads)
    for name in want:
        allowed = budgets(name, want[name], emulated.get(name, {}), sensitivity.get(name, 0.0))[precision]
        found = error(name, got[name], want[name])
        assert found <= allowed, f"{name}: error {found:.3e} > budget {allowed:.3e} ({precision})"
