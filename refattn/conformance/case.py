"""The conformance case type. Imports nothing of refattn, so that every
mechanism's ``cases.py`` can use it without depending on the rest of
``refattn.conformance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Case:
    """One named, deterministic conformance case.

    Attributes
    ----------
    id : str
        Unique, stable, ``"<mechanism>/<name>"``; also the file stem.
    mechanism : str
        Registry name of the mechanism.
    description : str
        One sentence: what the case exercises.
    flags : tuple of str
        Bug classes the case is built to catch (described in
        ``refattn/conformance/flags.py``).
    seed : int
        Seed of ``numpy.random.default_rng`` handed to ``arrays``; the
        cotangents are drawn from the same generator afterwards.
    arrays : callable
        ``arrays(rng) -> dict[str, ndarray]``: every array argument of the
        forward (``q``, ``k``, ``v``, ``bias``, ``mask``, ...).
    params : dict
        JSON-serialisable keyword arguments (``causal``, ``window``, ...).
    differentiable : tuple of str
        Array arguments that get gradients (stored as ``input.*``); the
        other arrays are ``param.*``.
    preset : str or None
        Compatibility preset, for mechanisms that have them.
    grad : bool
        Whether the case stores gradients.
    """

    id: str
    mechanism: str
    description: str
    flags: tuple[str, ...]
    seed: int
    arrays: Callable[[np.random.Generator], dict]
    params: dict = field(default_factory=dict)
    differentiable: tuple[str, ...] = ("q", "k", "v")
    preset: str | None = None
    grad: bool = True
