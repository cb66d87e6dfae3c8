"""BigBird block-sparse attention (spec/segmented.md)."""

from ...core import registry
from .reference import bigbird_attention, bigbird_attention_vjp, check_bigbird_inputs

MECHANISM = registry.register(
    "bigbird", __name__, bigbird_attention, bigbird_attention_vjp, check_bigbird_inputs, "spec/segmented.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["bigbird_attention", "bigbird_attention_vjp"]
