"""Invariants of sliding-window attention (spec/segmented.md, "Sliding windows"), reusable on any implementation.

``attend(q, k, v, **params)`` returns an object with ``.out`` and ``.lse``.
"""

from __future__ import annotations

from ...core.invariants import close
from .reference import window_of


def is_dense_with_the_exact_window(attend, dense, q, k, v, params, rtol=1e-10):
    """A library's window ``W`` is dense attention with the window :func:`window_of` maps it to."""
    window, causal = window_of(params["convention"], params["window_size"])
    got, want = attend(q, k, v, **params), dense(q, k, v, window=window, causal=causal)
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)
