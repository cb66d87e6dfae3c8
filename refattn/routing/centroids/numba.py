"""The numba backend of one centroid update (registry name "centroid_ema"; spec/routing.md,
"Centroid updates", (E1)-(E5) and (L1)-(L4)). Forward only, as the reference.

Kernels
-------
``_assign_kernel``, parallel over (batch, head): steps (1)-(2) of routing
attention on each token's query (prescaled) and, unless shared, key, and
(E1)/(L1) each routing vector's nearest centroid (ties to the lower index).
``_accumulate_kernel``, parallel over heads: (E2)/(L2) each centroid's sum
of the real vectors assigned to it, and its count (per head).
``_google_research_counts``: the count of ``count_rule="google_research"``,
where a vector is credited to another head (serial: it writes across heads).
``_vq_update_kernel`` (E3)-(E5) and ``_normalized_mean_update_kernel``
(L3)-(L4): the update itself, per (head, centroid).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...core.errors import SpecError
from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype, read_only
from .reference import CentroidEMAInputs


def forward(x: CentroidEMAInputs) -> Result:
    """One update: ``out`` the updated centroids (H, K, D) in the compute dtype (float32 for
    float32/float16/bfloat16 ``q``, float64 otherwise), ``lse`` None, ``aux["assignment"]``
    (B, H, N or 2N) int64."""
    dtype = compute_dtype(x.q)
    real = dtype.type
    q, k = read_only(x.q, x.q, dtype), read_only(x.k, x.k, dtype)  # (B, H, N, D)
    centroids = read_only(x.centroids, x.centroids, dtype)  # (H, K, D)
    batch, heads, length, dim = q.shape
    calls = 1 if x.shared_qk else 2  # routing vectors per token: the query's, then the key's
    # Steps (1)-(2), (E1)/(L1): routing vectors and their nearest centroids.
    vectors = np.empty((batch, heads, calls * length, dim), dtype)  # (B, H, V·N, D)
    assignment = np.empty((batch, heads, calls * length), np.int64)  # (B, H, V·N)
    _assign_kernel(q, k, real(x.query_prescale), x.routing_norm == "layer", real(x.norm_eps), centroids, calls,
                   vectors, assignment)  # fmt: skip
    mask = np.ones((batch, length), np.bool_) if x.key_padding_mask is None else x.key_padding_mask
    real_tokens = np.ascontiguousarray(np.tile(mask, calls))  # (B, V·N): padded tokens in neither the sums nor counts
    # (E2)/(L2) Per centroid: the sum of its real vectors, and their count.
    totals = np.empty(centroids.shape, dtype)  # (H, K, D)
    counts = np.empty(centroids.shape[:2], dtype)  # (H, K)
    _accumulate_kernel(vectors, assignment, real_tokens, totals, counts)
    new = np.empty(centroids.shape, dtype)  # (H, K, D)
    if x.centroid_update == "vq_ema":
        if x.count_rule == "google_research":
            _google_research_counts(assignment, real_tokens, calls, counts)
        ema_counts = np.ascontiguousarray(x.ema_counts, dtype)  # (H, K)
        ema_sums = np.ascontiguousarray(x.ema_sums, dtype)  # (H, K, D)
        _vq_update_kernel(ema_counts, ema_sums, counts, totals, real(x.decay), real(x.ema_eps), new)
    else:
        _normalized_mean_update_kernel(centroids, counts, totals, real(x.decay), real(x.ema_eps), new)
    return Result(out=new, lse=None, aux={"assignment": assignment})


def vjp(x: CentroidEMAInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """The update has no VJP, as in the reference: both implementations run it outside autograd."""
    raise SpecError("centroid_ema", "a forward-only use (the update runs outside autograd in both implementations)",
                    "a request for its gradients")  # fmt: skip


@njit(cache=True)
def _routing_vector(x, prescale, layer, eps, r):
    """Step (2) on one row ``x`` (D,) into ``r``: layer norm without scale or bias of ``prescale · x``, or
    its L2 normalisation ``prescale · x / max(|prescale · x|, eps)``."""
    for d in range(x.shape[0]):
        r[d] = prescale * x[d]
    if layer:
        r -= r.mean()
        r *= 1.0 / np.sqrt(np.mean(r * r) + eps)
    else:
        r /= max(np.sqrt(np.sum(r * r)), eps)


@njit(cache=True)
def _nearest(r, centroids):
    """(E1)/(L1) The index of the centroid (K, D) most similar to ``r`` (D,); ties to the lower index."""
    best, best_similarity = 0, np.dot(r, centroids[0])
    for c in range(1, centroids.shape[0]):
        similarity = np.dot(r, centroids[c])
        if similarity > best_similarity:
            best, best_similarity = c, similarity
    return best


@njit(parallel=True, cache=True)
def _assign_kernel(q, k, prescale, layer, eps, centroids, calls, vectors, assignment):
    """Routing vectors ``vectors[b, h]`` (V·N, D): the queries' (prescaled), then with ``calls = 2`` the
    keys'; and their nearest centroids ``assignment[b, h]`` (V·N,)."""
    batch, heads, length, _ = q.shape
    one = q.dtype.type(1.0)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        for n in range(length):
            _routing_vector(q[b, h, n], prescale, layer, eps, vectors[b, h, n])
            assignment[b, h, n] = _nearest(vectors[b, h, n], centroids[h])
            if calls == 2:
                _routing_vector(k[b, h, n], one, layer, eps, vectors[b, h, length + n])
                assignment[b, h, length + n] = _nearest(vectors[b, h, length + n], centroids[h])


@njit(parallel=True, cache=True)
def _accumulate_kernel(vectors, assignment, real_tokens, totals, counts):
    """(E2)/(L2) ``totals[h, c]`` (D,): the sum over the batch of head ``h``'s real vectors assigned to
    ``c``; ``counts[h, c]``: how many there are (the ``"per_head"`` count)."""
    batch, heads, tokens, _ = vectors.shape
    for h in prange(heads):
        totals[h] = 0.0
        counts[h] = 0.0
        for b in range(batch):
            for n in range(tokens):
                if real_tokens[b, n]:
                    c = assignment[b, h, n]
                    totals[h, c] += vectors[b, h, n]
                    counts[h, c] += 1.0


@njit(cache=True)
def _google_research_counts(assignment, real_tokens, calls, counts):
    """(E2) The count as ``online_kmeans`` forms it, once per call (the queries, then the keys): the one-hot
    (B, H, N, K) reshaped to (-1, H, K) without a transpose, so row ``(b·H + h)·N + n`` of a call is
    credited to head ``((b·H + h)·N + n) mod H``."""
    batch, heads, tokens = assignment.shape
    length = tokens // calls
    counts[:] = 0.0
    for b in range(batch):
        for h in range(heads):
            for n in range(tokens):
                if real_tokens[b, n]:
                    credited = ((b * heads + h) * length + n % length) % heads
                    counts[credited, assignment[b, h, n]] += 1.0


@njit(parallel=True, cache=True)
def _vq_update_kernel(ema_counts, ema_sums, counts, totals, decay, eps, new):
    """(E3)-(E5) Moving averages of the counts and sums, the counts Laplace smoothed
    ``(c + eps) / (n + K eps) · n`` with ``n`` their sum over the head's centroids, and
    ``new = averaged sum / smoothed count`` (H, K, D)."""
    heads, clusters = counts.shape
    for h in prange(heads):
        # (E3) Exponential moving averages.
        averaged = decay * ema_counts[h] + (1.0 - decay) * counts[h]  # (K,)
        # (E4) Laplace smoothing.
        n = averaged.sum()
        smoothed = (averaged + eps) / (n + clusters * eps) * n
        # (E5) Averaged sums over smoothed counts.
        for c in range(clusters):
            new[h, c] = (decay * ema_sums[h, c] + (1.0 - decay) * totals[h, c]) / smoothed[c]


@njit(parallel=True, cache=True)
def _normalized_mean_update_kernel(centroids, counts, totals, decay, eps, new):
    """(L3) Each centroid's sum L2-normalised (``F.normalize``: over ``max(|sum|, eps)``), the centroid
    itself where it has no vector; (L4) ``new = decay · centroid + (1 - decay) · that`` (H, K, D)."""
    heads, clusters = counts.shape
    for h in prange(heads):
        for c in range(clusters):
            if counts[h, c] > 0:
                mean = totals[h, c] / max(np.sqrt(np.sum(totals[h, c] * totals[h, c])), eps)
            else:
                mean = centroids[h, c]
            new[h, c] = decay * centroids[h, c] + (1.0 - decay) * mean
