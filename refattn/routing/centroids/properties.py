"""Invariants of the centroid update (spec/routing.md, "Invariants"), reusable on any implementation.

A property takes ``update(q, k, v, **params)``, a centroid-update
implementation (the "centroid_ema" mechanism's signature, ``.out`` the new
centroids), and a problem; it raises ``AssertionError`` describing the violation.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close
from ..presets import preset_value


def ema_decay_one_keeps_centroids(update, q, k, v, params, rtol=1e-14):
    """A centroid update with ``decay = 1`` leaves the centroids where they are.

    For ``"vq_ema"`` the centroids are what the state gives, ``ema_sums /
    smoothed(ema_counts)``: the property hands it the state ``ema_sums =
    centroids · smoothed(ema_counts)`` (counts from ``params`` or ones) that
    gives the centroids it passes.
    """
    centroids = params["centroids"]
    moved = dict(params, decay=1.0)
    if preset_value(params, "centroid_update", q.shape[-1]) == "vq_ema":
        counts = params.get("ema_counts")
        counts = np.ones(centroids.shape[:2]) if counts is None else counts
        eps, n = preset_value(params, "ema_eps", q.shape[-1]), counts.sum(axis=-1, keepdims=True)
        smoothed = (counts + eps) / (n + centroids.shape[1] * eps) * n
        moved.update(ema_counts=counts, ema_sums=centroids * smoothed[..., None])
    close("centroids", update(q, k, v, **moved).out, centroids, rtol)


ALL = (ema_decay_one_keeps_centroids,)
