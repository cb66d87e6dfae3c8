"""Invariants of soft routing (spec/routing.md, "Invariants"), reusable on any implementation.

A property takes ``attend(q, k, v, **params)``, a soft-routing implementation
(the "soft_routing" mechanism's signature) returning an object with ``.out``,
and a problem; it raises ``AssertionError`` describing the violation, or
``ValueError`` (refattn.core.invariants.require) for a problem it does not apply to.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require
from ...dense.reference import dense_attention


def one_hot_routing_selects_a_path(attend, q, k, v, params, path: int, rtol=1e-12):
    """Soft routing whose probabilities are one-hot on ``path`` returns that path's output.

    The property routes with ``x = 1`` and a ``W_r`` whose column ``path``
    gives every token a logit 1000 above the others: ``exp(-1000)`` is 0 in
    floating point, so the probabilities are exactly one-hot.
    """
    features, paths = params["routing_weights"].shape
    require(0 <= path < paths, f"a path in [0, {paths - 1}]")
    weights = np.zeros((features, paths))
    weights[:, path] = 1000.0 / features
    x = np.ones(params["x"].shape)
    result = attend(q, k, v, **dict(params, x=x, routing_weights=weights))
    window = params["path_window"][path]
    chosen = dense_attention(q, k, v, causal=params["path_causal"][path], window=None if window is None else tuple(window),
                             scale=params.get("scale"))  # fmt: skip
    close("out", result.out, chosen.out, rtol)


ALL = (one_hot_routing_selects_a_path,)
