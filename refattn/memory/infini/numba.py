"""Infini-attention on the Numba kernels: the local attention of each segment is the tiled dense
kernel; the memory's reads and writes are (D, Dv) products per segment, computed in the kernels'
dtype (float32 for float32, float16 and bfloat16 inputs). Memory is O(segment + D·Dv) per head.
Steps (I1)-(I4) are the reference's."""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ..streaming import kernel_numerics
from .reference import InfiniInputs, stream, stream_vjp

BACKEND = "numba"


def forward(x: InfiniInputs) -> Result:
    return stream(x, kernel_numerics(x.q), BACKEND)


def vjp(x: InfiniInputs, cotangents: Cotangents, saved=None) -> Grads:
    return stream_vjp(x, cotangents, kernel_numerics(x.q), BACKEND)
