"""xPos attention on CPU: RoPE's Numba rotation kernel with the scales folded in, then the tiled dense kernels.

The same function as :mod:`refattn.position.xpos.reference`, over the same
checked inputs. Scaling pair ``t`` after rotating it is the same as
rotating it with ``cos θ`` and ``sin θ`` both multiplied by the pair's factor
``ζ_t^(±n / scale_base)`` (torchscale folds them the same way), so one call
of :func:`refattn.position.rope.numba.rotate_pairs` does (R3) and (X3). The
tables (N, r/2) are computed in float64 and rounded once to the compute
dtype; steps (1)-(7) are :mod:`refattn.dense.numba`'s, O(N) memory.

The VJP runs dense's VJP on the transformed q and k and applies the
transposed transform ``(S R)ᵀ = Rᵀ S = S R(−θ)`` (a per-pair factor commutes
with the pair's rotation): the same kernel with the sines negated.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from ..rope.numba import rotate, transformed_forward, transformed_vjp
from ..rope.reference import angles
from .reference import XposInputs, scales


def forward(x: XposInputs) -> Result:
    """``out`` and ``lse`` in the compute dtype (float32 for float32, float16 and bfloat16 ``q``,
    float64 otherwise)."""
    return transformed_forward(x, _transformed_queries_and_keys)


def vjp(x: XposInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """``q``, ``k``, ``v`` and (with a bias) ``bias``, in the compute dtype."""
    return transformed_vjp(x, cotangents, saved, _transformed_queries_and_keys)


def _transformed_queries_and_keys(x: XposInputs, *, transpose: bool, q, k) -> tuple[np.ndarray, np.ndarray]:
    """``q`` upscaled and rotated at the query positions, ``k`` downscaled and rotated at the
    key positions, in the compute dtype; by the transposed transforms when ``transpose``."""
    dtype = compute_dtype(x.dense.q)
    rope = x.xpos.rope
    transformed = []
    for vectors, positions, downscale in ((q, x.q_positions, False), (k, x.k_positions, True)):
        theta = angles(positions, rope)  # (N, r/2), float64
        factors = scales(positions, x.xpos, downscale)  # (N, r/2), float64
        sin = factors * (-np.sin(theta) if transpose else np.sin(theta))
        transformed.append(rotate(vectors, factors * np.cos(theta), sin, rope.rotary_dim, rope.layout, dtype))
    return transformed[0], transformed[1]
