"""xPos attention over an array namespace ``xp`` (NumPy or CuPy): (R1)-(R3) and (X1)-(X3) on the device,
then dense attention's tiled algorithm (spec/position.md).

Scaling pair ``t`` after rotating it is rotating it with ``cos θ`` and ``sin θ`` both multiplied by the
pair's factor ``ζ_t^(±n / scale_base)``, so RoPE's device rotation (refattn/position/rope/xp.py) does both
at once. The tables (N, r/2) are formed on the host in float64 by the reference's (R2) and (X2), rounded
once to the compute dtype and moved. The VJP applies the transposed transform ``(S R)ᵀ = S R(−θ)``.
"""

from __future__ import annotations

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


def forward(x: XposInputs, xp) -> Result:
    """(R3), (X3) in one rotation: ``q~ = S R q`` (upscaled), ``k~ = S R k`` (downscaled), then dense attention."""
    return rope_xp.rotated_attention(x.dense, *_both_tables(x, xp), x.xpos, xp, (BLOCK_Q, BLOCK_K))


def vjp(x: XposInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """(X3'), (R3') dq = Rᵀ S dq~ = S R(−θ) dq~, likewise dk with the keys' tables."""
    return rope_xp.rotated_attention_vjp(x.dense, *_both_tables(x, xp), x.xpos, cotangents, xp,
                                         (BLOCK_Q, BLOCK_K), saved)  # fmt: skip


def _both_tables(x: XposInputs, xp):
    """The queries' (upscaled) and the keys' (downscaled) tables; rope's rotation reads only ``.rope``
    (rotary_dim, layout) of ``x.xpos``."""
    return _tables(x, x.q_positions, False, xp), _tables(x, x.k_positions, True, xp)
