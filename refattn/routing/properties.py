"""Invariants of routing attention, centroid updates and soft routing (spec/routing.md,
"Invariants"), reusable on any implementation.

Each routing property takes ``attend(q, k, v, **params)``, a routing-attention
implementation returning an object with ``.out`` (B, H, N, Dv), ``.lse``
(B, H, K, W) and ``.aux`` (``membership``, ``key_membership``, ``counts``)
-- a refattn :class:`~refattn.core.results.Result`, or your kernel wrapped to
look like one -- and a problem: ``q``, ``k``, ``v`` and ``params``, the keyword
arguments of :func:`refattn.routing.routing_attention` (``centroids`` and
``window`` included). Problems should have decisions far from ties
(:func:`refattn.routing.problems.routed_problem`): a property that changes the
inputs checks that the routing it holds fixed did not move, and raises
``ValueError`` if it did. A property raises ``AssertionError`` describing the
violation, or returns None; ``rtol`` is a normwise relative tolerance.

Properties that need a particular kind of problem say so and raise
``ValueError`` when given another, so a test filters its problems rather
than passing vacuously.
"""

from __future__ import annotations

import numpy as np

from ..dense.reference import dense_attention
from .presets import get_preset
from .reference import routing_vectors


def _close(name: str, got, want, rtol: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    same_inf = np.isinf(want) & (got == want)
    finite = ~same_inf
    if np.any(np.isnan(got)) or np.any(np.isinf(got[finite])) or np.any(np.isinf(want[finite])):
        raise AssertionError(f"{name}: infinities or NaN differ")
    err = np.max(np.abs(got[finite] - want[finite]), initial=0.0)
    ref = max(np.max(np.abs(want[finite]), initial=0.0), 1.0)
    if err > rtol * ref:
        raise AssertionError(f"{name}: normwise error {err / ref:.3e} > {rtol:.1e}")


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"this property needs {what}")


def _option(q, params: dict, name: str):
    """A preset parameter as the call resolves it: given, or the preset's; None scales mean 1/sqrt(D)."""
    value = params.get(name, getattr(get_preset(params.get("preset")), name))
    if name in ("scale", "query_prescale") and value is None:
        return 1.0 / np.sqrt(q.shape[-1])
    return value


def _same_routing(base, moved) -> None:
    for name in ("membership", "key_membership"):
        if not np.array_equal(base.aux[name], moved.aux[name]):
            raise ValueError(f"the change moved the routing ({name}); use a problem with larger decision margins")


def one_cluster_is_dense(attend, q, k, v, params, rtol=1e-10):
    """With one centroid whose window is the whole sequence, routing attention is dense
    attention on the vectors it attends with, under the same masks: ``out · (1 + eps)``
    equals the dense output and the slot log-sum-exps are the dense ones of the slots' tokens.

    Needs ``K = 1``, ``window = N``, no memory key/values, no shared-QK, a causal
    mask by position (or slots in position order), and exact masking where
    padding is given (``mask_value=None``).
    """
    n, heads = q.shape[2], q.shape[1]
    _require(params["centroids"].shape[1] == 1 and params["window"] == n, "one centroid and window = N")
    _require(params.get("mem_k") is None and not params.get("shared_qk", False), "no memory and no shared-QK")
    causal = params.get("causal", False)
    _require(not causal or _option(q, params, "causal_by") == "position" or _option(q, params, "order") == "position",
             "a causal mask by position, or slots in position order")  # fmt: skip
    padding = params.get("padding_mask")
    _require(padding is None or _option(q, params, "mask_value") is None, "exact masking with padding")
    result = attend(q, k, v, **params)
    norm, eps = _option(q, params, "routing_norm"), _option(q, params, "norm_eps")
    prescale = _option(q, params, "query_prescale")
    if _option(q, params, "attend_on") == "normalized":
        q = routing_vectors(q, routing_norm=norm, norm_eps=eps, prescale=prescale)
        k = routing_vectors(k, routing_norm=norm, norm_eps=eps)
    mask = None
    if padding is not None:
        mask = np.broadcast_to(padding[:, None, None, :], (q.shape[0], heads, n, n))
        if _option(q, params, "query_padding") != "none":
            mask = mask & padding[:, None, :, None]
    dense = dense_attention(q, k, v, mask=mask, causal=causal, scale=_option(q, params, "scale"))
    _close("out", result.out * (1.0 + _option(q, params, "scatter_eps")), dense.out, rtol)
    tokens = result.aux["membership"][:, :, 0]  # (B, H, N): the token of each slot
    _close("lse", result.lse[:, :, 0], np.take_along_axis(dense.lse, tokens, axis=-1), rtol)


def permutation_equivariance(attend, q, k, v, params, seed=0, rtol=1e-10):
    """Without a causal mask, permuting the tokens permutes the outputs, the counts and
    the unrouted tokens: routing looks at the tokens' content, never at their positions
    (on problems without ties)."""
    _require(not params.get("causal", False), "no causal mask")
    perm = np.random.default_rng(seed).permutation(q.shape[2])
    moved_params = dict(params)
    if params.get("padding_mask") is not None:
        moved_params["padding_mask"] = params["padding_mask"][:, perm]
    base = attend(q, k, v, **params)
    moved = attend(q[:, :, perm], k[:, :, perm], v[:, :, perm], **moved_params)
    # The same tokens (by identity) in every cluster.
    for name in ("membership", "key_membership"):
        if not np.array_equal(np.sort(perm[moved.aux[name]], axis=-1), np.sort(base.aux[name], axis=-1)):
            raise AssertionError(f"{name}: permuting the tokens changed which tokens each cluster holds")
    _close("out", moved.out, base.out[:, :, perm], rtol)
    np.testing.assert_array_equal(moved.aux["counts"], base.aux["counts"][:, :, perm], err_msg="counts")


def convex_combination(attend, q, k, v, params, rtol=1e-10):
    """Each routed token's output times ``(count + eps) / count`` is a mean of its
    clusters' slot outputs, each a convex combination of the values of that cluster's
    key list (and memory values), or 0 for an empty row: it lies, coordinate by
    coordinate and along random directions, within the range of those values (and 0)."""
    result = attend(q, k, v, **params)
    eps = _option(q, params, "scatter_eps")
    membership, key_membership = result.aux["membership"], result.aux["key_membership"]
    counts = result.aux["counts"]
    directions = np.concatenate([np.eye(v.shape[-1]), np.random.default_rng(0).standard_normal((4, v.shape[-1]))])
    scale = max(np.max(np.abs(v)), 1.0)
    for b, h, n in zip(*np.nonzero(counts)):
        clusters = np.nonzero(np.any(membership[b, h] == n, axis=-1))[0]
        candidates = [v[b, h, key_membership[b, h, c]] for c in clusters]
        if params.get("mem_v") is not None:
            candidates += [params["mem_v"][h, c] for c in clusters]
        slots = membership[b, h, clusters] == n  # (clusters, W): where the token sits
        if np.any(np.isneginf(result.lse[b, h, clusters][slots])):
            candidates.append(np.zeros((1, v.shape[-1])))
        projected = np.concatenate(candidates) @ directions.T  # (values, directions)
        mean = result.out[b, h, n] * (counts[b, h, n] + eps) / counts[b, h, n] @ directions.T
        low, high = projected.min(axis=0), projected.max(axis=0)
        if np.any(mean < low - rtol * scale) or np.any(mean > high + rtol * scale):
            raise AssertionError(f"out[{b}, {h}, {n}] is not a convex combination of its clusters' values")


def causal_with_fixed_routing(attend, q, k, v, params, position, seed=0, rtol=1e-13):
    """With a causal mask (by position), the outputs at or before ``position`` do not depend
    on the tokens after it, as long as the routing does not change.

    The routing itself is not causal: balanced top-w selection compares every
    token, so a later token that enters a cluster can push an earlier one out.
    The property therefore moves the later tokens by a small amount that keeps
    every decision (checked). With google-research's mask by slot it fails:
    a query sees keys of later tokens that sit in earlier slots.
    """
    _require(params.get("causal", False), "a causal mask")
    n = q.shape[2]
    _require(0 <= position < n - 1, f"a position in [0, N - 2] = [0, {n - 2}]")
    rng = np.random.default_rng(seed)
    later = np.arange(n) > position

    def nudged(x):
        return x + np.where(later[:, None], 1e-4 * np.std(x) * rng.standard_normal(x.shape), 0.0)

    base = attend(q, k, v, **params)
    moved = attend(nudged(q), k if params.get("shared_qk") else nudged(k), nudged(v), **params)
    _same_routing(base, moved)
    _close(f"out[..., :{position + 1}, :]", moved.out[:, :, : position + 1], base.out[:, :, : position + 1], rtol)


def ema_decay_one_keeps_centroids(update, q, k, v, params, rtol=1e-14):
    """A centroid update with ``decay = 1`` leaves the centroids where they are.

    ``update`` is a centroid-update implementation (the "centroid_ema"
    mechanism's signature, ``.out`` the new centroids). For ``"vq_ema"`` the
    centroids are what the state gives, ``ema_sums / smoothed(ema_counts)``: the
    property hands it the state ``ema_sums = centroids · smoothed(ema_counts)``
    (counts from ``params`` or ones) that gives the centroids it passes.
    """
    centroids = params["centroids"]
    moved = dict(params, decay=1.0)
    if _option(q, params, "centroid_update") == "vq_ema":
        counts = params.get("ema_counts")
        counts = np.ones(centroids.shape[:2]) if counts is None else counts
        eps, n = _option(q, params, "ema_eps"), counts.sum(axis=-1, keepdims=True)
        smoothed = (counts + eps) / (n + centroids.shape[1] * eps) * n
        moved.update(ema_counts=counts, ema_sums=centroids * smoothed[..., None])
    _close("centroids", update(q, k, v, **moved).out, centroids, rtol)


def one_hot_routing_selects_a_path(attend, q, k, v, params, path: int, rtol=1e-12):
    """Soft routing whose probabilities are one-hot on ``path`` returns that path's output.

    ``attend`` is a soft-routing implementation (the "soft_routing" mechanism's
    signature). The property routes with ``x = 1`` and a ``W_r`` whose column
    ``path`` gives every token a logit 1000 above the others: ``exp(-1000)`` is 0
    in floating point, so the probabilities are exactly one-hot.
    """
    features, paths = params["routing_weights"].shape
    _require(0 <= path < paths, f"a path in [0, {paths - 1}]")
    weights = np.zeros((features, paths))
    weights[:, path] = 1000.0 / features
    x = np.ones(params["x"].shape)
    result = attend(q, k, v, **dict(params, x=x, routing_weights=weights))
    window = params["path_window"][path]
    chosen = dense_attention(q, k, v, causal=params["path_causal"][path], window=None if window is None else tuple(window),
                             scale=params.get("scale"))  # fmt: skip
    _close("out", result.out, chosen.out, rtol)


ROUTING = (one_cluster_is_dense, permutation_equivariance, convex_combination, causal_with_fixed_routing)
ALL = ROUTING + (ema_decay_one_keeps_centroids, one_hot_routing_selects_a_path)
