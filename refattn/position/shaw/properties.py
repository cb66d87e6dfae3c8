"""Invariants of Shaw relative position representations (spec/position.md, "Shaw"), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)``, a function returning an
object with ``.out`` (B, Hq, Nq, Dv) and ``.lse`` (B, Hq, Nq) -- a refattn
:class:`~refattn.core.results.Result`, or your kernel wrapped to look like
one -- and a problem: q, k, v and ``params``, the keyword arguments of
:func:`refattn.position.shaw.shaw_attention` (``rel_k``, ``rel_v``,
``q_positions``, ``k_positions``, ``max_relative_position`` and any dense
option). It raises ``AssertionError`` describing the violation, or returns
None. ``rtol`` is a normwise relative tolerance: 1e-10 suits float64
implementations.

Properties that compare with dense attention use refattn's dense reference
(:func:`refattn.dense.reference.dense_attention`) as the yardstick.
Properties that need a particular kind of problem say so and raise
``ValueError`` when given another, so a test filters its problems rather
than passing vacuously.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require
from ...dense.properties import causal_independence, gqa_equals_repeated_heads
from ...dense.reference import dense_attention

#: Keyword arguments of the encoding; everything else in ``params`` is a dense option.
ENCODING_PARAMS = ("rel_k", "rel_v", "q_positions", "k_positions", "max_relative_position")


def _dense_params(params: dict) -> dict:
    return {name: value for name, value in params.items() if name not in ENCODING_PARAMS}


def position_shift_invariance(attend, q, k, v, params, shift=1009, rtol=1e-10):
    """Adding the same integer to every query and key position changes nothing:
    the encoding sees only the differences ``k_positions[j] - q_positions[i]``."""
    moved = dict(params, q_positions=params["q_positions"] + shift, k_positions=params["k_positions"] + shift)
    base, shifted = attend(q, k, v, **params), attend(q, k, v, **moved)
    close("out", shifted.out, base.out, rtol)
    close("lse", shifted.lse, base.lse, rtol)


def zero_tables_equal_dense(attend, q, k, v, params, rtol=1e-10):
    """With ``rel_k = rel_v = 0`` the encoding vanishes: the result is dense attention's, exactly."""
    zeroed = dict(params, rel_k=np.zeros_like(params["rel_k"]), rel_v=np.zeros_like(params["rel_v"]))
    shaw, dense = attend(q, k, v, **zeroed), dense_attention(q, k, v, **_dense_params(params))
    close("out", shaw.out, dense.out, rtol)
    close("lse", shaw.lse, dense.lse, rtol)


def zero_distance_adds_a_row_constant(attend, q, k, v, params, rtol=1e-10):
    """With ``K = 0`` every pair reads row 0: the key term adds the constant
    ``scale · q_i · rel_k[0]`` to row ``i``'s logits, which the softmax ignores,
    and the value term adds ``rel_v[0]`` to every output that has a key.

    So ``out = dense out + rel_v[0]`` and ``lse = dense lse + scale · q_i · rel_k[0]``.
    Needs ``max_relative_position = 0``, no soft-cap (it bends the constant)
    and no dropout (the kept weights need not sum to 1).
    """
    require(params["max_relative_position"] == 0, "max_relative_position = 0")
    require(not params.get("softcap") and params.get("dropout_keep") is None, "no soft-cap and no dropout")
    shaw, dense = attend(q, k, v, **params), dense_attention(q, k, v, **_dense_params(params))
    scale = params.get("scale") or 1 / np.sqrt(q.shape[-1])
    has_key = np.isfinite(dense.lse)
    row_constant = scale * np.einsum("bhqd,d->bhq", q, params["rel_k"][0])
    close("out", shaw.out, dense.out + np.where(has_key[..., None], params["rel_v"][0], 0.0), rtol)
    close("lse", shaw.lse, np.where(has_key, dense.lse + row_constant, -np.inf), rtol)


def key_term_is_a_query_dependent_bias(attend, q, k, v, params, rtol=1e-10):
    """Without the value table, the key term is an additive bias on the scaled scores:
    Shaw attention equals dense attention with ``bias += scale · q_i · rel_k[r_ij]``.

    The bias is formed here from the definition, ``r_ij = clip(k_pos[j] -
    q_pos[i], -K, K) + K``. Needs no soft-cap (the bias would sit after it,
    the key term sits inside it).
    """
    require(not params.get("softcap"), "no soft-cap")
    distance = params["k_positions"][None, :] - params["q_positions"][:, None]  # (Nq, Nk)
    clip = params["max_relative_position"]
    rows = params["rel_k"][np.clip(distance, -clip, clip) + clip]  # (Nq, Nk, D)
    scale = params.get("scale") or 1 / np.sqrt(q.shape[-1])
    dense_params = _dense_params(params)
    position_bias = scale * np.einsum("bhqd,qkd->bhqk", q, rows)  # (B, Hq, Nq, Nk)
    dense_params["bias"] = position_bias + (params["bias"] if params.get("bias") is not None else 0.0)
    shaw = attend(q, k, v, **dict(params, rel_v=np.zeros_like(params["rel_v"])))
    dense = dense_attention(q, k, v, **dense_params)
    close("out", shaw.out, dense.out, rtol)
    close("lse", shaw.lse, dense.lse, rtol)


ALL = (
    position_shift_invariance,
    zero_tables_equal_dense,
    zero_distance_adds_a_row_constant,
    key_term_is_a_query_dependent_bias,
    causal_independence,
    gqa_equals_repeated_heads,
)
