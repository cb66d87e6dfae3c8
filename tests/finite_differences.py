"""Central finite differences of the scalar L = <dout, out> + <dlse, lse>, the independent check of every VJP."""

import numpy as np

#: Step of the central differences: truncation ~STEP², rounding ~u / STEP, both near 1e-10 relative.
STEP = 1e-6


def loss(forward, arrays: dict, params: dict, dout, dlse) -> float:
    """L = <dout, out> + <dlse, lse>, with dlse = 0 on fully masked rows (lse = -inf)."""
    result = forward(**arrays, **params)
    total = np.sum(dout * result.out)
    if dlse is not None:
        total += np.sum(dlse * np.where(np.isfinite(result.lse), result.lse, 0.0))
    return total


def finite_differences(forward, arrays: dict, params: dict, dout, dlse, name: str) -> np.ndarray:
    """dL/d``arrays[name]``, one central difference per entry."""
    grad = np.zeros_like(arrays[name])
    for index in np.ndindex(grad.shape):
        plus = {n: a.copy() for n, a in arrays.items()}
        minus = {n: a.copy() for n, a in arrays.items()}
        plus[name][index] += STEP
        minus[name][index] -= STEP
        grad[index] = (loss(forward, plus, params, dout, dlse) - loss(forward, minus, params, dout, dlse)) / (2 * STEP)
    return grad
