"""Log-n scaled attention, Chiang & Cholak 2022 (spec/dilution.md)."""

from ...core import registry
from .reference import logn_attention, logn_attention_vjp


def _cases():
    from .cases import cases

    return cases()


MECHANISM = registry.register(
    registry.Mechanism(
        name="logn",
        package="refattn.dilution.logn",
        forward=logn_attention,
        vjp=logn_attention_vjp,
        backends=("reference", "numba"),
        cases=_cases,
        properties="refattn.dilution.logn.properties",
        spec="spec/dilution.md",
    )
)

__all__ = ["logn_attention", "logn_attention_vjp"]
