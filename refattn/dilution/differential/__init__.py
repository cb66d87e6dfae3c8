"""Differential attention, Ye et al. 2024 (spec/dilution.md)."""

from ...core import registry
from .reference import (
    check_differential_inputs,
    differential_attention,
    differential_attention_vjp,
    key_heads,
    lambda_init_from_depth,
)

MECHANISM = registry.register(
    "differential", __name__, differential_attention, differential_attention_vjp, check_differential_inputs, "spec/dilution.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["differential_attention", "differential_attention_vjp", "lambda_init_from_depth", "key_heads"]
