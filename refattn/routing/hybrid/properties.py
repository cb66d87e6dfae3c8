"""Invariants of hybrid layers (spec/routing.md, "Hybrid layers"), reusable on any implementation.

``attend(q, k, v, **params)`` returns an object with ``.out`` (B, H, N, Dv).
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require
from ...core.presets import FROM_PRESET
from ...dense import dense_attention
from ..presets import resolve


def _layout(params: dict, heads: int) -> tuple[slice, bool]:
    """The local heads' slice and whether they are causal, the preset resolved as the layer resolves it."""
    p = resolve(params.get("preset"), local_causal=params.get("local_causal", FROM_PRESET),
                head_order=params.get("head_order", FROM_PRESET))  # fmt: skip
    local = params["num_local_heads"]
    heads_slice = slice(0, local) if p["head_order"] == "local_first" else slice(heads - local, heads)
    causal = params.get("causal", False) if p["local_causal"] is None else p["local_causal"]
    return heads_slice, causal


def local_heads_are_dense_attention(attend, q, k, v, params, rtol=1e-10):
    """The local heads' outputs are dense attention with ``local_window`` on their slice of q, k, v.

    Needs no key padding (the local heads mask padded keys too).
    """
    require(params.get("num_local_heads", 0) > 0, "at least one local head")
    require(params.get("key_padding_mask") is None, "no key padding")
    heads, causal = _layout(params, q.shape[1])
    want = dense_attention(q[:, heads], k[:, heads], v[:, heads], causal=causal, window=params.get("local_window"))
    close("local heads", np.asarray(attend(q, k, v, **params).out)[:, heads], want.out, rtol)


def routing_heads_ignore_local_options(attend, q, k, v, params, rtol=1e-10):
    """Changing the local heads' window leaves the routing heads' outputs unchanged."""
    require(params.get("num_local_heads", 0) > 0, "at least one local head")
    local, _ = _layout(params, q.shape[1])
    routing = np.ones(q.shape[1], bool)
    routing[local] = False
    base = np.asarray(attend(q, k, v, **params).out)[:, routing]
    other = np.asarray(attend(q, k, v, **{**params, "local_window": (0, 0)}).out)[:, routing]
    close("routing heads", other, base, rtol)

