"""Attention sinks on the Numba kernels: each step is the tiled RoPE kernel over ``cache + segment``
keys, so memory is O(segment + sink_count + recent_size). Steps (S1)-(S4) are the reference's."""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from .reference import SinkInputs, stream, stream_vjp

BACKEND = "numba"


def forward(x: SinkInputs) -> Result:
    return stream(x, None, BACKEND)


def vjp(x: SinkInputs, cotangents: Cotangents, saved=None) -> Grads:
    return stream_vjp(x, cotangents, None, BACKEND)
