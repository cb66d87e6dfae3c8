"""Dense scaled dot-product attention (spec/dense.md)."""

from ..core import registry
from .inputs import check_dense_inputs
from .reference import dense_attention, dense_attention_vjp

MECHANISM = registry.register("dense", __name__, dense_attention, dense_attention_vjp, check_dense_inputs,
                              "spec/dense.md", backends=("reference", "numba", "cupy"))  # fmt: skip

__all__ = ["dense_attention", "dense_attention_vjp"]
