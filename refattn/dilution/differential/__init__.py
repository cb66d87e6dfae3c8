"""Differential attention, Ye et al. 2024 (spec/dilution.md)."""

from ...core import registry
from .reference import differential_attention, differential_attention_vjp, key_heads, lambda_init_from_depth


def _cases():
    from .cases import cases

    return cases()


MECHANISM = registry.register(
    registry.Mechanism(
        name="differential",
        package="refattn.dilution.differential",
        forward=differential_attention,
        vjp=differential_attention_vjp,
        backends=("reference", "numba"),
        cases=_cases,
        properties="refattn.dilution.differential.properties",
        spec="spec/dilution.md",
    )
)

__all__ = ["differential_attention", "differential_attention_vjp", "lambda_init_from_depth", "key_heads"]
