"""Recurrent memory: streaming attention with explicit state (spec/memory.md).

Every mechanism here has a whole-sequence function (the registered forward,
``<name>_attention``) that runs a step function (``<name>_step``) over the
segments of a stream: ``state, out = step(state, q, k, v, ...)``. The state is
explicit: the whole-sequence function takes the initial state as keyword
arrays and returns the final state in ``result.aux`` under the same names.
"""

from . import compressive, infini, memory_tokens, sinks, xl_recurrence
from .compressive import (
    attention_reconstruction_loss,
    attention_reconstruction_loss_vjp,
    compressive_attention,
    compressive_attention_vjp,
    compressive_step,
)
from .infini import infini_attention, infini_attention_vjp, infini_step
from .memory_tokens import memory_token_attention, memory_token_attention_vjp, memory_token_step
from .sinks import sink_attention, sink_attention_vjp, sink_step
from .xl_recurrence import xl_recurrence_attention, xl_recurrence_attention_vjp, xl_recurrence_step

__all__ = [
    "xl_recurrence_attention",
    "xl_recurrence_attention_vjp",
    "xl_recurrence_step",
    "sink_attention",
    "sink_attention_vjp",
    "sink_step",
    "infini_attention",
    "infini_attention_vjp",
    "infini_step",
    "memory_token_attention",
    "memory_token_attention_vjp",
    "memory_token_step",
    "compressive_attention",
    "compressive_attention_vjp",
    "compressive_step",
    "attention_reconstruction_loss",
    "attention_reconstruction_loss_vjp",
]
