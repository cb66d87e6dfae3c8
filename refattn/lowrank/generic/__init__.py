"""Generic low-rank attention U (W V) ⊘ U (W 1) (spec/low_rank.md)."""

from ...core import registry
from .reference import check_inputs, lowrank_attention, lowrank_attention_vjp

MECHANISM = registry.register(
    "lowrank", __name__, lowrank_attention, lowrank_attention_vjp, check_inputs, "spec/low_rank.md",
    positional=("u", "w", "v"), backends=("reference", "numba", "cupy"),
)

__all__ = ["lowrank_attention", "lowrank_attention_vjp"]
