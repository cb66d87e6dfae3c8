"""Conformance cases of the four routing mechanisms: "routing", "routing_hybrid",
"soft_routing" and "centroid_ema".

Every routing case is built with :func:`~refattn.routing.problems.routed_problem`,
so that its decisions (nearest centroids, window members, their order) have a
margin of at least :data:`~refattn.routing.problems.MIN_RELATIVE_MARGIN` of
``|r| |μ|`` and are reproduced exactly at float32, float16 and bfloat16.
Centroids, padding masks and the centroid-update state are arrays of the case
(``param.*``); memory key/values are inputs with gradients. Each preset has its
own cases, with the preset named both in the case and in its parameters.

Seeds are the CRC-32 of the case id.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

from ..conformance.case import Case
from .presets import get_preset
from .problems import routed_problem


class Dims(NamedTuple):
    """Sizes of one case: q, k (b, h, n, d), v (b, h, n, dv), centroids (h, clusters, d), ``window`` per cluster."""

    b: int
    h: int
    n: int
    d: int
    dv: int
    clusters: int
    window: int


def _seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _problem(rng, dims: Dims, preset, *, shared_qk=False, empty_cluster=False) -> dict:
    chosen = get_preset(preset)
    prescale = 1.0 / np.sqrt(dims.d) if chosen.query_prescale is None else chosen.query_prescale
    return routed_problem(rng, batch=dims.b, heads=dims.h, length=dims.n, head_dim=dims.d, value_dim=dims.dv,
                          clusters=dims.clusters, routing_norm=chosen.routing_norm, query_prescale=prescale,
                          shared_qk=shared_qk, empty_cluster=empty_cluster)  # fmt: skip


def _padding(rng, dims: Dims) -> np.ndarray:
    """(B, N) bool, True = real token: about one token in four padded, never all of a row."""
    padding = rng.random((dims.b, dims.n)) >= 0.25
    padding[:, 0] = True
    return padding


def _routing_case(name, description, flags, dims: Dims, *, preset=None, shared_qk=False, causal=False,
                  padding=False, memory=0, **params) -> Case:  # fmt: skip
    """One "routing" case; ``params`` are further JSON keyword arguments (preset overrides)."""

    def arrays(rng):
        out = _problem(rng, dims, preset, shared_qk=shared_qk)
        if padding:
            out["padding_mask"] = _padding(rng, dims)
        if memory:
            out["mem_k"] = rng.standard_normal((dims.h, dims.clusters, memory, dims.d))
            out["mem_v"] = rng.standard_normal((dims.h, dims.clusters, memory, dims.dv))
        return out

    case_id = f"routing/{name}"
    return Case(
        id=case_id, mechanism="routing", description=description, flags=flags, seed=_seed(case_id), arrays=arrays,
        params=dict(window=dims.window, shared_qk=shared_qk, causal=causal, preset=preset, **params),
        differentiable=("q", "k", "v", "mem_k", "mem_v") if memory else ("q", "k", "v"), preset=preset,
    )  # fmt: skip


def _hybrid_case(name, description, flags, dims: Dims, num_local_heads: int, *, preset, causal, local_window) -> Case:
    routing_heads = dims.h - num_local_heads
    first = get_preset(preset).head_order == "routing_first"
    heads = np.arange(routing_heads) if first else np.arange(num_local_heads, dims.h)

    def arrays(rng):
        out = _problem(rng, dims, preset)
        out["centroids"] = out["centroids"][heads]  # the routing heads' centroids, in their order
        return out

    case_id = f"routing_hybrid/{name}"
    return Case(
        id=case_id, mechanism="routing_hybrid", description=description, flags=flags, seed=_seed(case_id),
        arrays=arrays, params=dict(num_local_heads=num_local_heads, window=dims.window, local_window=local_window,
                                   causal=causal, preset=preset),
        preset=preset,
    )  # fmt: skip


def _soft_case(name, description, flags, *, b, h, n, d, features, path_causal, path_window) -> Case:
    def arrays(rng):
        return {
            "q": rng.standard_normal((b, h, n, d)),
            "k": rng.standard_normal((b, h, n, d)),
            "v": rng.standard_normal((b, h, n, d)),
            "x": rng.standard_normal((b, n, features)),
            "routing_weights": 1.5 * rng.standard_normal((features, len(path_causal))),
        }

    case_id = f"soft_routing/{name}"
    return Case(
        id=case_id, mechanism="soft_routing", description=description, flags=flags, seed=_seed(case_id),
        arrays=arrays, params=dict(path_causal=path_causal, path_window=path_window),
        differentiable=("q", "k", "v", "x", "routing_weights"),
    )  # fmt: skip


def _ema_case(name, description, flags, dims: Dims, *, preset, shared_qk=False, padding=False, warm_state=False,
              empty_cluster=False, **params) -> Case:  # fmt: skip
    def arrays(rng):
        out = _problem(rng, dims, preset, shared_qk=shared_qk, empty_cluster=empty_cluster)
        if padding:
            out["padding_mask"] = _padding(rng, dims)
        if warm_state:
            counts = rng.uniform(2.0, 12.0, (dims.h, dims.clusters))
            out["ema_counts"] = counts
            out["ema_sums"] = counts[..., None] * (out["centroids"] + 0.1 * rng.standard_normal(out["centroids"].shape))
        return out

    case_id = f"centroid_ema/{name}"
    return Case(
        id=case_id, mechanism="centroid_ema", description=description, flags=flags, seed=_seed(case_id),
        arrays=arrays, params=dict(shared_qk=shared_qk, preset=preset, **params), differentiable=("q", "k"),
        preset=preset, grad=False,
    )  # fmt: skip


def cases() -> list[Case]:
    """Every routing case, in reading order."""
    g, l = "google_research", "lucidrains"
    return [
        # --- canonical ------------------------------------------------------------
        _routing_case("canonical_basic", "Canonical: 4 centroids x window 8 = N = 32, 2 heads, not causal.",
                      ("ROUTING_BALANCED_TOPK",), Dims(1, 2, 32, 16, 16, 4, 8)),
        _routing_case("canonical_overlap", "Canonical: 4 clusters of 8 over N = 16: tokens in up to 4 clusters, exact mean.",
                      ("ROUTING_BALANCED_TOPK", "ROUTING_SCATTER_MEAN_EPS"), Dims(1, 2, 16, 16, 12, 4, 8)),
        _routing_case("canonical_unrouted", "Canonical: 2 clusters of 6 over N = 24: half the tokens unrouted, output 0.",
                      ("ROUTING_UNROUTED_TOKEN",), Dims(1, 2, 24, 16, 16, 2, 6)),
        _routing_case("canonical_causal", "Canonical causal, separate query and key lists: by position; some rows empty.",
                      ("ROUTING_CAUSAL_BY_POSITION", "FULLY_MASKED_ROW"), Dims(1, 2, 32, 16, 16, 4, 8), causal=True),
        _routing_case("canonical_shared_causal", "Canonical shared-QK, causal: no self-attention unless alone.",
                      ("SHARED_QK_SELF_MASK",), Dims(1, 2, 32, 16, 16, 4, 8), shared_qk=True, causal=True),
        _routing_case("canonical_padding", "Canonical, B = 2, padded tokens: masked as keys, their rows empty; Dv = 12.",
                      ("PADDING_MASK", "MULTI_BATCH", "ROUTING_UNROUTED_TOKEN"), Dims(2, 2, 24, 16, 12, 3, 6),
                      padding=True),
        # --- google-research ------------------------------------------------------
        _routing_case("google_basic", "google-research: layer norm after q/sqrt(D), scale 1, scatter eps 1e-2.",
                      ("ROUTING_BALANCED_TOPK", "ROUTING_SCATTER_MEAN_EPS"), Dims(1, 2, 32, 16, 16, 4, 8), preset=g),
        _routing_case("google_slot_causal", "google-research causal: separate lists masked by slot, not position.",
                      ("ROUTING_SLOT_CAUSAL",), Dims(1, 2, 32, 16, 16, 4, 8), preset=g, causal=True),
        _routing_case("google_shared_causal", "google-research shared-QK causal, D = 6: slot = position, no self mask.",
                      ("SHARED_QK_SELF_MASK", "ROUTING_UNROUTED_TOKEN"), Dims(1, 2, 24, 6, 6, 2, 8), preset=g,
                      shared_qk=True, causal=True),
        _routing_case("google_padding", "google-research, B = 2, padded keys masked by -1e9, padded rows computed.",
                      ("ROUTING_SCATTER_MEAN_EPS", "MULTI_BATCH"), Dims(2, 2, 24, 16, 16, 3, 8), preset=g,
                      padding=True),
        # --- lucidrains -------------------------------------------------------------
        _routing_case("lucidrains_basic", "lucidrains: L2 routing, raw q/k, 1/sqrt(D), slots by similarity, eps 1e-5.",
                      ("ROUTING_BALANCED_TOPK", "ROUTING_SCATTER_MEAN_EPS"), Dims(1, 2, 32, 16, 16, 4, 8), preset=l),
        _routing_case("lucidrains_causal_memory", "lucidrains causal with one memory key/value per cluster (num_mem_kv).",
                      ("ROUTING_CAUSAL_BY_POSITION",), Dims(1, 2, 32, 16, 16, 4, 8), preset=l, causal=True, memory=1),
        _routing_case("lucidrains_shared_causal", "lucidrains shared-QK causal: keys L2-normalised, self logit -5e4.",
                      ("SHARED_QK_SELF_MASK",), Dims(1, 2, 32, 16, 16, 4, 8), preset=l, shared_qk=True, causal=True),
        _routing_case("lucidrains_unrouted_memory", "lucidrains, B = 2, 2 clusters of 6 over 24, padding, 2 memory slots.",
                      ("ROUTING_UNROUTED_TOKEN", "ROUTING_SCATTER_MEAN_EPS", "MULTI_BATCH"),
                      Dims(2, 2, 24, 16, 16, 2, 6), preset=l, padding=True, memory=2),
        # --- hybrid layers ----------------------------------------------------------
        _hybrid_case("google", "google-research layer: 2 routing heads, then 1 local head (window 4 back), causal.",
                     ("HYBRID_HEAD_ORDER",), Dims(1, 3, 24, 16, 16, 3, 8), 1, preset=g, causal=True,
                     local_window=[4, 0]),
        _hybrid_case("lucidrains", "lucidrains layer: 1 local head (always causal), then 2 routing heads, not causal.",
                     ("HYBRID_HEAD_ORDER",), Dims(1, 3, 24, 16, 16, 3, 8), 1, preset=l, causal=False,
                     local_window=[4, 0]),
        _hybrid_case("canonical", "Canonical layer: 3 routing heads, then 1 local head (window 3 each side).",
                     ("HYBRID_HEAD_ORDER",), Dims(1, 4, 16, 16, 16, 2, 8), 1, preset=None, causal=False,
                     local_window=[3, 3]),
        # --- soft routing ---------------------------------------------------------------
        _soft_case("three_paths", "Per-token softmax(x W_r) over dense, causal and local (4 back) paths.",
                   ("SOFT_ROUTING",), b=1, h=2, n=12, d=8, features=6, path_causal=[False, True, True],
                   path_window=[None, None, [4, 0]]),
        _soft_case("two_paths_batch", "B = 2, 3 heads sharing each token's mixture of a dense and a local path.",
                   ("SOFT_ROUTING", "MULTI_BATCH"), b=2, h=3, n=10, d=8, features=5, path_causal=[False, False],
                   path_window=[None, [2, 2]]),
        # --- centroid updates -----------------------------------------------------------
        _ema_case("google_vq_padding", "google-research VQ EMA from q and k, decay 0.9: padded tokens excluded.",
                  ("CENTROID_EMA",), Dims(1, 2, 24, 16, 16, 4, 8), preset=g, padding=True, decay=0.9),
        _ema_case("google_vq_warm_state", "google-research VQ EMA, decay 0.999, from a given (counts, sums) state.",
                  ("CENTROID_EMA",), Dims(2, 2, 16, 16, 16, 3, 8), preset=g, warm_state=True),
        _ema_case("lucidrains_normalized_mean", "lucidrains EMA toward normalised means, decay 0.9; one cluster empty.",
                  ("CENTROID_EMA",), Dims(1, 2, 24, 16, 16, 4, 8), preset=l, empty_cluster=True, decay=0.9),
        _ema_case("lucidrains_shared", "lucidrains shared-QK: only the queries update, decay 0.999.",
                  ("CENTROID_EMA",), Dims(2, 2, 16, 16, 16, 3, 8), preset=l, shared_qk=True),
    ]  # fmt: skip
