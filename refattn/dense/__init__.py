"""Dense scaled dot-product attention (spec/dense.md)."""

from ..core import registry
from .reference import dense_attention, dense_attention_vjp


def _cases():
    from .cases import cases

    return cases()


MECHANISM = registry.register(
    registry.Mechanism(
        name="dense",
        package="refattn.dense",
        forward=dense_attention,
        vjp=dense_attention_vjp,
        backends=("reference", "numba"),
        cases=_cases,
        properties="refattn.dense.properties",
        spec="spec/dense.md",
    )
)

__all__ = ["dense_attention", "dense_attention_vjp"]
