"""Transformer-XL segment recurrence on the Numba kernels: each step is the tiled dense (or
Transformer-XL relative) kernel over ``memory + segment`` keys, so memory is O(segment + memory)
whatever the stream's length. Steps (X1)-(X4) are the reference's (reference.py)."""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from .reference import XLRecurrenceInputs, stream, stream_vjp

BACKEND = "numba"


def forward(x: XLRecurrenceInputs) -> Result:
    return stream(x, None, BACKEND)


def vjp(x: XLRecurrenceInputs, cotangents: Cotangents, saved=None) -> Grads:
    return stream_vjp(x, cotangents, None, BACKEND)
