"""Scalable-Softmax (SSMax) attention, Nakanishi 2025 (spec/dilution.md)."""

from ...core import registry
from .reference import attended_counts, check_ssmax_inputs, ssmax_attention, ssmax_attention_vjp

MECHANISM = registry.register(
    "ssmax", __name__, ssmax_attention, ssmax_attention_vjp, check_ssmax_inputs, "spec/dilution.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["attended_counts", "ssmax_attention", "ssmax_attention_vjp"]
