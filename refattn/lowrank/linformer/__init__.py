"""Linformer (spec/low_rank.md)."""

from ...core import registry
from .reference import check_inputs, linformer_attention, linformer_attention_vjp

MECHANISM = registry.register(
    "linformer", __name__, linformer_attention, linformer_attention_vjp, check_inputs, "spec/low_rank.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["linformer_attention", "linformer_attention_vjp"]
