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


class FrameworkImplementation:
    """A framework's function seen as a NumPy implementation; subclasses add ``__call__`` and ``vjp``.

    Reports name it after the adapter and the function, e.g. ``from_torch(sdpa)``.
    """

    adapter = ""  # the public function that made it, e.g. "from_torch"

    def __init__(self, fn, device, inputs: tuple[str, ...]):
        self.fn = fn
        self.device = device
        self.inputs = inputs
        self.__module__ = getattr(fn, "__module__", None) or ""
        self.__qualname__ = f"{self.adapter}({getattr(fn, '__qualname__', None) or type(fn).__qualname__})"


def named(inputs: tuple[str, ...], sequences: tuple) -> dict:
    """The positional arrays of one call, keyed by the case's input names."""
    if len(sequences) != len(inputs):
        raise TypeError(f"expected {len(inputs)} positional arrays {inputs}, got {len(sequences)}")
    return dict(zip(inputs, sequences))
