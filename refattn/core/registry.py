"""The mechanism registry: how the conformance suite, the CLI and the verifier
find mechanisms without importing them by name.

Each mechanism package registers one :class:`Mechanism` when imported
(``refattn/__init__.py`` imports them all). Backends are modules named
``refattn.<package>.<backend>`` imported on first use, so that importing
refattn never compiles a Numba kernel or needs CuPy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from .errors import SpecError


@dataclass(frozen=True)
class Mechanism:
    """One attention mechanism's contract (DESIGN.md, "The mechanism contract").

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"dense"``.
    package : str
        Module path of its folder, e.g. ``"refattn.dense"``.
    forward : callable
        ``forward(q, k, v, *, ..., backend="reference") -> Result``.
    vjp : callable
        ``vjp(dout, q, k, v, *, dlse=None, ..., backend="reference") -> Grads``.
    backends : tuple of str
        Backends this mechanism has, ``"reference"`` first.
    cases : callable
        ``cases() -> list[Case]``, its conformance cases.
    properties : str
        Module path of its invariants (``properties.py``).
    spec : str
        Its spec page, relative to the repository root.
    implied_output : callable, optional
        ``implied_output(arguments, aux) -> Result or None``: the output that an
        implementation's own discrete intermediates (``aux``, e.g. LSH buckets)
        imply, by a formula independent of how they were computed. When those
        intermediates differ from a case's, the verifier compares the
        implementation's output with this, telling a wrong decision (hashing,
        routing) apart from wrong attention given the decision.
    """

    name: str
    package: str
    forward: Callable
    vjp: Callable
    backends: tuple[str, ...]
    cases: Callable
    properties: str
    spec: str
    implied_output: Callable | None = None


_MECHANISMS: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    if mechanism.name in _MECHANISMS and _MECHANISMS[mechanism.name] is not mechanism:
        raise RuntimeError(f"mechanism {mechanism.name!r} registered twice")
    _MECHANISMS[mechanism.name] = mechanism
    return mechanism


def names() -> list[str]:
    """Registered mechanism names, sorted."""
    return sorted(_MECHANISMS)


def get(name: str) -> Mechanism:
    if name not in _MECHANISMS:
        raise SpecError("mechanism", f"one of {names()}", repr(name))
    return _MECHANISMS[name]


def backend(name: str, backend_name: str) -> ModuleType:
    """The module implementing mechanism ``name`` on backend ``backend_name``."""
    mechanism = get(name)
    if backend_name not in mechanism.backends:
        raise SpecError("backend", f"one of {list(mechanism.backends)} for {name}", repr(backend_name))
    return importlib.import_module(f"{mechanism.package}.{backend_name}")
