"""Attention sinks, StreamingLLM (spec/memory.md, Attention sinks)."""

from ...core import registry
from .reference import check_sink_inputs, sink_attention, sink_attention_vjp, sink_step

MECHANISM = registry.register(
    "sinks", __name__, sink_attention, sink_attention_vjp, check_sink_inputs, "spec/memory.md", state_held_fixed=True,
    backends=("reference", "numba", "cupy"),
)

__all__ = ["sink_attention", "sink_attention_vjp", "sink_step"]
