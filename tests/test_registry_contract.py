"""The mechanism contract, checked once for every registered mechanism (refattn/core/registry.py).

Each test is parametrised over the registry, so a new mechanism is covered by
registering it: its folder has the backends, cases, flags, properties and spec
page the contract asks for; every bundled backend agrees with the reference on
every conformance case; every VJP agrees with finite differences on every case
that has gradients.
"""

import importlib
import inspect
import re
import json
from pathlib import Path

import numpy as np
import pytest

import refattn
from refattn.conformance.flags import FLAGS as SHARED_FLAGS
from refattn.conformance.tolerance import normwise_error
from refattn.core import registry

ROOT = Path(__file__).resolve().parent.parent
MECHANISMS = registry.names()
#: The most array elements one case may hold (inputs, parameters): cases stay small and readable.
MAX_CASE_ELEMENTS = 200_000
#: Finite-difference step along a random unit direction, and the agreement asked of <grad, u>.
FD_STEP = 1e-6
FD_RTOL = 1e-6


def _cases(name):
    return registry.get(name).cases()


def _arrays(case) -> dict:
    return case.arrays(np.random.default_rng(case.seed))


# --------------------------------------------------------------------------
# Registration


@pytest.mark.parametrize("name", MECHANISMS)
def test_registration_follows_the_contract(name):
    mechanism = registry.get(name)
    assert mechanism.backends[0] == "reference"
    assert mechanism.check_inputs is not None, f"{name}: no check_inputs"
    reference = importlib.import_module(f"{mechanism.package}.reference")
    assert callable(reference.forward) and callable(reference.vjp)
    assert (ROOT / mechanism.spec).is_file(), mechanism.spec
    importlib.import_module(mechanism.properties)
    # The VJP is derived from the forward: its signature is the forward's with dout, dlse and saved.
    forward_params = inspect.signature(mechanism.forward).parameters
    vjp_params = inspect.signature(mechanism.vjp).parameters
    assert list(vjp_params)[0] == "dout"
    assert set(vjp_params) == set(forward_params) | {"dout", "dlse", "saved"}
    assert {"precision", "backend"} <= set(forward_params)


@pytest.mark.parametrize("name", MECHANISMS)
def test_public_docstring_documents_every_parameter(name):
    """Every keyword of the public function is named on a parameter line of its docstring, and
    ``precision`` and ``backend`` once each (the registry adds them, with this mechanism's backends,
    unless the docstring documents them itself)."""
    mechanism = registry.get(name)
    doc = mechanism.forward.__doc__
    parameters_section = doc.split("\n    Parameters\n")[1].split("\n    Returns\n")[0]
    parameter_lines = re.findall(r"^    (\S.*)$", parameters_section, re.M)
    for parameter in inspect.signature(mechanism.forward).parameters:
        assert any(re.search(rf"\b{parameter}\b", line) for line in parameter_lines), f"{name}: {parameter!r}"
    for dispatch in ("precision", "backend"):
        assert len([line for line in parameter_lines if re.match(rf"(\w+, )*{dispatch}\b", line)]) == 1, dispatch
    backend_text = re.search(r"^    (?:\w+, )*backend\b(.*\n.*)", parameters_section, re.M).group(1)
    assert all(repr(b) in backend_text or f'"{b}"' in backend_text for b in mechanism.backends), backend_text


@pytest.mark.parametrize(
    "name, backend", [(name, b) for name in MECHANISMS for b in registry.get(name).backends if b != "reference"]
)
def test_backends_do_not_restate_the_signature(name, backend):
    """A backend module has forward(inputs) and vjp(inputs, cotangents, saved=None), nothing public of the API."""
    mechanism = registry.get(name)
    module = mechanism.backend(backend)
    assert len(inspect.signature(module.forward).parameters) == 1
    assert list(inspect.signature(module.vjp).parameters)[1:] == ["cotangents", "saved"]
    assert not hasattr(module, mechanism.forward.__name__), f"{module.__name__} restates {mechanism.forward.__name__}"


def test_no_other_dispatch_exists():
    """The registry is the only dispatcher: no mechanism keeps a private backend switch."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "refattn").rglob("*.py") if "_other_backend" in p.read_text()]
    assert offenders == []


def test_bad_backend_and_precision_are_spec_errors():
    q = np.zeros((1, 1, 2, 3))
    with pytest.raises(refattn.SpecError, match="backend"):
        refattn.dense_attention(q, q, q, backend="cuda")
    with pytest.raises(refattn.SpecError, match="precision"):
        refattn.dense_attention(q, q, q, backend="numba", precision="float32")
    with pytest.raises(refattn.SpecError, match="dout"):
        refattn.dense_attention_vjp(np.zeros((1, 1, 2, 4)), q, q, q)


# --------------------------------------------------------------------------
# Cases and flags


@pytest.mark.parametrize("name", MECHANISMS)
def test_cases_are_small_named_and_flagged(name):
    cases = _cases(name)
    assert len(cases) >= 2, f"{name} has {len(cases)} cases"
    described = {**SHARED_FLAGS, **registry.get(name).flags()}
    for case in cases:
        assert case.id.startswith(f"{name}/") and case.mechanism == name
        assert case.flags, f"{case.id} names no flag"
        assert set(case.flags) <= set(described), f"{case.id}: undescribed flags {set(case.flags) - set(described)}"
        elements = sum(np.size(a) for a in _arrays(case).values())
        assert elements <= MAX_CASE_ELEMENTS, f"{case.id}: {elements} array elements"


@pytest.mark.parametrize("name", MECHANISMS)
def test_every_own_flag_is_used(name):
    used = {flag for case in _cases(name) for flag in case.flags}
    unused = set(registry.get(name).flags()) - used
    assert not unused, f"{name} describes flags no case uses: {sorted(unused)}"


# --------------------------------------------------------------------------
# Backends agree with the reference on every case (float64).


def _agreement_cases():
    return [
        pytest.param(name, backend, case, id=f"{case.id}-{backend}")
        for name in MECHANISMS
        for backend in registry.get(name).available_backends()
        if backend != "reference"
        for case in _cases(name)
    ]


def _outputs(result, grads) -> dict:
    found = {"out": result.out}
    if result.lse is not None:
        found["lse"] = result.lse
    found.update({f"grad.{k}": v for k, v in (grads or {}).items()})
    return found


def _run(mechanism, case, arrays, backend):
    positional = [arrays[n] for n in mechanism.positional]
    keywords = {n: a for n, a in arrays.items() if n not in mechanism.positional}
    result = mechanism.forward(*positional, **keywords, **case.params, backend=backend)
    grads = None
    if case.grad:
        rng = np.random.default_rng(case.seed + 1)
        dout = rng.standard_normal(result.out.shape)
        dlse = None if result.lse is None else np.where(np.isfinite(result.lse), rng.standard_normal(result.lse.shape), 0.0)
        grads = mechanism.vjp(dout, *positional, dlse=dlse, **keywords, **case.params, backend=backend)
    return result, grads


@pytest.fixture(scope="module")
def float64_budgets() -> dict:
    """The published float64 budget of every output of every case (the tolerance policy's, at least 1e-10)."""
    manifest = json.loads((ROOT / "conformance" / "manifest.json").read_text())
    return {case["id"]: {key: t["float64"] for key, t in case["tolerances"].items()} for case in manifest["cases"]}


def _budget(budgets: dict, key: str) -> float:
    """An output's float64 budget; a gradient (stored in its dout and dlse parts) gets the larger part's."""
    if key.startswith("grad."):
        name = key[len("grad."):]
        return max(budgets.get(f"grad_dout.{name}", 1e-10), budgets.get(f"grad_dlse.{name}", 1e-10))
    return budgets.get(key, 1e-10)


@pytest.mark.parametrize("name, backend, case", _agreement_cases())
def test_backend_agrees_with_reference_on_every_case(name, backend, case, float64_budgets):
    """Float outputs within the case's published float64 budget; integer intermediates exactly, where the
    backend returns them (a kernel may leave out an intermediate it never forms, such as an Nq x Nk index)."""
    mechanism = registry.get(name)
    arrays = _arrays(case)
    want_result, want_grads = _run(mechanism, case, arrays, "reference")
    got_result, got_grads = _run(mechanism, case, arrays, backend)
    want, got = _outputs(want_result, want_grads), _outputs(got_result, got_grads)
    assert set(got) == set(want)
    for key in want:
        assert normwise_error(got[key], want[key]) <= _budget(float64_budgets[case.id], key), f"{case.id} {key}"
    for key, value in want_result.aux.items():
        if key in got_result.aux and not np.issubdtype(value.dtype, np.floating):
            np.testing.assert_array_equal(got_result.aux[key], value, err_msg=f"{case.id} aux.{key}")


# --------------------------------------------------------------------------
# Every VJP against finite differences, on every case with gradients.


def _loss(mechanism, case, arrays, dout, dlse) -> float:
    positional = [arrays[n] for n in mechanism.positional]
    keywords = {n: a for n, a in arrays.items() if n not in mechanism.positional}
    result = mechanism.forward(*positional, **keywords, **case.params)
    total = np.sum(dout * result.out)
    if dlse is not None:
        total += np.sum(dlse * np.where(np.isfinite(result.lse), result.lse, 0.0))
    return float(total)


def _gradient_cases():
    """Every case with gradients, except where the VJP is by definition not the forward's derivative:
    mechanisms whose VJP holds the streamed state fixed (``Mechanism.state_held_fixed``) and cases that say
    why (``Case.not_a_derivative``: a decision on an exact tie, a preset reproducing a detached term)."""
    return [
        pytest.param(name, case, id=case.id)
        for name in MECHANISMS
        if not registry.get(name).state_held_fixed
        for case in _cases(name)
        if case.grad and case.not_a_derivative is None
    ]


@pytest.mark.parametrize("name, case", _gradient_cases())
def test_vjp_matches_finite_differences_on_every_case(name, case):
    """<grad, u> against (L(x + h u) - L(x - h u)) / 2h along a random unit direction u, per input."""
    mechanism = registry.get(name)
    arrays = _arrays(case)
    result, _ = _run(mechanism, case, arrays, "reference")
    rng = np.random.default_rng(case.seed + 2)
    dout = rng.standard_normal(result.out.shape)
    dlse = None if result.lse is None else np.where(np.isfinite(result.lse), rng.standard_normal(result.lse.shape), 0.0)
    positional = [arrays[n] for n in mechanism.positional]
    keywords = {n: a for n, a in arrays.items() if n not in mechanism.positional}
    grads = mechanism.vjp(dout, *positional, dlse=dlse, **keywords, **case.params)
    for input_name in case.differentiable:
        if input_name not in arrays:
            continue
        direction = rng.standard_normal(arrays[input_name].shape)
        direction /= np.linalg.norm(direction)
        plus = {**arrays, input_name: arrays[input_name] + FD_STEP * direction}
        minus = {**arrays, input_name: arrays[input_name] - FD_STEP * direction}
        loss_plus, loss_minus = _loss(mechanism, case, plus, dout, dlse), _loss(mechanism, case, minus, dout, dlse)
        numeric = (loss_plus - loss_minus) / (2 * FD_STEP)
        analytic = float(np.sum(grads[input_name] * direction))
        # The difference quotient's own rounding: each loss is a sum of terms as large as |L| (a row whose
        # logits are a finite mask constant such as -1e9 has an lse near -1e9), known to ~4 ulps.
        rounding = 8 * np.finfo(np.float64).eps * max(abs(loss_plus), abs(loss_minus)) / (2 * FD_STEP)
        allowed = FD_RTOL * max(np.linalg.norm(grads[input_name]), 1.0) + rounding
        assert abs(numeric - analytic) <= allowed, f"{case.id} d/d{input_name}: fd {numeric!r}, vjp {analytic!r}"
