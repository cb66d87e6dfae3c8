"""Masked softmax, log-sum-exp and the merge of partial results.

Fully masked rows are defined, not NaN: weights 0, output 0, lse ``-inf``
(spec/README.md, "Fully masked rows"). Masked entries are excluded exactly
(``-inf``), never by adding a large finite number.
"""

from __future__ import annotations

import numpy as np

from .checks import float_array, summary
from .errors import SpecError
from .precision import FLOAT64, Numerics


def masked_softmax(logits: np.ndarray, allowed: np.ndarray | None, num: Numerics = FLOAT64):
    """Softmax over the last axis, restricted to ``allowed``; also its log-sum-exp.

    Parameters
    ----------
    logits : ndarray (..., Nk)
        Finite scores.
    allowed : bool ndarray broadcastable to ``logits``, or None (all allowed)
    num : Numerics
        Precision in which the steps are stored (float64 by default).

    Returns
    -------
    weights : ndarray (..., Nk)
        ``exp(s - lse)`` on allowed entries, 0 elsewhere; rows sum to 1, or
        are all 0 when nothing is allowed.
    lse : ndarray (...)
        ``log sum_j exp(s_j)`` over allowed entries; ``-inf`` when none is.
    """
    masked = logits if allowed is None else np.where(allowed, logits, -np.inf)
    # 1. Row maximum for stability. A fully masked row has max -inf; shift it
    #    by 0 instead so that no -inf - (-inf) = NaN is ever formed.
    row_max = masked.max(axis=-1, keepdims=True)
    has_key = np.isfinite(row_max)
    shift = np.where(has_key, row_max, 0.0)
    # 2. Exponentials; exp(-inf) = 0 removes masked entries exactly.
    exp_shifted = num.store(np.exp(masked - shift))
    total = num.store(exp_shifted.sum(axis=-1, keepdims=True))
    # 3. Normalise rows that have a key; a fully masked row stays all-zero.
    weights = num.store(exp_shifted / np.where(has_key, total, 1.0))
    with np.errstate(divide="ignore"):
        lse = np.where(has_key, shift + np.log(total), -np.inf)[..., 0]
    # A row of logits at the storage type's lowest value (a mask_value of -float32 max) has an lse below
    # it: -inf in that type, which is its rounding, not an error.
    with np.errstate(over="ignore"):
        return weights, num.store(lse)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log sum exp`` along ``axis``; ``-inf`` where every entry is ``-inf``."""
    top = np.max(x, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(shift + np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True)), axis)


def _partial(p, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One partial of :func:`merge`: its ``out`` (a finite array of at least 1 dimension) and ``lse`` (an array)."""
    if hasattr(p, "out"):
        out, lse = p.out, getattr(p, "lse", None)
    elif isinstance(p, (tuple, list)) and len(p) == 2:
        out, lse = p
    else:
        out = lse = None
    if not isinstance(out, np.ndarray) or out.ndim < 1 or not isinstance(lse, np.ndarray):
        raise SpecError(name, "an (out, lse) pair of numpy arrays, or a Result with an lse", summary(p))
    return float_array(out, f"{name}.out"), lse


def merge(partials):
    """Combine results computed over disjoint key sets into the result over their union.

    For partial ``r`` with output ``o_r`` and log-sum-exp ``l_r``::

        lse = log sum_r exp(l_r)
        out = sum_r exp(l_r - lse) * o_r

    This is the identity behind FlashAttention's online softmax, split-KV
    decoding and ring attention. Partials whose every key was masked
    (``l_r = -inf``) get weight 0; if all are, the row is fully masked:
    out 0, lse ``-inf``.

    Parameters
    ----------
    partials : sequence of (out, lse) pairs or :class:`Result`
        ``out`` (..., Dv) and ``lse`` (...), all of the same shapes.

    Returns
    -------
    out : ndarray (..., Dv), lse : ndarray (...)
    """
    if isinstance(partials, (str, bytes)) or not hasattr(partials, "__iter__"):
        raise SpecError("partials", "a sequence of (out, lse) pairs or Results", summary(partials))
    pairs = [_partial(p, f"partials[{r}]") for r, p in enumerate(partials)]
    if not pairs:
        raise SpecError("partials", "at least one (out, lse) pair", "an empty sequence")
    for r, (o, l) in enumerate(pairs):
        if o.shape[:-1] != l.shape or (o.shape, l.shape) != (pairs[0][0].shape, pairs[0][1].shape):
            wanted = f"out (..., Dv) and lse (...) of matching shapes, those of partials[0]: {pairs[0][0].shape}, {pairs[0][1].shape}"
            raise SpecError(f"partials[{r}]", wanted, f"out of shape {o.shape}, lse of shape {l.shape}")
    outs = np.stack([o.astype(np.float64) for o, _ in pairs])  # (R, ..., Dv)
    lses = np.stack([l.astype(np.float64) for _, l in pairs])  # (R, ...)
    if np.any(np.isnan(lses)) or np.any(lses == np.inf):
        raise SpecError("partials[].lse", "finite values or -inf", "NaN or +inf")
    lse = logsumexp(lses, axis=0)  # (...)
    has_key = np.isfinite(lse)
    weight = np.where(has_key, np.exp(lses - np.where(has_key, lse, 0.0)), 0.0)  # (R, ...)
    out = np.sum(weight[..., None] * outs, axis=0)  # (..., Dv)
    return out, lse
