"""Linformer (spec/low_rank.md)."""

from ...core import registry
from .reference import check_inputs, linformer_attention, linformer_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="linformer",
        package="refattn.lowrank.linformer",
        forward=linformer_attention,
        vjp=linformer_attention_vjp,
        check_inputs=check_inputs,
        backends=("reference", "numba"),
        spec="spec/low_rank.md",
    )
)

__all__ = ["linformer_attention", "linformer_attention_vjp"]
