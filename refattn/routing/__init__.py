"""Routing attention (the Routing Transformer) and soft routing over attention paths (spec/routing.md).

Four registry entries share this folder, one spec page and one cases module:
"routing" (routing attention), "routing_hybrid" (local and routing heads side
by side), "soft_routing" (a learned mixture of attention paths) and
"centroid_ema" (one centroid update; forward only). Presets:
refattn/routing/presets.py.
"""

from ..core import registry
from .centroids import (
    centroid_ema,
    centroid_ema_normalized_mean,
    centroid_ema_vjp,
    centroid_ema_vq,
    commitment_loss,  # fmt: skip
    kmeans_init,
)
from .hybrid import hybrid_attention, hybrid_attention_vjp
from .presets import CANONICAL, PRESETS, RoutingPreset, get_preset
from .reference import (
    decision_margins,
    routing_attention,
    routing_attention_vjp,
    routing_vectors,
)
from .soft import (
    routed_attention,
    routed_attention_vjp,
    routing_probabilities,
    soft_routing_attention,
    soft_routing_attention_vjp,  # fmt: skip
)


def _cases_of(mechanism: str):
    def cases():
        from .cases import cases

        return [case for case in cases() if case.mechanism == mechanism]

    return cases


def _register(name: str, forward, vjp, backends=("reference",)) -> registry.Mechanism:
    return registry.register(
        registry.Mechanism(
            name=name,
            package="refattn.routing",
            forward=forward,
            vjp=vjp,
            backends=backends,
            cases=_cases_of(name),
            properties="refattn.routing.properties",
            spec="spec/routing.md",
        )
    )


MECHANISM = _register("routing", routing_attention, routing_attention_vjp, backends=("reference", "numba"))
HYBRID_MECHANISM = _register("routing_hybrid", hybrid_attention, hybrid_attention_vjp)
SOFT_ROUTING_MECHANISM = _register("soft_routing", soft_routing_attention, soft_routing_attention_vjp)
CENTROID_EMA_MECHANISM = _register("centroid_ema", centroid_ema, centroid_ema_vjp)

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
