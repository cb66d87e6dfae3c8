"""Generic low-rank attention U (W V) ⊘ U (W 1) (spec/low_rank.md)."""

from ...core import registry
from .reference import check_inputs, lowrank_attention, lowrank_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="lowrank",
        package="refattn.lowrank.generic",
        forward=lowrank_attention,
        vjp=lowrank_attention_vjp,
        check_inputs=check_inputs,
        backends=("reference", "numba"),
        spec="spec/low_rank.md",
        positional=("u", "w", "v"),
    )
)

__all__ = ["lowrank_attention", "lowrank_attention_vjp"]
