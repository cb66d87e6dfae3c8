"""Dense scaled dot-product attention (spec/dense.md)."""

from ..core import registry
from .inputs import check_dense_inputs
from .reference import dense_attention, dense_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="dense",
        package="refattn.dense",
        forward=dense_attention,
        vjp=dense_attention_vjp,
        check_inputs=check_dense_inputs,
        backends=("reference", "numba"),
        spec="spec/dense.md",
    )
)

__all__ = ["dense_attention", "dense_attention_vjp"]
