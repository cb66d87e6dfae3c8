"""Numerics at the edges (issue 13, item 5): scores that would overflow, and windows beyond any sequence.

Every mechanism checks, before any backend runs, that its scores stay within
the precision its kernels compute in (``refattn.core.checks.scores_within_range``):
a problem whose scores could overflow raises ``SpecError`` naming the vectors
and the largest score on every backend, never NaN or a silent fully masked
row, and a problem just below the limit computes. Each mechanism's problem is
its first conformance case with the arrays that form its scores scaled by a
power of two (exact, and decision-preserving: hashing and routing pick the
same buckets and clusters); :data:`SCORE_ARRAYS` names them.

Windows: a window side beyond any sequence is clamped (``checks.window``), so
a huge window gives the unbounded window's result, with no integer overflow.
"""

import inspect

import numpy as np
import pytest

from refattn import SpecError
from refattn.conformance.tolerance import normwise_error
from refattn.core import registry

#: Per mechanism: the arrays whose products form its scores (and its normalised vectors), scaled to overflow.
SCORE_ARRAYS = {
    "dense": ("q", "k"),
    "alibi": ("q", "k"),
    "t5": ("q", "k"),
    "rope": ("q", "k"),
    "xpos": ("q", "k"),
    "shaw": ("q", "k"),
    "transformer_xl": ("q", "k"),
    "ssmax": ("q", "k"),
    "logn": ("q", "k"),
    "differential": ("q", "k"),
    "lsh": ("qk",),
    "routing": ("q", "k"),
    "routing_hybrid": ("q", "k"),
    "soft_routing": ("q", "k"),
    "centroid_ema": ("q", "k"),
}
#: The families whose mechanisms this file covers (the others test their own edges).
FAMILIES = ("refattn.dense", "refattn.position.", "refattn.dilution.", "refattn.lsh", "refattn.routing")
#: The window keyword of each mechanism that has one (soft routing: one window per path).
WINDOWS = {name: keyword for name in SCORE_ARRAYS for keyword in ("window", "local_window", "path_window")
           if keyword in inspect.signature(registry.get(name).forward).parameters}  # fmt: skip
HUGE = (2**70, 2**70)


def _problem(name: str, dtype=np.float64) -> tuple[dict, dict]:
    """The first case of ``name``: its arrays (float ones cast to ``dtype``) and its JSON parameters."""
    case = registry.get(name).cases()[0]
    arrays = case.arrays(np.random.default_rng(case.seed))
    arrays = {n: x.astype(dtype) if x.dtype.kind == "f" else x for n, x in arrays.items()}
    return arrays, dict(case.params)


def _scaled(name: str, arrays: dict, exponent: int) -> dict:
    """``arrays`` with the score-forming ones multiplied by 2**exponent (exact)."""
    return {n: np.ldexp(x, exponent).astype(x.dtype) if n in SCORE_ARRAYS[name] else x for n, x in arrays.items()}


def _check(name: str, arrays: dict, params: dict) -> None:
    """The mechanism's own check_inputs on the public function's arguments, defaults filled in."""
    mechanism = registry.get(name)
    bound = inspect.signature(mechanism.forward).bind(**arrays, **params)
    bound.apply_defaults()
    mechanism.check_inputs(**{n: x for n, x in bound.arguments.items() if n not in registry.DISPATCH_ARGUMENTS})


def _overflows(error: SpecError) -> bool:
    return "scores" in error.expected or "squared norms" in error.expected


def _first_overflow(name: str, arrays: dict, params: dict, largest: int) -> int:
    """The smallest exponent in [0, largest] at which the scaled problem is refused for overflow (bisection)."""
    low, high = 0, largest  # passes at low (asserted), fails at high (asserted)
    for exponent, refused in ((low, False), (high, True)):
        try:
            _check(name, _scaled(name, arrays, exponent), params)
            assert not refused, f"{name}: 2**{exponent} times the arrays is not refused"
        except SpecError as error:
            assert refused and _overflows(error), f"{name}: 2**{exponent}: {error}"
    while high - low > 1:
        middle = (low + high) // 2
        try:
            _check(name, _scaled(name, arrays, middle), params)
            low = middle
        except SpecError as error:
            assert _overflows(error), error
            high = middle
    return high


def _finite_result(name: str, backend: str, arrays: dict, params: dict, reference) -> None:
    """Run ``backend``; its output is finite and its fully masked rows (lse −∞) are the reference's."""
    result = registry.get(name).forward(**arrays, **params, backend=backend)
    assert np.all(np.isfinite(result.out)), f"{name} ({backend}): non-finite output"
    if reference is not None and result.lse is not None:
        np.testing.assert_array_equal(np.isneginf(result.lse), np.isneginf(reference.lse), err_msg=f"{name} ({backend})")


def test_every_mechanism_of_these_families_has_a_problem():
    covered = {name for name in registry.names() if registry.get(name).package.startswith(FAMILIES)}
    assert covered == set(SCORE_ARRAYS)


@pytest.mark.parametrize("name", sorted(SCORE_ARRAYS))
def test_float32_scores_that_overflow_raise_on_every_backend(name):
    arrays, params = _problem(name, np.float32)
    exponent = _first_overflow(name, arrays, params, largest=100)  # float32 elements stay finite (2**100 * |x|)
    mechanism = registry.get(name)
    for backend in mechanism.available_backends():
        with pytest.raises(SpecError) as info:
            mechanism.forward(**_scaled(name, arrays, exponent), **params, backend=backend)
        assert _overflows(info.value) and "reach" in info.value.given, info.value
        assert any(vector in info.value.argument for vector in ("q", "k")), info.value.argument
        with pytest.raises(SpecError):
            mechanism.vjp(np.zeros(1), **_scaled(name, arrays, exponent), **params, backend=backend)
    # Just below the limit every backend computes, in float32, and the same values in float64.
    below = _scaled(name, arrays, exponent - 1)
    reference = mechanism.forward(**below, **params)
    for backend in mechanism.available_backends():
        _finite_result(name, backend, below, params, reference)
    as_float64 = {n: x.astype(np.float64) if x.dtype.kind == "f" else x for n, x in _scaled(name, arrays, exponent).items()}
    for backend in mechanism.available_backends():
        _finite_result(name, backend, as_float64, params, None)


@pytest.mark.parametrize("name", sorted(SCORE_ARRAYS))
def test_float64_scores_just_below_the_limit_compute_on_every_backend(name):
    arrays, params = _problem(name, np.float64)
    exponent = _first_overflow(name, arrays, params, largest=1000)
    mechanism = registry.get(name)
    below = _scaled(name, arrays, exponent - 1)
    reference = mechanism.forward(**below, **params)
    for backend in mechanism.available_backends():
        _finite_result(name, backend, below, params, reference)
        with pytest.raises(SpecError):
            mechanism.forward(**_scaled(name, arrays, exponent), **params, backend=backend)


@pytest.mark.parametrize("name", sorted(WINDOWS))
def test_a_window_beyond_any_sequence_is_no_window(name):
    arrays, params = _problem(name)
    keyword = WINDOWS[name]
    paths = len(params.get("path_causal", ())) or None  # soft routing: one window per path
    unbounded, huge = (None, HUGE) if paths is None else ([None] * paths, [HUGE] * paths)
    mechanism = registry.get(name)
    for backend in mechanism.available_backends():
        want = mechanism.forward(**arrays, **(params | {keyword: unbounded}), backend=backend)
        got = mechanism.forward(**arrays, **(params | {keyword: huge}), backend=backend)
        assert normwise_error(got.out, want.out) <= 1e-13, f"{name} ({backend})"
        if want.lse is not None:
            assert normwise_error(got.lse, want.lse) <= 1e-13, f"{name} ({backend})"
