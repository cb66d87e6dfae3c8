"""Differential attention on CPU: two calls of the Numba dense kernel, combined in NumPy.

The backend of :mod:`refattn.dilution.differential.reference`
(refattn/core/registry.py): :func:`forward` and :func:`vjp` over its checked
inputs. Each of the two maps is one call of :func:`refattn.dense.numba.forward`
(tiled, O(N) memory: no (Nq, Nk) array exists); λ, the difference and the
RMS norm, steps (D2) and (D4)-(D7), are the reference's own functions
evaluated in the compute dtype, and the VJP runs the dense kernel's VJP on
each map.

Precision: float64 inputs run in float64; float32, float16 and bfloat16 ``q``
run in float32, as the dense kernel does, and every result is returned in
that compute dtype.
"""

from __future__ import annotations

import numpy as np

from ...core.precision import FLOAT64, Numerics, numerics
from ...core.results import Cotangents, Grads, Result
from ...dense import numba as dense_numba
from .reference import DifferentialInputs, forward_steps, vjp_steps


def forward(x: DifferentialInputs) -> Result:
    """``out`` (B, H, Nq, 2D) and ``aux["map_lse"]`` (B, 2H, Nq) in the compute dtype; ``lse`` None."""
    f = forward_steps(x, _compute_numerics(x.q), dense_numba.forward)
    return Result(out=f["out"], lse=None, aux={"map_lse": f["map_lse"]})


def vjp(x: DifferentialInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """``q``, ``k``, ``v``, the four λ vectors, and ``norm_weight`` and ``bias`` when given, in the compute dtype.

    ``saved`` is not used: (D4')-(D5') need each map's output, which the forward does not return.
    """
    num = _compute_numerics(x.q)
    f = forward_steps(x, num, dense_numba.forward)
    return vjp_steps(x, num, f, num.load(cotangents.dout), dense_numba.vjp)


def _compute_numerics(q) -> Numerics:
    """Plain float64 for float64 (and integer) ``q``; plain float32 otherwise, as the dense kernel computes."""
    return FLOAT64 if q.dtype == np.float64 or q.dtype.kind in "iu" else numerics("float32")
