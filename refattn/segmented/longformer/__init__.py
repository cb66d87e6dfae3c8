"""Longformer: sliding band plus symmetric global tokens (spec/segmented.md)."""

from ...core import registry
from .reference import check_longformer_inputs, longformer_attention, longformer_attention_vjp

MECHANISM = registry.register(
    "longformer", __name__, longformer_attention, longformer_attention_vjp, check_longformer_inputs, "spec/segmented.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["longformer_attention", "longformer_attention_vjp"]
