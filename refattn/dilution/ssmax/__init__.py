"""Scalable-Softmax (SSMax) attention, Nakanishi 2025 (spec/dilution.md)."""

from ...core import registry
from .reference import attended_counts, ssmax_attention, ssmax_attention_vjp


def _cases():
    from .cases import cases

    return cases()


MECHANISM = registry.register(
    registry.Mechanism(
        name="ssmax",
        package="refattn.dilution.ssmax",
        forward=ssmax_attention,
        vjp=ssmax_attention_vjp,
        backends=("reference", "numba"),
        cases=_cases,
        properties="refattn.dilution.ssmax.properties",
        spec="spec/dilution.md",
    )
)

__all__ = ["attended_counts", "ssmax_attention", "ssmax_attention_vjp"]
