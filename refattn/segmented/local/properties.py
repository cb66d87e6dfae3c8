"""Invariants of local attention (spec/segmented.md, "local-attention"), reusable on any implementation.

``attend(q, k, v, **params)`` returns an object with ``.out`` (B, H, N, Dv) and ``.lse`` (B, H, N).
"""

from __future__ import annotations

from ...core.invariants import close, require


def covering_window_is_dense(attend, dense, q, k, v, params, rtol=1e-10):
    """Look-around covering every block (and no shared-QK self score, no rotary): dense attention, causal or not."""
    require(not params.get("shared_qk") and not params.get("rotary"), "no shared_qk and no rotary")
    blocks = -(-q.shape[2] // params["window_size"])
    causal = bool(params.get("causal", False))
    wide = {**params, "look_backward": blocks, "look_forward": 0 if causal else blocks, "exact_windowsize": False}
    got, want = attend(q, k, v, **wide), dense(q, k, v, causal=causal)
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)
