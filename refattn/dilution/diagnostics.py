"""Attention diagnostics: how concentrated, or how diluted, each query's attention is.

The seed's argument is that as the number of keys n grows each token competes
with more tokens, so attention spreads out (every weight is 1/n when all keys
look alike) and noise keys take mass from the relevant ones. These are the
quantities that make the argument measurable, one value per query row:

* the entropy ``H = −Σ P log P`` (nats) and its normalised form ``H / log n``;
* the effective support ``exp(H)``, the number of keys a uniform row with the
  same entropy would spread over;
* the largest weight and the mass of the ``top_k`` largest weights;
* given a relevance mask, the mass on relevant and on irrelevant keys.

Attention entropy as a measure of dilution: Chiang & Cholak 2022 ("Overcoming
a Theoretical Limitation of Self-Attention", log-n scaling), Nakanishi 2025
("Scalable-Softmax Is Superior for Attention", attention fading), Zhai et al.
2023 ("Stabilizing Transformer Training by Preventing Attention Entropy
Collapse").

Three entry points, one definition:

* :func:`attention_diagnostics` on ``(q, k)`` and the options of
  :func:`refattn.dense_attention` (masks, causal, window, scale, soft-cap, bias);
  ``backend="numba"`` streams over key tiles in O(N) memory
  (``refattn/dilution/diagnostics_numba.py``);
* :func:`logit_diagnostics` on final logits ``z`` and an allowed-mask;
* :func:`diagnostics_from_weights` on attention weights ``P``.

The first two compute the entropy from the logits, ``H = lse − Σ P z``
(eq. D4), which needs no ``log P`` and is what a streaming kernel can
accumulate; the third from the weights, ``H = −Σ P log P`` (eq. D4'). The
tests check that the two agree.

Equations (D1)-(D9) are in spec/dilution.md; the step
numbers below match. Einsum letters: b batch, h query head, q query position,
k key position, d head dim.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..core import checks
from ..core.errors import SpecError
from ..core.shapes import repeat_kv_heads
from ..core.softcap import softcap
from ..core.softmax import masked_softmax
from ..dense.inputs import DenseInputs, check_dense_inputs

BACKENDS = ("reference", "numba")
DEFAULT_TOP_K = 8


@dataclass(frozen=True)
class Diagnostics:
    """Per-row diagnostics; every array has the shape of the rows, (B, Hq, Nq) for attention.

    A fully masked row (``attended == 0``) has every quantity 0: no key, no
    mass, no uncertainty. That includes the effective support, which is 0
    keys, not ``exp(0) = 1``.

    Attributes
    ----------
    entropy : ndarray
        (D4) ``H_i = −Σ_j P_ij log P_ij`` in nats (``0 log 0 = 0``); ``0 <= H_i <= log n_i``.
    normalized_entropy : ndarray
        (D5) ``H_i / log n_i`` in [0, 1] when ``n_i >= 2``. Defined as 0 when
        ``n_i <= 1``: a single key (or none) leaves no uncertainty, so that
        ``normalized_entropy == 0`` exactly when ``entropy == 0``. Never NaN.
    effective_support : ndarray
        (D6) ``exp(H_i)`` in [1, n_i] (0 on a fully masked row).
    max_weight : ndarray
        (D7) ``max_j P_ij``, in [1/n_i, 1].
    top_k_mass : ndarray
        (D8) the sum of the ``top_k`` largest weights (all of them, 1, when
        ``n_i <= top_k``).
    attended : int64 ndarray
        (D3) ``n_i``, the number of keys the row may attend to.
    relevant_mass, irrelevant_mass : ndarray or None
        (D9) ``Σ_j P_ij r_ij`` and ``Σ_j P_ij (1 − r_ij)`` for the relevance
        mask ``r``; they sum to 1 on a row with a key. None without a mask.
    top_k : int
        The ``k`` of ``top_k_mass``.
    """

    entropy: np.ndarray
    normalized_entropy: np.ndarray
    effective_support: np.ndarray
    max_weight: np.ndarray
    top_k_mass: np.ndarray
    attended: np.ndarray
    relevant_mass: np.ndarray | None
    irrelevant_mass: np.ndarray | None
    top_k: int


@dataclass(frozen=True)
class DiagnosticsInputs:
    """Checked arguments of :func:`attention_diagnostics`, shared by every backend.

    ``dense`` holds q, k and the dense options; its ``v`` is ``k`` (unused:
    diagnostics describe the weights, not the output). There is no dropout:
    diagnostics describe ``P`` before any keep-mask.
    """

    dense: DenseInputs
    top_k: int
    relevant: np.ndarray | None  # bool, broadcastable to (B, Hq, Nq, Nk)


# --------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------


def attention_diagnostics(
    q, k, *,
    top_k=DEFAULT_TOP_K, relevant=None,
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0,
    backend="reference",
) -> Diagnostics:
    """Diagnostics of the attention weights ``softmax(mask(bias + cap(scale · q kᵀ)))``.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
        ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
    mask, bias, causal, causal_alignment, window, scale, softcap
        As :func:`refattn.dense_attention`: they define the logits (D1).
    top_k : int >= 1
        ``k`` of the top-k mass (D8).
    relevant : bool ndarray broadcastable to (B, Hq, Nq, Nk), optional
        ``True`` marks a relevant key (D9). A per-key relevance, ``(1, Nk)``
        or ``(B, 1, 1, Nk)``, keeps the numba backend's memory O(N).
    backend : {"reference", "numba"}
        ``"numba"`` streams over key tiles, never forming an (Nq, Nk) array
        (refattn/dilution/diagnostics_numba.py); it computes in the input's
        precision (float32 for float32/float16/bfloat16 ``q``).

    Returns
    -------
    Diagnostics
        Arrays of shape (B, Hq, Nq); float64 from the reference.
    """
    params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, top_k=top_k, relevant=relevant,
    )  # fmt: skip
    if backend != "reference":
        checks.choice(backend, "backend", BACKENDS)
        from . import diagnostics_numba

        return diagnostics_numba.attention_diagnostics(q, k, **params)
    x = check_diagnostics_inputs(q, k, **params)
    # (D1) Logits: dense attention's steps (1)-(4) (spec/dense.md).
    return _from_logits(_logits(x.dense), x.dense.allowed(), x.top_k, x.relevant)


def logit_diagnostics(logits, *, mask=None, top_k=DEFAULT_TOP_K, relevant=None) -> Diagnostics:
    """Diagnostics of ``softmax`` over the last axis of final logits ``z``.

    Parameters
    ----------
    logits : float ndarray (..., Nq, Nk), at least 2 dimensions
        Finite logits; exclude keys with ``mask``, not with ``-inf``.
    mask : bool ndarray broadcastable to ``logits``, optional
        ``True`` = may attend; these keys are counted in ``n_i``.
    top_k, relevant
        As :func:`attention_diagnostics` (broadcastable to ``logits``).

    Returns
    -------
    Diagnostics
        Arrays of shape ``logits.shape[:-1]``, float64.
    """
    logits = _rows(logits, "logits")
    mask = None if mask is None else checks.broadcastable(mask, "mask", logits.shape, "bool")
    top_k = _top_k(top_k)
    relevant = None if relevant is None else checks.broadcastable(relevant, "relevant", logits.shape, "bool")
    return _from_logits(np.asarray(logits, np.float64), mask, top_k, relevant)


def diagnostics_from_weights(weights, *, mask=None, top_k=DEFAULT_TOP_K, relevant=None) -> Diagnostics:
    """Diagnostics of given attention weights.

    Parameters
    ----------
    weights : float ndarray (..., Nq, Nk), at least 2 dimensions
        Non-negative; each row sums to 1 (within ``sqrt(eps)`` of its dtype:
        ~1.5e-8 for float64, ~3.5e-4 for float32) or is all 0 (fully masked).
    mask : bool ndarray broadcastable to ``weights``, optional
        The keys each row may attend to, which ``n_i`` counts; weights on
        other keys must be 0. Without it, a row with mass attends to all
        ``Nk`` keys and an all-zero row to none. (Weights cannot tell an
        allowed key whose weight underflowed to 0 from a masked one.)
    top_k, relevant
        As :func:`attention_diagnostics` (broadcastable to ``weights``).

    Returns
    -------
    Diagnostics
        Arrays of shape ``weights.shape[:-1]``, float64.
    """
    given = _rows(weights, "weights")
    mask = None if mask is None else checks.broadcastable(mask, "mask", given.shape, "bool")
    top_k = _top_k(top_k)
    relevant = None if relevant is None else checks.broadcastable(relevant, "relevant", given.shape, "bool")
    weights = np.asarray(given, np.float64)  # (..., Nq, Nk)
    has_mass = _check_weights(weights, mask, _row_sum_tolerance(given.dtype))
    # (D3) Attended keys: the mask's, or every key of a row with mass.
    attended = _attended(mask, weights.shape) if mask is not None else np.where(has_mass, weights.shape[-1], 0)
    # (D4') H = −Σ P log P, with 0 log 0 = 0.
    positive = weights > 0
    entropy = -np.sum(np.where(positive, weights * np.log(np.where(positive, weights, 1.0)), 0.0), axis=-1)
    return _summaries(weights, entropy, attended, top_k, relevant)


def check_diagnostics_inputs(
    q, k, *, mask, bias, causal, causal_alignment, window, scale, softcap, top_k, relevant
) -> DiagnosticsInputs:
    """Check every argument of :func:`attention_diagnostics`; raise :class:`SpecError` on the first bad one."""
    dense = check_dense_inputs(
        q, k, k, mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=None, dropout_p=0.0,
    )  # fmt: skip
    top_k = _top_k(top_k)
    if relevant is not None:
        relevant = checks.broadcastable(relevant, "relevant", dense.shape.scores, "bool")
    return DiagnosticsInputs(dense, top_k, relevant)


# --------------------------------------------------------------------------
# The steps.
# --------------------------------------------------------------------------


def _logits(x: DenseInputs) -> np.ndarray:
    """(D1) Final logits before masking: dense steps (1)-(3), in float64. (B, Hq, Nq, Nk)."""
    q = np.asarray(x.q, np.float64)  # (B, Hq, Nq, D)
    k = repeat_kv_heads(np.asarray(x.k, np.float64), x.shape.group)  # (B, Hq, Nk, D)
    scores = x.scale * np.einsum("bhqd,bhkd->bhqk", q, k, optimize=True)  # (1)
    capped = softcap(scores, x.softcap) if x.softcap > 0 else scores  # (2)
    return capped if x.bias is None else capped + np.asarray(x.bias, np.float64)  # (3)


def _from_logits(logits: np.ndarray, allowed: np.ndarray | None, top_k: int, relevant) -> Diagnostics:
    """Steps (D2)-(D9) from final logits (..., Nk) and the allowed-mask (step (4) of dense)."""
    # (D2) Weights and log-sum-exp; masked keys get weight exactly 0.
    weights, lse = masked_softmax(logits, allowed)  # (..., Nk), (...)
    # (D3) Attended keys n_i.
    attended = _attended(allowed, logits.shape)  # (...)
    # (D4) H = lse − Σ_j P_j z_j, written around the row maximum m as
    #      (lse − m) − Σ_j P_j (z_j − m): both terms are >= 0, and n equal
    #      logits 0 give exactly log n. Masked keys (P = 0, z = −inf) add nothing.
    has_key = attended > 0
    row_max = np.max(logits if allowed is None else np.where(allowed, logits, -np.inf), axis=-1)
    shift = np.where(has_key, row_max, 0.0)[..., None]  # (..., 1)
    centred = logits - shift if allowed is None else np.where(allowed, logits - shift, 0.0)
    entropy = np.where(has_key, (lse - shift[..., 0]) - np.sum(weights * centred, axis=-1), 0.0)
    return _summaries(weights, entropy, attended, top_k, relevant)


def _summaries(weights: np.ndarray, entropy: np.ndarray, attended: np.ndarray, top_k: int, relevant) -> Diagnostics:
    """Steps (D5)-(D9), with the entropy clamped to its range [0, log n_i]."""
    has_key = attended > 0
    log_n = np.log(np.maximum(attended, 1))  # (...)
    # Rounding can put H an ulp outside [0, log n_i]; the bounds are exact.
    entropy = np.clip(entropy, 0.0, log_n)
    # (D5) Normalised entropy; 0 when n_i <= 1 (log n_i = 0).
    normalized = np.divide(entropy, log_n, out=np.zeros_like(entropy), where=attended >= 2)
    # (D6) Effective support exp(H) in [1, n_i]; 0 keys on a fully masked row.
    support = np.where(has_key, np.minimum(np.exp(entropy), np.maximum(attended, 1)), 0.0)
    # (D7) Largest weight.
    max_weight = np.max(weights, axis=-1)
    # (D8) Mass of the k largest weights.
    n_keys = weights.shape[-1]
    k = min(top_k, n_keys)
    top_k_mass = np.sum(np.partition(weights, n_keys - k, axis=-1)[..., n_keys - k :], axis=-1)
    # (D9) Mass on relevant and on irrelevant keys.
    relevant_mass = irrelevant_mass = None
    if relevant is not None:
        relevant_mass = np.sum(np.where(relevant, weights, 0.0), axis=-1)
        irrelevant_mass = np.sum(np.where(relevant, 0.0, weights), axis=-1)
    return Diagnostics(
        entropy=entropy,
        normalized_entropy=normalized,
        effective_support=support,
        max_weight=max_weight,
        top_k_mass=top_k_mass,
        attended=attended.astype(np.int64),
        relevant_mass=relevant_mass,
        irrelevant_mass=irrelevant_mass,
        top_k=top_k,
    )


def _attended(allowed: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """(D3) ``n_i``: allowed keys per row, int64 of shape ``shape[:-1]``."""
    if allowed is None:
        return np.full(shape[:-1], shape[-1], dtype=np.int64)
    return np.sum(np.broadcast_to(allowed, shape), axis=-1, dtype=np.int64)


# --------------------------------------------------------------------------
# Checks.
# --------------------------------------------------------------------------


def _rows(x, name: str) -> np.ndarray:
    """``x`` checked to be a finite real array (..., Nq, Nk) of at least 2 dimensions."""
    if isinstance(x, np.ndarray) and x.ndim < 2:
        raise SpecError(name, "an array (..., Nq, Nk) of at least 2 dimensions", f"shape {x.shape}")
    x = checks.float_array(x, name)
    if x.size == 0:
        raise SpecError(name, "non-empty dimensions", f"shape {x.shape}")
    return x


def _top_k(x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise SpecError("top_k", "an int >= 1", checks.summary(x))
    return int(x)


def _row_sum_tolerance(dtype: np.dtype) -> float:
    """``sqrt(eps)`` of the weights' dtype (float64's for integers): rows must sum to 1 within it."""
    eps = np.finfo(np.float64).eps if dtype.kind in "iu" else ml_dtypes.finfo(dtype).eps
    return float(np.sqrt(float(eps)))


def _check_weights(weights: np.ndarray, mask: np.ndarray | None, tolerance: float) -> np.ndarray:
    """Check that ``weights`` are rows of a masked softmax; return which rows have mass."""
    if np.any(weights < 0):
        bad = tuple(int(i) for i in np.argwhere(weights < 0)[0])
        raise SpecError("weights", "non-negative weights", f"{weights[bad]} at index {bad}")
    if mask is not None:
        outside = (weights > 0) & ~mask
        if np.any(outside):
            bad = tuple(int(i) for i in np.argwhere(outside)[0])
            raise SpecError("weights", "0 on the keys the mask excludes", f"{weights[bad]} at index {bad}")
    total = np.sum(weights, axis=-1)  # (...)
    has_mass = total > 0
    off = has_mass & (np.abs(total - 1.0) > tolerance)
    if np.any(off):
        bad = tuple(int(i) for i in np.argwhere(off)[0])
        raise SpecError(
            "weights",
            f"rows summing to 1 (within {tolerance:.1e}) or all 0 (fully masked)",
            f"row sum {total[bad]!r} at row {bad}",
        )
    if mask is not None:
        empty = ~has_mass & (_attended(mask, weights.shape) > 0)
        if np.any(empty):
            bad = tuple(int(i) for i in np.argwhere(empty)[0])
            raise SpecError("weights", "mass on every row the mask lets attend", f"an all-zero row {bad}")
    return has_mass
