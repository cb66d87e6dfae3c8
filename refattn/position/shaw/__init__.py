"""Shaw et al. 2018 clipped relative position representations (spec/position.md, "Shaw")."""

from ...core import registry
from .inputs import check_shaw_inputs
from .reference import relative_index, shaw_attention, shaw_attention_vjp

MECHANISM = registry.register(
    "shaw", __name__, shaw_attention, shaw_attention_vjp, check_shaw_inputs, "spec/position.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["relative_index", "shaw_attention", "shaw_attention_vjp"]
