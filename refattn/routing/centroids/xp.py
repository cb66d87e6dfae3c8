"""One centroid update over an array namespace ``xp`` (NumPy or CuPy), as refattn/routing/centroids/numba.py
computes it (spec/routing.md, "Centroid updates", (E1)-(E5) and (L1)-(L4)). Forward only, as the reference.

Einsum letters: b batch, h head, t routing vector (the queries', then with separate keys the keys'), k
centroid, d feature.
"""

from __future__ import annotations

from ...core.errors import SpecError
from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype, scatter_add
from .reference import CentroidEMAInputs

BLOCK_Q = BLOCK_K = 0  # no tiles: every array is (B, H, 2N, D) or smaller


def _routing_vectors(x: CentroidEMAInputs, xp, dtype):
    """Step (2): the queries' (prescaled) then, unless shared, the keys' routing vectors, (B, H, V·N, D)."""
    q = x.query_prescale * xp.asarray(x.q, dtype=dtype)
    raw = q if x.shared_qk else xp.concatenate([q, xp.asarray(x.k, dtype=dtype)], axis=2)
    if x.routing_norm == "layer":  # layer norm without scale or bias
        centred = raw - raw.mean(axis=-1, keepdims=True)
        return centred / xp.sqrt((centred * centred).mean(axis=-1, keepdims=True) + x.norm_eps)
    return raw / xp.maximum(xp.sqrt((raw * raw).sum(axis=-1, keepdims=True)), x.norm_eps)


def forward(x: CentroidEMAInputs, xp) -> Result:
    """One update: ``out`` the updated centroids (H, K, D), ``lse`` None, ``aux["assignment"]`` (B, H, V·N)."""
    dtype = compute_dtype(x.q.dtype)
    centroids = xp.asarray(x.centroids, dtype=dtype)  # (H, K, D)
    heads, clusters, _ = centroids.shape
    vectors = _routing_vectors(x, xp, dtype)  # (B, H, T, D)
    batch, _, tokens, _ = vectors.shape
    calls = tokens // x.q.shape[2]
    # (E1)/(L1) The nearest centroid; argmax takes the first maximum (ties to the lower index).
    assignment = xp.einsum("bhtd,hkd->bhtk", vectors, centroids).argmax(axis=-1)  # (B, H, T)
    real = xp.ones((batch, tokens), dtype=bool) if x.key_padding_mask is None else \
        xp.tile(xp.asarray(x.key_padding_mask), (1, calls))  # (B, T): padded tokens in neither sums nor counts
    weight = xp.broadcast_to(real[:, None, :], assignment.shape).astype(dtype)  # (B, H, T)
    one_hot = (assignment[..., None] == xp.arange(clusters)) * weight[..., None]  # (B, H, T, K)
    # (E2)/(L2) Per centroid: the sum of its real vectors and their count.
    totals = xp.einsum("bhtk,bhtd->hkd", one_hot, vectors)  # (H, K, D)
    counts = one_hot.sum(axis=(0, 2))  # (H, K)
    if x.centroid_update == "vq_ema":
        if x.count_rule == "google_research":
            counts = _google_research_counts(assignment, weight, calls, clusters, xp, dtype)
        new = _vq_update(x, counts, totals, xp, dtype)
    else:
        new = _normalized_mean_update(x, centroids, counts, totals, xp)
    return Result(out=new, lse=None, aux={"assignment": assignment.astype(xp.int64)})


def _google_research_counts(assignment, weight, calls: int, clusters: int, xp, dtype):
    """(E2) ``online_kmeans``'s count, once per call: row ``(b·H + h)·N + n`` of a call is credited to head
    ``((b·H + h)·N + n) mod H`` (its one-hot reshaped to (-1, H, K) without a transpose)."""
    batch, heads, tokens = assignment.shape
    length = tokens // calls
    b, h, n = xp.meshgrid(xp.arange(batch), xp.arange(heads), xp.arange(tokens), indexing="ij")
    credited = ((b * heads + h) * length + n % length) % heads  # (B, H, T)
    counts = xp.zeros((heads, clusters), dtype=dtype)
    scatter_add(xp, counts, (credited.ravel(), assignment.ravel()), weight.ravel())
    return counts


def _vq_update(x: CentroidEMAInputs, counts, totals, xp, dtype):
    """(E3)-(E5) Moving averages of counts and sums, the counts Laplace smoothed, their ratio."""
    decay, eps = x.decay, x.ema_eps
    averaged = decay * xp.asarray(x.ema_counts, dtype=dtype) + (1.0 - decay) * counts  # (E3) (H, K)
    n = averaged.sum(axis=-1, keepdims=True)
    smoothed = (averaged + eps) / (n + counts.shape[-1] * eps) * n  # (E4)
    sums = decay * xp.asarray(x.ema_sums, dtype=dtype) + (1.0 - decay) * totals  # (H, K, D)
    return sums / smoothed[..., None]  # (E5)


def _normalized_mean_update(x: CentroidEMAInputs, centroids, counts, totals, xp):
    """(L3) Each centroid's sum L2-normalised, the centroid itself where it has no vector; (L4) the EMA."""
    norms = xp.maximum(xp.sqrt((totals * totals).sum(axis=-1, keepdims=True)), x.ema_eps)
    mean = xp.where(counts[..., None] > 0, totals / norms, centroids)
    return x.decay * centroids + (1.0 - x.decay) * mean


def vjp(x: CentroidEMAInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """The update has no VJP, as in the reference."""
    raise SpecError("centroid_ema", "a forward-only use (the update runs outside autograd in both implementations)",
                    "a request for its gradients")  # fmt: skip
