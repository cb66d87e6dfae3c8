"""Log-n scaled attention on CPU: ``log n`` folded into q, then the Numba dense kernel.

The backend of :mod:`refattn.dilution.logn.reference` (refattn/core/registry.py):
:func:`forward` and :func:`vjp` over its checked inputs. Steps (L1)-(L2) form
``q' = log n · q`` in the kernel's compute dtype (float32 for float32,
float16 and bfloat16 inputs, float64 otherwise), then
:func:`refattn.dense.numba.forward` runs dense steps (1)-(7) tile by tile:
memory stays O(N).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from ...dense import numba as dense_numba
from ...dense.inputs import DenseInputs
from .reference import LognInputs, row_positions


def forward(x: LognInputs) -> Result:
    """``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype."""
    _, dense = _folded(x)
    return dense_numba.forward(dense)


def vjp(x: LognInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """``q``, ``k``, ``v`` and (when a bias was given) ``bias``, in the compute dtype.

    ``saved``, this backend's forward of the same inputs, is the dense kernel's forward on ``q'``.
    """
    factor, dense = _folded(x)
    grads = dense_numba.vjp(dense, cotangents, saved)
    # (L2') dq = log n · dq'.
    grads["q"] = factor * grads["q"]
    return grads


def _folded(x: LognInputs) -> tuple[np.floating | np.ndarray, DenseInputs]:
    """Steps (L1)-(L2): ``log n`` (per row, (Nq, 1), with ``training_length``) and the dense inputs with
    ``q' = log n · q`` (B, Hq, Nq, D), in the compute dtype."""
    dtype = compute_dtype(x.dense.q)
    factor = np.log(dtype.type(x.n))  # (L1)
    if x.training_length is not None:  # (L1) Qwen: log(p_i + 1) / log L beyond L, else 1
        count = row_positions(x.dense.shape.q_len, x.dense.shape.kv_len) + 1
        ratio = np.log(count.astype(dtype)) / np.log(dtype.type(x.training_length))
        factor = np.where(count > x.training_length, ratio, dtype.type(1)).astype(dtype)[:, None]  # (Nq, 1)
    return factor, replace(x.dense, q=factor * np.asarray(x.dense.q, dtype=dtype))  # (L2)
