"""Longformer: sliding band plus symmetric global tokens (spec/segmented.md)."""

from ...core import registry
from .reference import check_longformer_inputs, longformer_attention, longformer_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="longformer",
        package="refattn.segmented.longformer",
        forward=longformer_attention,
        vjp=longformer_attention_vjp,
        check_inputs=check_longformer_inputs,
        backends=("reference", "numba"),
        spec="spec/segmented.md",
    )
)

__all__ = ["longformer_attention", "longformer_attention_vjp"]
