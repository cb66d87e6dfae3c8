"""Invariants of Longformer attention (spec/segmented.md, "Longformer"), reusable on any implementation.

``attend(q, k, v, **params)`` returns an object with ``.out`` (B, H, N, Dv) and ``.lse`` (B, H, N).
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require


def no_global_tokens_is_the_sliding_window(attend, sliding, q, k, v, params, rtol=1e-10):
    """Without global tokens, Longformer is the sliding window of ``attention_window / 2`` per side."""
    require(params.get("global_tokens") is None or not np.any(params["global_tokens"]), "no global token")
    got = attend(q, k, v, attention_window=params["attention_window"])
    want = sliding(q, k, v, window_size=params["attention_window"], convention="longformer")
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)


def global_rows_are_dense(attend, dense, q, k, v, params, rtol=1e-10):
    """A global row is dense attention of its global query over every global key and value."""
    tokens = params.get("global_tokens")
    require(tokens is not None and np.any(tokens), "at least one global token")
    qg, kg, vg = (params.get(f"{name}_global", x) for name, x in (("q", q), ("k", k), ("v", v)))
    got, want = attend(q, k, v, **params), dense(qg if qg is not None else q, kg if kg is not None else k,
                                                 vg if vg is not None else v)  # fmt: skip
    rows = tokens[:, None, :]
    close("out", np.where(rows[..., None], got.out, 0.0), np.where(rows[..., None], want.out, 0.0), rtol)
    close("lse", np.where(rows, got.lse, 0.0), np.where(rows, want.lse, 0.0), rtol)


def padding_changes_no_real_token(attend, q, k, v, params, rtol=1e-10):
    """The hf preset's padding to a multiple of the window leaves every real token's output as without it."""
    canonical = {name: value for name, value in params.items() if name != "preset"}
    got, want = attend(q, k, v, **canonical, preset="hf"), attend(q, k, v, **canonical)
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)
