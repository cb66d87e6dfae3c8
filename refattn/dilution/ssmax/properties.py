"""Invariants of SSMax attention (spec/dilution.md, "SSMax: invariants"), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)``, an SSMax implementation
returning an object with ``.out`` (B, Hq, Nq, Dv) and ``.lse`` (B, Hq, Nq)
-- a refattn :class:`~refattn.core.results.Result`, or your kernel wrapped to
look like one -- and a problem: ``q``, ``k``, ``v`` and ``params``, the
keyword arguments of :func:`refattn.dilution.ssmax.ssmax_attention` (``s``
included). It raises ``AssertionError`` describing the violation, or returns
None. ``rtol`` is a normwise relative tolerance: 1e-10 suits float64
implementations.

Properties that need a particular kind of problem say so and raise
``ValueError`` when given another, so a test filters its problems rather
than passing vacuously.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import allowed_keys, close, require
from ...dense.reference import dense_attention
from .reference import attended_counts

#: Keyword arguments that are SSMax's own, not dense attention's.
SSMAX_PARAMS = ("s", "s_bias")


def _per_head(value, num_heads: int) -> np.ndarray:
    """``s`` or ``s_bias`` as an (Hq,) float64 array."""
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (num_heads,))


def _masking(params) -> dict:
    return {name: params[name] for name in ("mask", "causal", "causal_alignment", "window") if name in params}


def _factor(q, k, params) -> tuple[np.ndarray, np.ndarray]:
    """``n_i`` and ``f_i = s_h log n_i + s_bias_h`` (0 where ``n_i = 0``), each (B, Hq, Nq)."""
    counts = attended_counts(q, k, **_masking(params))
    hq = q.shape[1]
    s, s_bias = _per_head(params["s"], hq)[:, None], _per_head(params.get("s_bias", 0.0), hq)[:, None]
    return counts, np.where(counts > 0, s * np.log(np.maximum(counts, 1)) + s_bias, 0.0)


def unit_factor_is_dense_attention(attend, q, k, v, params, rtol=1e-10):
    """Where ``s_h log n_i + s_bias_h = 1`` on every row, SSMax is dense attention: the
    same output and log-sum-exp. ``s_bias`` is set to ``1 − s_h log Nk``.

    Needs every row to attend to the same ``n_i = Nk`` keys: no mask, no
    causality, no window.
    """
    require(not any(params.get(name) for name in ("mask", "causal", "window")), "no mask, causality or window")
    s = _per_head(params["s"], q.shape[1])
    ssmax = attend(q, k, v, **dict(params, s=s, s_bias=1.0 - s * np.log(k.shape[2])))
    dense = dense_attention(q, k, v, **{name: value for name, value in params.items() if name not in SSMAX_PARAMS})
    close("out", ssmax.out, dense.out, rtol)
    close("lse", ssmax.lse, dense.lse, rtol)


def identical_keys_give_weights_one_over_n(attend, q, k, v, params, rtol=1e-10):
    """With every key the same, every allowed score of row ``i`` is the same, so
    each of its ``n_i`` keys gets weight ``1 / n_i`` whatever the factor: the
    output is the mean of the allowed values, and the log-sum-exp is
    ``f_i · cap(scale · q_i · k) + log n_i`` (-inf where ``n_i = 0``), which
    checks both ``n_i`` and the factor.

    Needs no bias and no dropout (a soft-cap is fine: equal scores stay
    equal). Uses key 0 of each head as the common key.
    """
    require(params.get("bias") is None and params.get("dropout_keep") is None, "no bias and no dropout")
    same_k = np.broadcast_to(k[:, :, :1], k.shape).copy()
    result = attend(q, same_k, v, **params)
    counts, factor = _factor(q, k, params)
    group = q.shape[1] // k.shape[1]
    allowed = allowed_keys(params, q.shape[:3] + (k.shape[2],)).astype(np.float64)  # (B, Hq, Nq, Nk)
    values = np.repeat(v, group, axis=1)  # (B, Hq, Nk, Dv)
    mean = np.einsum("bhqk,bhke->bhqe", allowed, values) / np.maximum(counts, 1)[..., None]
    scale = params.get("scale") or 1.0 / np.sqrt(q.shape[3])
    score = scale * np.einsum("bhqd,bhd->bhq", q, np.repeat(k[:, :, 0], group, axis=1))  # (B, Hq, Nq)
    score = factor * score
    if params.get("softcap", 0.0) > 0:
        score = params["softcap"] * np.tanh(score / params["softcap"])
    with np.errstate(divide="ignore"):
        lse = np.where(counts > 0, score + np.log(counts), -np.inf)
    close("out", result.out, mean, rtol)
    close("lse", result.lse, lse, rtol)


def key_shift_changes_only_lse(attend, q, k, v, params, shift=None, rtol=1e-10):
    """Adding one vector ``u`` to every key adds ``scale · q_i · u`` to every score
    of row ``i``, a constant of the row, which the softmax ignores: the output
    is unchanged, and the log-sum-exp moves by ``f_i · scale · q_i · u`` (the
    factor multiplies it, as it multiplies every score; a bias would not be
    multiplied).

    Needs no soft-cap (``tanh`` of a shifted score is not shifted). ``shift``
    is ``u`` (D,); default ``linspace(-1, 1, D)``.
    """
    require(params.get("softcap", 0.0) == 0.0, "no soft-cap")
    u = np.linspace(-1.0, 1.0, q.shape[3]) if shift is None else np.asarray(shift, np.float64)
    base, moved = attend(q, k, v, **params), attend(q, k + u, v, **params)
    _, factor = _factor(q, k, params)
    scale = params.get("scale") or 1.0 / np.sqrt(q.shape[3])
    close("out", moved.out, base.out, rtol)
    close("lse", moved.lse, base.lse + factor * scale * (q @ u), rtol)


ALL = (unit_factor_is_dense_attention, identical_keys_give_weights_one_over_n, key_shift_changes_only_lse)
