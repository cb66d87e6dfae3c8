"""Nyströmformer (spec/low_rank.md)."""

from ...core import registry
from .presets import PRESETS
from .reference import check_inputs, nystrom_attention, nystrom_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="nystrom",
        package="refattn.lowrank.nystrom",
        forward=nystrom_attention,
        vjp=nystrom_attention_vjp,
        check_inputs=check_inputs,
        backends=("reference", "numba"),
        spec="spec/low_rank.md",
    )
)

__all__ = ["nystrom_attention", "nystrom_attention_vjp", "PRESETS"]
