"""Attention sinks, StreamingLLM (spec/memory.md, Attention sinks)."""

from ...core import registry
from .reference import check_sink_inputs, sink_attention, sink_attention_vjp, sink_step

MECHANISM = registry.register(
    registry.Mechanism(
        name="sinks",
        package="refattn.memory.sinks",
        forward=sink_attention,
        vjp=sink_attention_vjp,
        check_inputs=check_sink_inputs,
        backends=("reference", "numba"),
        spec="spec/memory.md",
        state_held_fixed=True,
    )
)

__all__ = ["sink_attention", "sink_attention_vjp", "sink_step"]
