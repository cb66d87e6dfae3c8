"""Return types shared by every mechanism."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Result:
    """What a mechanism's forward returns.

    Attributes
    ----------
    out : ndarray, (B, H, Nq, Dv), float64
        The attention output.
    lse : ndarray, (B, H, Nq), float64, or None
        Natural-log log-sum-exp of the final masked, scaled logits of each
        query row; ``-inf`` on a fully masked row. ``None`` only for
        mechanisms that define none.
    aux : dict[str, ndarray]
        Named intermediates (bucket ids, permutations, per-round outputs...).
    """

    out: np.ndarray
    lse: np.ndarray | None
    aux: dict = field(default_factory=dict)


class Grads(dict):
    """Gradients of every differentiable input, keyed by the input's name.

    A ``dict`` (``grads["q"]``) that also reads as attributes (``grads.q``).
    An input that was not given (``bias=None``) has no entry.
    """

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Cotangents:
    """The cotangents a backend's VJP receives, checked against the output shapes.

    Attributes
    ----------
    dout : ndarray
        Cotangent of ``out``, float, the shape of ``out``.
    dlse : ndarray or None
        Cotangent of ``lse``; None means 0.
    """

    dout: np.ndarray
    dlse: np.ndarray | None = None
