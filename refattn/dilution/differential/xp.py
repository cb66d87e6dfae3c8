"""Differential attention over an array namespace ``xp`` (NumPy or CuPy): each of the two maps is dense
attention's tiled algorithm on the device; λ, the difference and the RMS norm, steps (D2) and (D4)-(D7),
are the reference's own functions on the host (spec/dilution.md).

Only the maps' outputs (B, H, Nq, 2D) and log-sum-exps cross to the host, O(N) each; the maps' VJPs run
on the device the same way. Precision: float64 inputs run in float64, float32, float16 and bfloat16 ``q``
in float32 (the dense tiles' compute dtype), and every result is returned in that dtype.
"""

from __future__ import annotations

from ...core.precision import numerics
from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype, to_host
from ...dense import xp as dense_xp
from .reference import DifferentialInputs, forward_steps, vjp_steps

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


def _steps(x: DifferentialInputs, xp):
    """The precision of the host steps, and the maps' forward and VJP on the device, results on the host."""
    num = numerics("float32" if compute_dtype(x.q.dtype).itemsize == 4 else None)

    def attend(map_x) -> Result:
        out, lse = dense_xp.attend(map_x, xp, (BLOCK_Q, BLOCK_K))
        return Result(out=to_host(out), lse=to_host(lse), aux={})

    def attend_vjp(map_x, cotangents: Cotangents) -> Grads:
        return Grads(to_host(dict(dense_xp.attend_vjp(map_x, cotangents, xp, (BLOCK_Q, BLOCK_K)))))

    return num, attend, attend_vjp


def forward(x: DifferentialInputs, xp) -> Result:
    """``out`` (B, H, Nq, 2D) and ``aux["map_lse"]`` (B, 2H, Nq); ``lse`` None."""
    num, attend, _ = _steps(x, xp)
    f = forward_steps(x, num, attend)
    return Result(out=f["out"], lse=None, aux={"map_lse": f["map_lse"]})


def vjp(x: DifferentialInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Every gradient of the reference's VJP; ``saved`` is not used ((D4')-(D5') need each map's output)."""
    num, attend, attend_vjp = _steps(x, xp)
    dout = num.load(to_host(cotangents.dout))  # the host steps take it from the host, wherever it was given
    return vjp_steps(x, num, forward_steps(x, num, attend), dout, attend_vjp)
