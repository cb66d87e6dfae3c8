"""Invariants of log-n scaled attention (spec/dilution.md, "log-n: invariants"), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)``, a log-n implementation
returning an object with ``.out`` (B, Hq, Nq, Dv) and ``.lse`` (B, Hq, Nq)
-- a refattn :class:`~refattn.core.results.Result`, or your kernel wrapped to
look like one -- and a problem: ``q``, ``k``, ``v`` and ``params``, the
keyword arguments of :func:`refattn.dilution.logn.logn_attention`. It raises
``AssertionError`` describing the violation, or returns None. ``rtol`` is a
normwise relative tolerance: 1e-10 suits float64 implementations.

Properties that need a particular kind of problem say so and raise
``ValueError`` when given another, so a test filters its problems rather
than passing vacuously.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import allowed_keys, close, require
from ...dense.reference import dense_attention


def _log_n(k, params) -> float:
    return float(np.log(k.shape[2] if params.get("n") is None else params["n"]))


def _scale(q, params) -> float:
    return params.get("scale") or 1.0 / np.sqrt(q.shape[3])


def is_dense_attention_with_scale_times_log_n(attend, q, k, v, params, rtol=1e-10):
    """Log-n attention with ``scale`` is dense attention with ``scale · log n``:
    the same output and log-sum-exp (``log n`` multiplies the scaled scores,
    before the soft-cap and the bias). Needs ``n >= 2`` (so that the dense
    scale is positive).
    """
    log_n = _log_n(k, params)
    require(log_n > 0, "n >= 2")
    dense_params = {name: value for name, value in params.items() if name != "n"}
    result = attend(q, k, v, **params)
    dense = dense_attention(q, k, v, **dict(dense_params, scale=_scale(q, params) * log_n))
    close("out", result.out, dense.out, rtol)
    close("lse", result.lse, dense.lse, rtol)


def n_one_gives_uniform_weights(attend, q, k, v, params, rtol=1e-10):
    """With ``n = 1``, ``log 1 = 0`` makes every score 0: each row's allowed keys
    get the same weight, so the output is the mean of the allowed values and
    the log-sum-exp is ``log`` of their number (-inf where there is none).
    ``params["n"]`` is replaced by 1. Needs no bias and no dropout.
    """
    require(params.get("bias") is None and params.get("dropout_keep") is None, "no bias and no dropout")
    result = attend(q, k, v, **dict(params, n=1))
    nk = k.shape[2]
    allowed = allowed_keys(params, q.shape[:3] + (nk,)).astype(np.float64)  # (B, Hq, Nq, Nk)
    counts = allowed.sum(axis=-1)  # (B, Hq, Nq)
    values = np.repeat(v, q.shape[1] // k.shape[1], axis=1)  # (B, Hq, Nk, Dv)
    mean = np.einsum("bhqk,bhke->bhqe", allowed, values) / np.maximum(counts, 1)[..., None]
    with np.errstate(divide="ignore"):
        lse = np.log(counts)
    close("out", result.out, mean, rtol)
    close("lse", result.lse, lse, rtol)


def key_shift_changes_only_lse(attend, q, k, v, params, shift=None, rtol=1e-10):
    """Adding one vector ``u`` to every key adds ``scale · q_i · u`` to every score
    of row ``i``, which the softmax ignores: the output is unchanged, and the
    log-sum-exp moves by ``log n · scale · q_i · u``. Needs no soft-cap.
    ``shift`` is ``u`` (D,); default ``linspace(-1, 1, D)``.
    """
    require(params.get("softcap", 0.0) == 0.0, "no soft-cap")
    u = np.linspace(-1.0, 1.0, q.shape[3]) if shift is None else np.asarray(shift, np.float64)
    base, moved = attend(q, k, v, **params), attend(q, k + u, v, **params)
    close("out", moved.out, base.out, rtol)
    close("lse", moved.lse, base.lse + _log_n(k, params) * _scale(q, params) * (q @ u), rtol)


ALL = (is_dense_attention_with_scale_times_log_n, n_one_gives_uniform_weights, key_shift_changes_only_lse)
