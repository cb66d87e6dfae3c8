"""ALiBi, attention with linear biases (spec/position.md)."""

from ...core import registry
from .reference import alibi_attention, alibi_attention_vjp, alibi_bias, alibi_slopes


def _cases():
    from .cases import cases

    return cases()


MECHANISM = registry.register(
    registry.Mechanism(
        name="alibi",
        package="refattn.position.alibi",
        forward=alibi_attention,
        vjp=alibi_attention_vjp,
        backends=("reference", "numba"),
        cases=_cases,
        properties="refattn.position.alibi.properties",
        spec="spec/position.md",
    )
)

__all__ = ["alibi_slopes", "alibi_bias", "alibi_attention", "alibi_attention_vjp"]
