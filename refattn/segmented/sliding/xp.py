"""The GPU path of the sliding window: dense attention's tiled algorithm (the window is a dense window)."""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...dense import xp as dense_xp
from ...dense.inputs import DenseInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


def forward(x: DenseInputs, xp) -> Result:
    out, lse = dense_xp.attend(x, xp, (BLOCK_Q, BLOCK_K))
    return Result(out=out, lse=lse, aux={})


def vjp(x: DenseInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    return dense_xp.attend_vjp(x, cotangents, xp, (BLOCK_Q, BLOCK_K), saved)
