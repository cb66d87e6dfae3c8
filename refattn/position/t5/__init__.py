"""T5's bucketed relative position bias (spec/position.md)."""

from ...core import registry
from .reference import check_t5_inputs, relative_position_bucket, t5_attention, t5_attention_vjp, t5_bias

MECHANISM = registry.register(
    "t5", __name__, t5_attention, t5_attention_vjp, check_t5_inputs, "spec/position.md",
    backends=("reference", "numba", "cupy"),
)

__all__ = ["relative_position_bucket", "t5_bias", "t5_attention", "t5_attention_vjp"]
