"""Routing attention (the Routing Transformer) and soft routing over attention paths (spec/routing.md).

Four registry entries share one spec page and the presets
(refattn/routing/presets.py); each has its own folder, as the registry's
``<package>.<backend>`` rule wants one reference module per mechanism:

* "routing": this folder (reference.py, inputs.py, numba.py, cases.py, properties.py);
* "routing_hybrid": hybrid/ (local and routing heads side by side);
* "soft_routing": soft/ (a learned mixture of attention paths);
* "centroid_ema": centroids/ (one centroid update; forward only), with the
  other centroid functions (k-means initialisation, commitment loss).
"""

from ..core import registry
from .centroids.reference import (
    centroid_ema,
    centroid_ema_normalized_mean,
    centroid_ema_vjp,
    centroid_ema_vq,
    check_centroid_ema_inputs,
    commitment_loss,
    kmeans_init,
)
from .hybrid.reference import check_hybrid_inputs, hybrid_attention, hybrid_attention_vjp
from .inputs import check_routing_inputs
from .presets import CANONICAL, PRESETS, RoutingPreset, get_preset
from .reference import decision_margins, routing_attention, routing_attention_vjp, routing_vectors
from .soft.reference import (
    check_soft_routing_inputs,
    routed_attention,
    routed_attention_vjp,
    routing_probabilities,
    soft_routing_attention,
    soft_routing_attention_vjp,
)


#: Every routing mechanism has the numba backend and the GPU path.
WITH_GPU_PATH = ("reference", "numba", "cupy")
MECHANISM = registry.register(
    "routing", __name__, routing_attention, routing_attention_vjp, check_routing_inputs, "spec/routing.md",
    backends=WITH_GPU_PATH,
)
HYBRID_MECHANISM = registry.register(
    "routing_hybrid", f"{__name__}.hybrid", hybrid_attention, hybrid_attention_vjp, check_hybrid_inputs,
    "spec/routing.md", backends=WITH_GPU_PATH,
)
SOFT_ROUTING_MECHANISM = registry.register(
    "soft_routing", f"{__name__}.soft", soft_routing_attention, soft_routing_attention_vjp, check_soft_routing_inputs,
    "spec/routing.md", backends=WITH_GPU_PATH,
)
CENTROID_EMA_MECHANISM = registry.register(
    "centroid_ema", f"{__name__}.centroids", centroid_ema, centroid_ema_vjp, check_centroid_ema_inputs,
    "spec/routing.md", backends=WITH_GPU_PATH,
)

__all__ = [
    "CANONICAL",
    "PRESETS",
    "RoutingPreset",
    "centroid_ema",
    "centroid_ema_normalized_mean",
    "centroid_ema_vjp",
    "centroid_ema_vq",
    "commitment_loss",
    "decision_margins",
    "get_preset",
    "hybrid_attention",
    "hybrid_attention_vjp",
    "kmeans_init",
    "routed_attention",
    "routed_attention_vjp",
    "routing_attention",
    "routing_attention_vjp",
    "routing_probabilities",
    "routing_vectors",
    "soft_routing_attention",
    "soft_routing_attention_vjp",
]  # fmt: skip
