"""Segmented attention with an explicit inter-segment step (spec/segmented.md)."""

from ...core import registry
from .reference import check_segmented_inputs, segmented_attention, segmented_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="segmented",
        package="refattn.segmented.segments",
        forward=segmented_attention,
        vjp=segmented_attention_vjp,
        check_inputs=check_segmented_inputs,
        backends=("reference", "numba"),
        spec="spec/segmented.md",
    )
)

__all__ = ["segmented_attention", "segmented_attention_vjp"]
