"""Scalable-Softmax (SSMax) attention, Nakanishi 2025 (spec/dilution.md)."""

from ...core import registry
from .reference import attended_counts, check_ssmax_inputs, ssmax_attention, ssmax_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="ssmax",
        package="refattn.dilution.ssmax",
        forward=ssmax_attention,
        vjp=ssmax_attention_vjp,
        check_inputs=check_ssmax_inputs,
        backends=("reference", "numba"),
        spec="spec/dilution.md",
    )
)

__all__ = ["attended_counts", "ssmax_attention", "ssmax_attention_vjp"]
