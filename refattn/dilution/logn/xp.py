"""Log-n scaled attention over an array namespace ``xp`` (NumPy or CuPy): (L1)-(L2) fold ``log n`` into
the queries, then dense attention's tiled algorithm (spec/dilution.md)."""

from __future__ import annotations

from dataclasses import replace

from ...core.precision import numerics
from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .reference import LognInputs, factor_of

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


def _factor(x: LognInputs, xp):
    """(L1) ``log n`` (or Qwen's per-row factor, (Nq, 1)) on the device, in the compute dtype."""
    return xp.asarray(factor_of(x, numerics(None)), dtype=compute_dtype(x.dense.q.dtype))


def _scaled(x: LognInputs, factor, xp):
    """(L2) The dense inputs with ``q' = log n · q``."""
    return replace(x.dense, q=factor * xp.asarray(x.dense.q, dtype=factor.dtype))


def forward(x: LognInputs, xp) -> Result:
    out, lse = dense_xp.attend(_scaled(x, _factor(x, xp), xp), xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={})


def vjp(x: LognInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    factor = _factor(x, xp)
    grads = dense_xp.attend_vjp(_scaled(x, factor, xp), cotangents, xp, (BLOCK_Q, BLOCK_K), saved)
    grads["q"] = factor * grads["q"]  # (L2') dq = log n · dq'
    return grads
