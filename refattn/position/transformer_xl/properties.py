"""Invariants of Transformer-XL attention (spec/position.md, Transformer-XL), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)``, a function returning an
object with ``.out`` (B, Hq, Nq, Dv) and ``.lse`` (B, Hq, Nq) -- a refattn
:class:`~refattn.core.results.Result`, or your kernel wrapped to look like
one -- and a problem: q, k, v and ``params``, which hold ``r``, ``u``,
``v_bias``, ``q_positions``, ``k_positions`` and any dense parameters. It
raises ``AssertionError`` describing the violation, or returns None. ``rtol``
is a normwise relative tolerance: 1e-10 suits float64 implementations.

Properties that need a particular kind of problem say so and raise
``ValueError`` when given another, so a test filters its problems rather
than passing vacuously.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require
from ...dense import properties as dense_properties
from ...dense.reference import dense_attention
from .reference import rel_shift


def position_shift_invariance(attend, q, k, v, params, shift=1000, rtol=1e-10):
    """Adding one constant to every query and every key position changes nothing: only distances enter."""
    moved = dict(params, q_positions=params["q_positions"] + shift, k_positions=params["k_positions"] + shift)
    base, shifted = attend(q, k, v, **params), attend(q, k, v, **moved)
    close("out", shifted.out, base.out, rtol)
    close("lse", shifted.lse, base.lse, rtol)


def equals_rel_shift_form(attend, q, k, v, params, rtol=1e-10):
    """On the original's setup, attention equals the original's formulation with ``rel_shift``.

    The setup: causal, ``k_positions = arange(Nk)``, ``q_positions = mem_len +
    arange(Nq)`` with ``mem_len = Nk - Nq >= 0``, ``R = Nk``, no soft-cap and no
    window. The original forms the position term of every query against every
    row, ``(q + v_bias) rᵀ``, shifts it with ``rel_shift`` and masks the
    entries above ``j = i + mem_len``, where the shift leaves values that
    belong to no pair. Here that shifted term, scaled, is the bias of dense
    attention over ``q + u`` and ``k``.
    """
    nq, nk = q.shape[2], k.shape[2]
    original_positions = (
        np.array_equal(params["k_positions"], np.arange(nk))
        and np.array_equal(params["q_positions"], nk - nq + np.arange(nq))
    )
    require(nk >= nq and original_positions, "k_positions = arange(Nk) and q_positions = Nk - Nq + arange(Nq)")
    require(params["r"].shape[1] == nk, "R = Nk rows of r")
    require(bool(params.get("causal")) and params.get("causal_alignment", "bottom_right") == "bottom_right",
             "causal=True, bottom-right")  # fmt: skip
    require(not params.get("softcap") and params.get("window") is None, "no soft-cap and no window")
    r, u, v_bias = params["r"], params["u"], params["v_bias"]
    scale = params.get("scale") or 1 / np.sqrt(q.shape[-1])
    by_row = np.einsum("bhqd,htd->bhqt", q + v_bias[:, None, :], r)  # (B, Hq, Nq, R)
    position = scale * rel_shift(by_row)  # (B, Hq, Nq, Nk); entries above j = i + mem_len are masked
    if params.get("bias") is not None:
        position = position + params["bias"]
    tables = ("r", "u", "v_bias", "q_positions", "k_positions")
    dense_params = {name: value for name, value in params.items() if name not in tables}
    want = dense_attention(q + u[:, None, :], k, v, **dict(dense_params, bias=position, scale=scale))
    got = attend(q, k, v, **params)
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)


def causal_independence(attend, q, k, v, params, seed=0, rtol=1e-10):
    """Outputs at query i do not depend on keys or values after its causal bound ``i + Nk - Nq``.

    Dense attention's property (refattn.dense.properties.causal_independence):
    every key/value after a random cut is replaced by noise, and rows whose
    bound lies before the cut must not change. The position term does not
    break it, since it reads only r and the positions. Needs ``causal=True``.
    """
    dense_properties.causal_independence(attend, q, k, v, params, seed=seed, rtol=rtol)


def gqa_equals_repeated_heads(attend, q, k, v, params, rtol=1e-10):
    """Grouped-query attention equals multi-head attention with each kv head repeated for its group;
    ``r``, ``u`` and ``v_bias`` belong to query heads and are unchanged."""
    dense_properties.gqa_equals_repeated_heads(attend, q, k, v, params, rtol=rtol)


ALL = (position_shift_invariance, equals_rel_shift_form, causal_independence, gqa_equals_repeated_heads)
