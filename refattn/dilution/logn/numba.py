"""Log-n scaled attention on CPU: ``log n`` folded into q, then the Numba dense kernel.

The same function as :mod:`refattn.dilution.logn.reference`, with the same
names and parameters (less ``precision`` and ``backend``). Steps (L1)-(L2)
form ``q' = log n · q`` in the kernel's compute dtype (float32 for float32,
float16 and bfloat16 inputs, float64 otherwise), then
:func:`refattn.dense.numba.dense_attention` runs dense steps (1)-(7) tile by
tile: memory stays O(N).
"""

from __future__ import annotations

import numpy as np

from ...core.results import Grads, Result
from ...dense import numba as dense_numba
from .reference import LognInputs, check_logn_inputs


def logn_attention(
    q,
    k,
    v,
    *,
    n=None,
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    dropout_keep=None,
    dropout_p=0.0,
) -> Result:
    """Log-n scaled attention, tiled; see :func:`refattn.dilution.logn.reference.logn_attention`.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype.
    """
    dense_params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    x = check_logn_inputs(q, k, v, n=n, **dense_params)
    _, q_scaled = _folded(x, q)
    return dense_numba.dense_attention(q_scaled, k, v, **dense_params)


def logn_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    n=None,
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    dropout_keep=None,
    dropout_p=0.0,
) -> Grads:
    """Gradients of :func:`logn_attention`; see :func:`refattn.dilution.logn.reference.logn_attention_vjp`.

    Returns
    -------
    Grads
        ``q``, ``k``, ``v`` and (when a bias was given) ``bias``, in the compute dtype.
    """
    dense_params = dict(
        mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    x = check_logn_inputs(q, k, v, n=n, **dense_params)
    factor, q_scaled = _folded(x, q)
    grads = dense_numba.dense_attention_vjp(dout, q_scaled, k, v, dlse=dlse, **dense_params)
    # (L2') dq = log n · dq'.
    grads["q"] = factor * grads["q"]
    return grads


def _folded(x: LognInputs, q) -> tuple[np.floating, np.ndarray]:
    """Steps (L1)-(L2): ``log n`` and ``q' = log n · q`` (B, Hq, Nq, D), in the compute dtype."""
    dtype = dense_numba._compute_dtype(q)
    factor = np.log(dtype.type(x.n))  # (L1)
    return factor, factor * np.asarray(x.dense.q, dtype=dtype)  # (L2)
