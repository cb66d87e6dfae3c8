"""Soft-capping ``c · tanh(s / c)`` and its derivative, computed without cancellation.

The derivative ``1 − tanh²(s / c)`` is tiny where the cap saturates, and
forming it as ``1 − (capped / c)²`` cancels: its relative error grows like
``u / (1 − tanh²)``, 10⁻⁸ in float64 at ``|s / c| = 10``, which a gradient
whose every score is saturated carries into its normwise error. The identity

    1 − tanh²(x) = sech²(x) = 4 e^(−2|x|) / (1 + e^(−2|x|))²

has only roundoff-sized relative error for every ``x`` and cannot overflow.
The Numba kernels use the same formula (``refattn.core.tiles.softcap_slope``).
"""

from __future__ import annotations

import numpy as np


def softcap(scores: np.ndarray, cap: float) -> np.ndarray:
    """``cap · tanh(scores / cap)``, elementwise (``cap > 0``)."""
    return cap * np.tanh(scores / cap)


def softcap_slope(scores: np.ndarray, cap: float) -> np.ndarray:
    """``d/ds [cap · tanh(s / cap)] = sech²(s / cap)`` at ``scores``, elementwise (``cap > 0``)."""
    decay = np.exp(-2.0 * np.abs(scores / cap))  # e^(−2|x|) in (0, 1]
    return 4.0 * decay / (1.0 + decay) ** 2
