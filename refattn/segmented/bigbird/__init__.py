"""BigBird block-sparse attention (spec/segmented.md)."""

from ...core import registry
from .reference import bigbird_attention, bigbird_attention_vjp, check_bigbird_inputs

MECHANISM = registry.register(
    registry.Mechanism(
        name="bigbird",
        package="refattn.segmented.bigbird",
        forward=bigbird_attention,
        vjp=bigbird_attention_vjp,
        check_inputs=check_bigbird_inputs,
        backends=("reference", "numba"),
        spec="spec/segmented.md",
    )
)

__all__ = ["bigbird_attention", "bigbird_attention_vjp"]
