"""xPos, the length-extrapolatable rotary embedding (spec/position.md)."""

from ...core import registry
from .reference import apply_xpos, xpos_attention, xpos_attention_vjp, xpos_scales


def _cases():
    from .cases import cases

    return cases()


MECHANISM = registry.register(
    registry.Mechanism(
        name="xpos",
        package="refattn.position.xpos",
        forward=xpos_attention,
        vjp=xpos_attention_vjp,
        backends=("reference", "numba"),
        cases=_cases,
        properties="refattn.position.xpos.properties",
        spec="spec/position.md",
    )
)

__all__ = ["xpos_scales", "apply_xpos", "xpos_attention", "xpos_attention_vjp"]
