"""Log-n scaled attention, Chiang & Cholak 2022 (spec/dilution.md)."""

from ...core import registry
from .reference import check_logn_inputs, logn_attention, logn_attention_vjp

MECHANISM = registry.register(
    "logn", __name__, logn_attention, logn_attention_vjp, check_logn_inputs, "spec/dilution.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["logn_attention", "logn_attention_vjp"]
