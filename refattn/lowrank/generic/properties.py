"""Invariants of generic low-rank attention (spec/low_rank.md), reusable on any implementation."""

from __future__ import annotations

import numpy as np

from ...core.invariants import close


def matches_explicit_matrix(attend, u, w, v, params, rtol=1e-12):
    """The output equals the explicit (Nq, Nk) matrix Â = U W (row-normalised when ``normalized``) times V."""
    implied = np.asarray(u, np.float64) @ np.asarray(w, np.float64)
    if params.get("normalized", True):
        implied = implied / implied.sum(axis=-1, keepdims=True)
    close("out", attend(u, w, v, **params).out, implied @ np.asarray(v, np.float64), rtol)
