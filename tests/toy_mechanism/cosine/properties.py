"""Invariants of cosine attention, reusable on any implementation."""

from refattn.core.invariants import close


def scale_invariance(attend, q, k, v, params, factor=7.5, rtol=1e-10):
    """Rescaling a query or key vector changes nothing: only directions enter the logits."""
    close("out", attend(factor * q, k / factor, v, **params).out, attend(q, k, v, **params).out, rtol)
