"""Memory tokens on the Numba kernels: each step is the tiled RoPE kernel over the wrapped
segment of 2m + L tokens, so memory is O(segment + memory tokens). Steps (T1)-(T5) are the reference's."""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from .reference import MemoryTokenInputs, stream, stream_vjp

BACKEND = "numba"


def forward(x: MemoryTokenInputs) -> Result:
    return stream(x, None, BACKEND)


def vjp(x: MemoryTokenInputs, cotangents: Cotangents, saved=None) -> Grads:
    return stream_vjp(x, cotangents, None, BACKEND)
