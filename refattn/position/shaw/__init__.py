"""Shaw et al. 2018 clipped relative position representations (spec/position.md, "Shaw")."""

from ...core import registry
from .reference import relative_index, shaw_attention, shaw_attention_vjp


def _cases():
    from .cases import cases

    return cases()


MECHANISM = registry.register(
    registry.Mechanism(
        name="shaw",
        package="refattn.position.shaw",
        forward=shaw_attention,
        vjp=shaw_attention_vjp,
        backends=("reference", "numba"),
        cases=_cases,
        properties="refattn.position.shaw.properties",
        spec="spec/position.md",
    )
)

__all__ = ["relative_index", "shaw_attention", "shaw_attention_vjp"]
