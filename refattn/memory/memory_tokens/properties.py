"""Invariants of memory tokens (spec/memory.md, Memory tokens)."""

from ..invariants import state_carries_over  # noqa: F401  (re-exported)
from .reference import STATE  # noqa: F401
