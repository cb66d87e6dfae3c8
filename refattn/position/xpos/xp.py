"""xPos attention over an array namespace ``xp`` (NumPy or CuPy): (R1)-(R3) and (X1)-(X3) on the device,
then dense attention's tiled algorithm (spec/position.md).

Scaling pair ``t`` after rotating it is rotating it with ``cos θ`` and ``sin θ`` both multiplied by the
pair's factor ``ζ_t^(±n / scale_base)``, so RoPE's device rotation (refattn/position/rope/xp.py) does both
at once. The tables (N, r/2) are formed on the host in float64 by the reference's (R2) and (X2), rounded
once to the compute dtype and moved. The VJP applies the transposed transform ``(S R)ᵀ = S R(−θ)``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from ..rope import xp as rope_xp
from ..rope.reference import angles
from .reference import XposInputs, scales

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


def _tables(x: XposInputs, positions, downscale: bool, xp):
    """(R2), (X2) ``ζ^(±n / scale_base) cos θ`` and ``ζ^(±n / scale_base) sin θ``, (N, r/2) each, on the device."""
    dtype = compute_dtype(x.dense.q.dtype)
    theta = angles(positions, x.xpos.rope)  # (N, r/2), float64
    factors = scales(positions, x.xpos, downscale)  # (N, r/2), float64
    return xp.asarray(factors * np.cos(theta), dtype=dtype), xp.asarray(factors * np.sin(theta), dtype=dtype)


def _transformed(x: XposInputs, xp):
    """The dense inputs with ``q~ = S R q`` (upscaled) and ``k~ = S R k`` (downscaled), and the tables."""
    q_tables, k_tables = _tables(x, x.q_positions, False, xp), _tables(x, x.k_positions, True, xp)
    # (R3), (X3) in one rotation; rope's rotation reads only ``.rope`` (rotary_dim, layout) of its inputs.
    q = rope_xp.rotate(x.dense.q, *q_tables, x.xpos, xp)
    k = rope_xp.rotate(x.dense.k, *k_tables, x.xpos, xp)
    return replace(x.dense, q=q, k=k), q_tables, k_tables


def forward(x: XposInputs, xp) -> Result:
    dense, _, _ = _transformed(x, xp)
    out, lse = dense_xp.attend(dense, xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={})


def vjp(x: XposInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    dense, (q_cos, q_sin), (k_cos, k_sin) = _transformed(x, xp)
    grads = dense_xp.attend_vjp(dense, cotangents, xp, (BLOCK_Q, BLOCK_K), saved)
    # (X3'), (R3') dq = Rᵀ S dq~ = S R(−θ) dq~, likewise dk with the keys' tables.
    grads["q"] = rope_xp.rotate(grads["q"], q_cos, -q_sin, x.xpos, xp)
    grads["k"] = rope_xp.rotate(grads["k"], k_cos, -k_sin, x.xpos, xp)
    return grads
