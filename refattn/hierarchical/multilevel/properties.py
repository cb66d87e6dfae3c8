"""Invariants of multi-level attention (spec/hierarchical.md), reusable on any implementation.

``attend(x, **params) -> Result`` is the implementation under test.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require

#: Parameters with one entry per level (their first axis).
PER_LEVEL = ("segments", "wq", "wk", "wv", "pool_w", "pool_b", "context", "pool_weights")


def single_elements_pass_through(attend, x, params, rtol=1e-12):
    """One element per unit at every level, attention pooling: each level is x ↦ x W_v, G the identity."""
    require(np.all(np.diff(params["segments"], axis=1) == 1), "units of one token at every level")
    require(params.get("aggregate") == "attention_pool", "aggregate='attention_pool'")
    got = attend(x, **{**params, "output": "per_unit"})
    want = x
    for wv in params["wv"]:
        want = want @ wv
    close("out", got.out, want, rtol)


def one_token_units_reduce(attend, x, params, rtol=1e-12):
    """Level-0 units of one token: the hierarchy from level 1 up is the same on the inputs x W_v⁰."""
    segments = params["segments"]
    require(np.all(np.diff(segments[0]) == 1) and segments.shape[0] > 1, "level-0 units of one token, two levels or more")
    require(params.get("aggregate") in ("attention_pool", "mean", "max", "first"), "a G that is the identity on one element")
    require(params.get("output", "per_token") == "per_unit", "output='per_unit'")
    lower = {name: value[1:] if name in PER_LEVEL else value for name, value in params.items()}
    got = attend(x, **params)
    want = attend(x @ params["wv"][0], **lower)
    close("out", got.out, want.out, rtol)
