"""Conformance cases of hybrid layers (registry name "routing_hybrid").

The routing heads' inputs come from :func:`~refattn.routing.problems.preset_problem`
(decisions with a recorded margin); the case keeps the centroids of the
routing heads only, in their order. Seeds are the CRC-32 of the case id.
"""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, make_case
from ..presets import get_preset
from ..problems import preset_problem, routing_dims

#: The flags only hybrid layers' cases carry.
FLAGS = {
    "HYBRID_HEAD_ORDER": (
        "A hybrid layer's heads are in its preset's order: google-research routing heads first, local heads "
        "last (attention_nd splits the routing heads off first); lucidrains local heads first (SelfAttention "
        "concatenates [local_out, global_out]), and its local heads are causal even in a non-causal layer. "
        "Cases have unequal numbers of local and routing heads; fails the other order."
    ),
}


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, num_local_heads: int, *, clusters: int,
          cluster_size: int, preset, causal: bool, local_window) -> Case:  # fmt: skip
    routing_heads = dims.hq - num_local_heads
    first = get_preset(preset).head_order == "routing_first"
    heads = np.arange(routing_heads) if first else np.arange(num_local_heads, dims.hq)

    def arrays(rng):
        out = preset_problem(rng, dims, clusters, preset)
        out["centroids"] = out["centroids"][heads]  # the routing heads' centroids, in their order
        return out

    return make_case(
        "routing_hybrid", name, description, flags, arrays,
        params=dict(num_local_heads=num_local_heads, cluster_size=cluster_size, local_window=local_window,
                    causal=causal, preset=preset),
        preset=preset,
    )  # fmt: skip


def cases() -> list[Case]:
    """The hybrid-layer cases, in reading order."""
    return [
        _case("google", "google-research layer: 2 routing heads, then 1 local head (window 4 back), causal.",
              ("HYBRID_HEAD_ORDER",), routing_dims(1, 3, 24, 16, 16), 1, clusters=3, cluster_size=8,
              preset="google_research", causal=True, local_window=[4, 0]),
        _case("lucidrains", "lucidrains layer: 1 local head, then 2 routing heads, not causal, so the local head looks "
              "both ways (window 4 each side; routing-transformer 3f6c461: LocalAttention(causal = causal)).",
              ("HYBRID_HEAD_ORDER",), routing_dims(1, 3, 24, 16, 16), 1, clusters=3, cluster_size=8,
              preset="lucidrains", causal=False, local_window=[4, 4]),
        _case("canonical", "Canonical layer: 3 routing heads, then 1 local head (window 3 each side).",
              ("HYBRID_HEAD_ORDER",), routing_dims(1, 4, 16, 16, 16), 1, clusters=2, cluster_size=8,
              preset=None, causal=False, local_window=[3, 3]),
    ]  # fmt: skip
