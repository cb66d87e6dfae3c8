"""Helpers shared by every mechanism's ``properties.py``.

A property takes an implementation and a problem, raises ``AssertionError``
describing the violation, or returns None. A property that needs a particular
kind of problem calls :func:`require`, which raises ``ValueError``, so that a
test filters its problems rather than passing vacuously.
"""

from __future__ import annotations

import numpy as np


def close(name: str, got, want, rtol: float) -> None:
    """Assert ``got`` equals ``want`` to normwise relative error ``rtol``.

    Infinities must match exactly (a fully masked row's ``lse = -inf``); NaN
    never passes. The error is relative to ``max(‖want‖∞, 1)``.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    same_inf = np.isinf(want) & (got == want)
    finite = ~same_inf
    if np.any(np.isnan(got)) or np.any(np.isinf(got[finite])) or np.any(np.isinf(want[finite])):
        raise AssertionError(f"{name}: infinities or NaN differ")
    err = np.max(np.abs(got[finite] - want[finite]), initial=0.0)
    ref = max(np.max(np.abs(want[finite]), initial=0.0), 1.0)
    if err > rtol * ref:
        raise AssertionError(f"{name}: normwise error {err / ref:.3e} > {rtol:.1e}")


def require(condition: bool, what: str) -> None:
    """Refuse a problem this property does not apply to (``ValueError``, not a pass)."""
    if not condition:
        raise ValueError(f"this property needs {what}")
