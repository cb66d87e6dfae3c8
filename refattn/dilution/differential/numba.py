"""Differential attention on CPU: two calls of the Numba dense kernel, combined in NumPy.

The same function as :mod:`refattn.dilution.differential.reference`, with the
same names and parameters (less ``precision`` and ``backend``). Each of the
two maps is one call of :func:`refattn.dense.numba.dense_attention` (tiled,
O(N) memory: no (Nq, Nk) array exists); λ, the difference and the RMS norm,
steps (D2) and (D4)-(D7), are the reference's own functions evaluated in the
compute dtype, and the VJP runs the dense kernel's VJP on each map.

Precision: float64 inputs run in float64; float32, float16 and bfloat16 ``q``
run in float32, as the dense kernel does, and every result is returned in
that compute dtype. Inputs are checked by the reference's checks, so bad
input is rejected identically whichever backend runs.
"""

from __future__ import annotations

import numpy as np

from ...core.precision import FLOAT64, Numerics, numerics
from ...core.results import Grads, Result
from ...dense import numba as dense_numba
from .reference import check_cotangents, check_differential_inputs, forward_steps, vjp_steps


def differential_attention(
    q,
    k,
    v,
    *,
    lambda_q1,
    lambda_k1,
    lambda_q2,
    lambda_k2,
    lambda_init=None,
    depth=None,
    norm_weight=None,
    norm_eps=1e-5,
    apply_norm=True,
    gqa_keys="paired",
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
) -> Result:
    """Differential attention by the dense kernel; see :func:`refattn.dilution.differential.reference.differential_attention`.

    Returns
    -------
    Result
        ``out`` (B, H, Nq, 2D) and ``lse`` (B, 2H, Nq) in the compute dtype.
    """
    x = check_differential_inputs(
        q, k, v, lambda_q1=lambda_q1, lambda_k1=lambda_k1, lambda_q2=lambda_q2, lambda_k2=lambda_k2,
        lambda_init=lambda_init, depth=depth, norm_weight=norm_weight, norm_eps=norm_eps, apply_norm=apply_norm,
        gqa_keys=gqa_keys, mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap,
    )  # fmt: skip
    f = forward_steps(x, _compute_numerics(q), dense_numba.dense_attention)
    return Result(out=f["out"], lse=f["lse"], aux={})


def differential_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    lambda_q1,
    lambda_k1,
    lambda_q2,
    lambda_k2,
    lambda_init=None,
    depth=None,
    norm_weight=None,
    norm_eps=1e-5,
    apply_norm=True,
    gqa_keys="paired",
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
) -> Grads:
    """Gradients of :func:`differential_attention`; see :func:`refattn.dilution.differential.reference.differential_attention_vjp`.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v``, the four λ vectors, and ``norm_weight`` and
        ``bias`` when given, in the compute dtype.
    """
    x = check_differential_inputs(
        q, k, v, lambda_q1=lambda_q1, lambda_k1=lambda_k1, lambda_q2=lambda_q2, lambda_k2=lambda_k2,
        lambda_init=lambda_init, depth=depth, norm_weight=norm_weight, norm_eps=norm_eps, apply_norm=apply_norm,
        gqa_keys=gqa_keys, mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap,
    )  # fmt: skip
    dout, dlse = check_cotangents(x, dout, dlse)
    num = _compute_numerics(q)
    # The maps' outputs are needed by (D4')-(D5'); the dense VJP recomputes its own forward.
    f = forward_steps(x, num, dense_numba.dense_attention)
    return vjp_steps(x, num, f, num.load(dout), dlse, dense_numba.dense_attention_vjp)


def _compute_numerics(q) -> Numerics:
    """Plain float64 for float64 (and integer) ``q``; plain float32 otherwise, as the dense kernel computes."""
    return FLOAT64 if q.dtype == np.float64 or q.dtype.kind in "iu" else numerics("float32")
