"""One row of the compatibility gallery (examples/gallery.py), declared by the adapter it runs.

An adapter file in examples/ lists its rows as a module-level
``GALLERY = (Entry(...), ...)`` and explains each of its non-passing cases by
flag in ``EXPLANATIONS = {FLAG: "why, citing the library's own source"}``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One verify() run of an adapter function against the published suite."""

    library: str  # distribution name, for its version
    what: str  # the library function or class verified
    impl: str  # the adapter function's name in its file
    mechanism: str
    dtype: str
    grad: bool
    layout: str = "bhnd"
    vjp: str | None = None  # the adapter's VJP function's name, when it is not impl.vjp
