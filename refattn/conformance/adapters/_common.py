"""What the framework adapters share: reading a function's return value."""

from __future__ import annotations


def split_result(value):
    """``(out, lse)`` from ``out``, ``(out, lse)`` or an object with ``.out`` / ``.lse``; lse may be None."""
    if hasattr(value, "out"):
        return value.out, getattr(value, "lse", None)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise TypeError(f"the function returned {len(value)} items; expected out or (out, lse)")
        return value[0], value[1]
    return value, None


def describe(fn, adapter: str) -> tuple[str, str]:
    """``(module, qualname)`` naming the adapted function in reports, e.g. ``from_torch(sdpa)``."""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return getattr(fn, "__module__", None) or "", f"{adapter}({name})"


def named(inputs: tuple[str, ...], sequences: tuple) -> dict:
    """The positional arrays of one call, keyed by the case's input names."""
    if len(sequences) != len(inputs):
        raise TypeError(f"expected {len(inputs)} positional arrays {inputs}, got {len(sequences)}")
    return dict(zip(inputs, sequences))
