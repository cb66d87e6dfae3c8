"""Helpers shared by every mechanism's ``properties.py``.

A property takes an implementation and a problem, raises ``AssertionError``
describing the violation, or returns None. A property that needs a particular
kind of problem calls :func:`require`, which raises ``ValueError``, so that a
test filters its problems rather than passing vacuously.
"""

from __future__ import annotations

import numpy as np

from .masks import position_mask


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


def allowed_keys(params: dict, shape: tuple[int, int, int, int]) -> np.ndarray:
    """(B, Hq, Nq, Nk) bool: the keys a query may attend to under dense attention's ``causal``, ``window``,
    ``causal_alignment`` and ``mask`` in ``params``, written independently of any mechanism's code."""
    nq, nk = shape[-2:]
    allowed = np.ones((nq, nk), bool)
    by_position = position_mask(nq, nk, causal=params.get("causal", False), window=params.get("window"),
                                alignment=params.get("causal_alignment", "bottom_right"))  # fmt: skip
    if by_position is not None:
        allowed = allowed & by_position
    if params.get("mask") is not None:
        allowed = allowed & params["mask"]
    return np.broadcast_to(allowed, shape)


def shifted_positions_change_nothing(attend, q, k, v, params, shift: int, rtol: float) -> None:
    """Adding ``shift`` to every query and key position leaves ``out`` and ``lse`` as they were (a
    mechanism whose position term depends on ``p_j − p_i`` alone)."""
    shifted = dict(params, q_positions=params["q_positions"] + shift, k_positions=params["k_positions"] + shift)
    base, moved = attend(q, k, v, **params), attend(q, k, v, **shifted)
    close("out", moved.out, base.out, rtol)
    close("lse", moved.lse, base.lse, rtol)
