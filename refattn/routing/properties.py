"""Invariants of routing attention (spec/routing.md, "Invariants"), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)``, a routing-attention
implementation returning an object with ``.out`` (B, H, N, Dv) and ``.aux``
(``slot_lse`` (B, H, K, W), ``membership``, ``key_membership``, ``counts``)
-- a refattn :class:`~refattn.core.results.Result`, or your kernel wrapped to
look like one -- and a problem: ``q``, ``k``, ``v`` and ``params``, the keyword
arguments of :func:`refattn.routing.routing_attention` (``centroids`` and
``cluster_size`` included). Problems should have decisions far from ties
(:func:`refattn.routing.problems.routed_problem`): a property that changes the
inputs checks that the routing it holds fixed did not move, and raises
``ValueError`` if it did. A property raises ``AssertionError`` describing the
violation, or returns None; ``rtol`` is a normwise relative tolerance.

Properties that need a particular kind of problem say so and raise
``ValueError`` (refattn.core.invariants.require) when given another, so a
test filters its problems rather than passing vacuously. The invariants of
the centroid update and of soft routing are in refattn/routing/centroids/properties.py
and refattn/routing/soft/properties.py.
"""

from __future__ import annotations

import numpy as np

from ..core.invariants import close, require
from ..dense.reference import dense_attention
from .presets import preset_value
from .reference import routing_vectors


def _same_routing(base, moved) -> None:
    for name in ("membership", "key_membership"):
        if not np.array_equal(base.aux[name], moved.aux[name]):
            raise ValueError(f"the change moved the routing ({name}); use a problem with larger decision margins")


def one_cluster_is_dense(attend, q, k, v, params, rtol=1e-10):
    """With one centroid whose cluster is the whole sequence, routing attention is dense
    attention on the vectors it attends with, under the same masks: ``out · (1 + eps)``
    equals the dense output and the slot log-sum-exps (``aux["slot_lse"]``) are the dense ones of the slots' tokens.

    Needs ``K = 1``, ``cluster_size = N``, no memory key/values, no shared-QK, a causal
    mask by position (or slots in position order), and exact masking where
    padding is given (``mask_value=None``).
    """
    n, heads, dim = q.shape[2], q.shape[1], q.shape[-1]
    require(params["centroids"].shape[1] == 1 and params["cluster_size"] == n, "one centroid and cluster_size = N")
    require(params.get("mem_k") is None and not params.get("shared_qk", False), "no memory and no shared-QK")
    causal = params.get("causal", False)
    by_position = preset_value(params, "causal_by", dim) == "position" or preset_value(params, "order", dim) == "position"
    require(not causal or by_position, "a causal mask by position, or slots in position order")
    padding = params.get("key_padding_mask")
    require(padding is None or preset_value(params, "mask_value", dim) is None, "exact masking with padding")
    result = attend(q, k, v, **params)
    norm, eps = preset_value(params, "routing_norm", dim), preset_value(params, "norm_eps", dim)
    prescale = preset_value(params, "query_prescale", dim)
    if preset_value(params, "attend_on", dim) == "normalized":
        q = routing_vectors(q, routing_norm=norm, norm_eps=eps, prescale=prescale)
        k = routing_vectors(k, routing_norm=norm, norm_eps=eps)
    mask = None
    if padding is not None:
        mask = np.broadcast_to(padding[:, None, None, :], (q.shape[0], heads, n, n))
        if preset_value(params, "query_padding", dim) != "none":
            mask = mask & padding[:, None, :, None]
    dense = dense_attention(q, k, v, mask=mask, causal=causal, scale=preset_value(params, "scale", dim))
    close("out", result.out * (1.0 + preset_value(params, "scatter_eps", dim)), dense.out, rtol)
    tokens = result.aux["membership"][:, :, 0]  # (B, H, N): the token of each slot
    close("slot_lse", result.aux["slot_lse"][:, :, 0], np.take_along_axis(dense.lse, tokens, axis=-1), rtol)


def permutation_equivariance(attend, q, k, v, params, seed=0, rtol=1e-10):
    """Without a causal mask, permuting the tokens permutes the outputs, the counts and
    the unrouted tokens: routing looks at the tokens' content, never at their positions
    (on problems without ties)."""
    require(not params.get("causal", False), "no causal mask")
    perm = np.random.default_rng(seed).permutation(q.shape[2])
    moved_params = dict(params)
    if params.get("key_padding_mask") is not None:
        moved_params["key_padding_mask"] = params["key_padding_mask"][:, perm]
    base = attend(q, k, v, **params)
    moved = attend(q[:, :, perm], k[:, :, perm], v[:, :, perm], **moved_params)
    # The same tokens (by identity) in every cluster.
    for name in ("membership", "key_membership"):
        if not np.array_equal(np.sort(perm[moved.aux[name]], axis=-1), np.sort(base.aux[name], axis=-1)):
            raise AssertionError(f"{name}: permuting the tokens changed which tokens each cluster holds")
    close("out", moved.out, base.out[:, :, perm], rtol)
    np.testing.assert_array_equal(moved.aux["counts"], base.aux["counts"][:, :, perm], err_msg="counts")


def convex_combination(attend, q, k, v, params, rtol=1e-10):
    """Each routed token's output times ``(count + eps) / count`` is a mean of its
    clusters' slot outputs, each a convex combination of the values of that cluster's
    key list (and memory values), or 0 for an empty row: it lies, coordinate by
    coordinate and along random directions, within the range of those values (and 0)."""
    result = attend(q, k, v, **params)
    eps = preset_value(params, "scatter_eps", q.shape[-1])
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
        if np.any(np.isneginf(result.aux["slot_lse"][b, h, clusters][slots])):
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
    require(params.get("causal", False), "a causal mask")
    n = q.shape[2]
    require(0 <= position < n - 1, f"a position in [0, N - 2] = [0, {n - 2}]")
    rng = np.random.default_rng(seed)
    later = np.arange(n) > position

    def nudged(x):
        return x + np.where(later[:, None], 1e-4 * np.std(x) * rng.standard_normal(x.shape), 0.0)

    base = attend(q, k, v, **params)
    moved = attend(nudged(q), k if params.get("shared_qk") else nudged(k), nudged(v), **params)
    _same_routing(base, moved)
    close(f"out[..., :{position + 1}, :]", moved.out[:, :, : position + 1], base.out[:, :, : position + 1], rtol)


ALL = (one_cluster_is_dense, permutation_equivariance, convex_combination, causal_with_fixed_routing)
