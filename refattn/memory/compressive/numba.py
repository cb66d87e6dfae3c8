"""Compressive Transformer on the Numba kernels: each step is the tiled dense kernel over
[compressed memory, memory, segment], so memory is O(segment + both memories). Steps (C1)-(C5) are the reference's."""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from .reference import CompressiveInputs, stream, stream_vjp

BACKEND = "numba"


def forward(x: CompressiveInputs) -> Result:
    return stream(x, None, BACKEND)


def vjp(x: CompressiveInputs, cotangents: Cotangents, saved=None) -> Grads:
    return stream_vjp(x, cotangents, None, BACKEND)
