"""Log-n scaled attention: the executable specification.

Chiang & Cholak 2022, "Overcoming a Theoretical Limitation of
Self-Attention" (ACL), section 5: as the input grows, softmax attention
flattens, so a transformer's confidence on tasks such as PARITY and FIRST
decays with the length; multiplying the attention logits by ``log n`` keeps
it. In the paper ``n`` is the length of the input string, the same for every
position.

**Which n.** refattn uses one ``n`` for the whole call, the same for every
row and head: by default ``n = Nk``, the number of keys (the input length in
self-attention; the context length when decoding with a cache), and ``n=``
overrides it with any integer ``>= 1``, for instance a model's training
length. The logarithm is natural. This is not SSMax's ``n``
(:mod:`refattn.dilution.ssmax`), which counts per query row the keys the row
actually attends to: under a causal, window or padding mask the two differ,
and log-n scaling keeps ``log Nk`` on every row.

**Where the factor enters.** As for SSMax, ``log n`` multiplies the *scaled
scores* at dense step (1), before the soft-cap and before any bias:

    s_ij = log n · scale · q_i · k_j = scale · (log n · q_i) · k_j

so it folds into the query, ``q' = log n · q``, and everything after is dense
attention on ``q'``, which this module calls rather than repeats. The user
``bias`` is not multiplied.

**Edge cases.** ``n = 1`` gives ``log 1 = 0``: every score is 0, each row's
weights are uniform over its allowed keys (before the bias), and ``q`` gets a
zero gradient. Fully masked rows are those of dense attention (output 0, lse
-inf); the factor plays no part in them.

Equations and their numbers are in spec/dilution.md (log-n scaling); the step
numbers below match: (L1)-(L2), then dense attention's steps (1)-(7) of
spec/dense.md.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import FLOAT64, Numerics
from ...core.results import Cotangents, Grads, Result
from ...dense import reference as dense_reference
from ...dense.inputs import DenseInputs, check_dense_inputs

# --- checked inputs -----------------------------------------------------------


@dataclass(frozen=True)
class LognInputs:
    """Checked log-n arguments: the dense ones and the length ``n``."""

    dense: DenseInputs
    n: int  # >= 1
    training_length: int | None  # >= 1: Qwen's per-row rule instead of one n

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: dense attention's."""
        return self.dense.cotangent_shapes()


def length(n, kv_len: int) -> int:
    """``n``: ``kv_len`` when None, else checked to be an integer >= 1 (a bool or a float is refused)."""
    if n is None:
        return kv_len
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) or n < 1:
        raise SpecError("n", "an integer >= 1 (the length whose log scales the logits), or None for Nk", checks.summary(n))
    return int(n)


def check_logn_inputs(q, k, v, *, n, training_length, **dense_arguments) -> LognInputs:
    """Check every argument of :func:`logn_attention`; raise :class:`SpecError` on the first bad one.

    ``dense_arguments`` are :func:`refattn.dense_attention`'s keywords, checked by its own check.
    """
    dense = check_dense_inputs(q, k, v, **dense_arguments)
    if training_length is not None:
        if n is not None:
            raise SpecError("n", "None when training_length is given (the factor is then per row)", checks.summary(n))
        if isinstance(training_length, (bool, np.bool_)) or not isinstance(training_length, numbers.Integral) \
                or training_length < 2:  # fmt: skip
            raise SpecError("training_length", "an integer >= 2 (the base of Qwen's log), or None", checks.summary(training_length))
        training_length = int(training_length)
    inputs = LognInputs(dense=dense, n=length(n, dense.shape.kv_len), training_length=training_length)
    largest = np.log(inputs.n) if training_length is None else float(np.max(factor_of(inputs, FLOAT64)))
    checks.scores_within_range(dense.q, dense.k, dense.scale, q_factor=largest)  # (L2) q' = log n · q
    return inputs


# --- the steps ------------------------------------------------------------------


def row_positions(q_len: int, kv_len: int) -> np.ndarray:
    """``p_i = i + Nk - Nq``, each query row's position in the sequence (its last ``Nq`` tokens), (Nq,) int64."""
    return np.arange(q_len, dtype=np.int64) + kv_len - q_len


def factor_of(x: LognInputs, num: Numerics) -> np.ndarray:
    """Step (L1): ``log n``, natural, a scalar in ``num``'s compute dtype, stored in its precision.

    With ``training_length`` L (Qwen's ``use_logn_attn``): per row,
    ``log(p_i + 1) / log L`` where ``p_i + 1 > L`` and 1 elsewhere, shaped (Nq, 1).
    """
    if x.training_length is None:
        return num.store(np.log(np.asarray(x.n, dtype=num.compute)))
    count = row_positions(x.dense.shape.q_len, x.dense.shape.kv_len) + 1  # (Nq,) p_i + 1
    ratio = np.log(count.astype(num.compute)) / np.log(np.asarray(x.training_length, dtype=num.compute))
    return num.store(np.where(count > x.training_length, ratio, 1.0).astype(num.compute))[:, None]


def _scaled_query(factor: np.ndarray, q: np.ndarray, num: Numerics) -> np.ndarray:
    """Step (L2): ``q' = log n · q`` (the row's factor with ``training_length``), (B, Hq, Nq, D)."""
    return num.store(factor * num.load(q))


# --- the mechanism ------------------------------------------------------------


def logn_attention(
    q, k, v, *,
    n=None, training_length=None,
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Log-n scaled attention: dense attention whose scaled scores are multiplied by ``log n``.

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
    n : int >= 1, optional
        The length whose natural log scales the logits, the same for every
        row; default ``Nk``. Not differentiated.
    training_length : int >= 2, optional
        Qwen's per-row rule (``use_logn_attn`` at inference) instead of one
        ``n``: row ``i`` at position ``p_i = i + Nk - Nq`` gets the factor
        ``log(p_i + 1) / log(training_length)`` where ``p_i + 1 >
        training_length``, and 1 elsewhere. ``n`` must then be None.
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As :func:`refattn.dense_attention`. Masks do not change ``n``;
        ``bias`` is added after the soft-cap and is not multiplied.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), float64, the lse of
        the logits with the factor. ``aux`` is empty.
    """
    return registry.call_forward("logn", locals())


def forward(x: LognInputs, num: Numerics) -> Result:
    """The reference backend: steps (L1)-(L2), then dense (1)-(7) on ``q'``, in precision ``num``."""
    # (L1) The factor log n.
    factor = factor_of(x, num)  # ()
    # (L2) Folded into the query: scale · q'_i · k_j = log n · scale · q_i · k_j.
    q_scaled = _scaled_query(factor, x.dense.q, num)  # (B, Hq, Nq, D)
    # Dense (1)-(7) on q'.
    return dense_reference.forward(replace(x.dense, q=q_scaled), num)


logn_attention_vjp = registry.vjp_function(
    logn_attention, "logn", grads="""    ``q``, ``k``, ``v`` and ``bias`` (its own shape) when a bias was
    given. ``n`` is an integer: no gradient.""",
)


def vjp(x: LognInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: dense (7')-(1') on ``q'``, then (L2')-(L1'), in precision ``num``."""
    factor = factor_of(x, num)  # (L1)
    q_scaled = _scaled_query(factor, x.dense.q, num)  # (L2)
    # Dense (7')-(1') on q': dq', dk, dv and the bias's gradient.
    grads = dense_reference.vjp(replace(x.dense, q=q_scaled), cotangents, num)
    # (L2') q' = log n · q: dq = log n · dq'.
    grads["q"] = num.store(factor * num.load(grads["q"])).astype(np.float64)
    # (L1') n is an integer.
    return grads
