"""Invariants of Linformer (spec/low_rank.md), reusable on any implementation."""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require
from ...dense import dense_attention


def equals_dense_over_projections(attend, q, k, v, params, rtol=1e-12):
    """Linformer is dense attention over ``E K`` and ``F V`` (shared (P, Nk) projections, no mask or slicing)."""
    require(params["e"].ndim == 2 and params["e"].shape[1] == k.shape[2], "shared (P, Nk) projections")
    require(params.get("key_padding_mask") is None, "no key padding mask")
    e, f = params["e"], params["e"] if params.get("f") is None else params["f"]
    want = dense_attention(q, np.einsum("pn,bhnd->bhpd", e, k), np.einsum("pn,bhne->bhpe", f, v), scale=params.get("scale"))
    got = attend(q, k, v, **params)
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)
