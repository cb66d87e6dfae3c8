"""Invariants of ALiBi (spec/position.md, "ALiBi: invariants"), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)``, an ALiBi implementation
returning an object with ``.out`` (B, Hq, Nq, Dv) and ``.lse`` (B, Hq, Nq)
-- a refattn :class:`~refattn.core.results.Result`, or your kernel wrapped to
look like one -- and a problem: ``q``, ``k``, ``v`` and ``params``, the
keyword arguments of :func:`refattn.position.alibi.alibi_attention`
(``q_positions`` and ``k_positions`` included). It raises ``AssertionError``
describing the violation, or returns None. ``rtol`` is a normwise relative
tolerance: 1e-10 suits float64 implementations.

Properties that need a particular kind of problem say so and raise
``ValueError`` when given another, so a test filters its problems rather
than passing vacuously.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import allowed_keys, close, require, shifted_positions_change_nothing
from .reference import alibi_slopes


def _slopes(q, params) -> np.ndarray:
    return alibi_slopes(q.shape[1]) if params.get("slopes") is None else np.asarray(params["slopes"], np.float64)


def position_shift_invariance(attend, q, k, v, params, shift=1000, rtol=1e-10):
    """Adding the same integer to every query and key position changes nothing: the
    bias depends on the positions only through ``p_j − p_i``."""
    shifted_positions_change_nothing(attend, q, k, v, params, shift, rtol)


def key_only_shortcut(attend, q, k, v, params, rtol=1e-10):
    """The key-only bias ``m_h · p_j`` (BLOOM, MPT, the authors' fairseq code,
    FlashAttention's causal path) gives the causal form's output whatever the
    mask; its log-sum-exp is larger by exactly ``m_h · p_i``.

    The shortcut is run through ``attend`` itself: all slopes 0 and the
    shortcut added to the user bias. Needs ``form="causal"`` (the default).
    """
    require(params.get("form", "causal") == "causal", 'form="causal"')
    slopes = _slopes(q, params)
    key_only = slopes[:, None, None] * params["k_positions"][None, None, :]  # (Hq, 1, Nk)
    user_bias = params.get("bias")
    shortcut = dict(params, slopes=np.zeros_like(slopes), bias=key_only if user_bias is None else user_bias + key_only)
    base, moved = attend(q, k, v, **params), attend(q, k, v, **shortcut)
    row_shift = slopes[:, None] * params["q_positions"][None, :]  # (Hq, Nq)
    close("out", moved.out, base.out, rtol)
    close("lse - m_h p_i", moved.lse - row_shift, base.lse, rtol)


def identical_keys_give_distance_weights(attend, q, k, v, params, rtol=1e-10):
    """With every key the same, every score is the same, so the weights are the
    softmax of the ALiBi term alone over the allowed keys: ``P_ij ∝ exp(m_h δ_ij)``.
    The output is then a closed form in the values, slopes and positions.

    Needs no user bias and no dropout (a soft-cap is fine: equal scores stay
    equal). Uses key 0 of each head as the common key.
    """
    require(params.get("bias") is None and params.get("dropout_keep") is None, "no bias and no dropout")
    nk = k.shape[2]
    same_k = np.broadcast_to(k[:, :, :1], k.shape).copy()
    result = attend(q, same_k, v, **params)
    distance = params["k_positions"][None, :] - params["q_positions"][:, None]  # (Nq, Nk)
    if params.get("form", "causal") == "symmetric":
        distance = -np.abs(distance)
    logits = _slopes(q, params)[:, None, None] * distance  # (Hq, Nq, Nk)
    allowed = allowed_keys(params, result.lse.shape + (nk,))  # (B, Hq, Nq, Nk)
    masked = np.where(allowed, logits, -np.inf)
    top = np.max(masked, axis=-1, keepdims=True)
    weights = np.where(allowed, np.exp(masked - np.where(np.isfinite(top), top, 0.0)), 0.0)
    weights = weights / np.maximum(weights.sum(-1, keepdims=True), np.finfo(float).tiny)
    values = np.repeat(v, q.shape[1] // k.shape[1], axis=1)  # (B, Hq, Nk, Dv)
    close("out", result.out, np.einsum("bhqk,bhke->bhqe", weights, values), rtol)


ALL = (position_shift_invariance, key_only_shortcut, identical_keys_give_distance_weights)
