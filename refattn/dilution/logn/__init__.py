"""Log-n scaled attention, Chiang & Cholak 2022 (spec/dilution.md)."""

from ...core import registry
from .reference import check_logn_inputs, logn_attention, logn_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="logn",
        package="refattn.dilution.logn",
        forward=logn_attention,
        vjp=logn_attention_vjp,
        check_inputs=check_logn_inputs,
        backends=("reference", "numba"),
        spec="spec/dilution.md",
    )
)

__all__ = ["logn_attention", "logn_attention_vjp"]
