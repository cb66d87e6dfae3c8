"""Transformer-XL segment recurrence over an array namespace ``xp`` (NumPy or CuPy): the GPU path.

Steps (X1)-(X4) of spec/memory.md as the reference takes them: each step's
keys and values are ``memory + segment`` (on the host) and its attention (X2)-(X3)
is the inner mechanism's tiled algorithm over ``xp`` (refattn/dense/xp.py, or
refattn/position/transformer_xl/xp.py with relative scores), causal
bottom-right, so memory is O(segment + mem_len) per step. Outputs and gradients
stay on the device until the end; the final memory (``aux``) is the host's.
"""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import algorithm
from ...dense import xp as dense_xp
from .. import streaming
from .reference import XLRecurrenceInputs, _step_attention

#: Its streaming steps are the reference's, on the host: device inputs come back for them (core/xp.py).
STEPS_ON_HOST = True

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # the tiles are the inner mechanism's (its xp.py's)


def _steps(x: XLRecurrenceInputs):
    """Per step (X1)-(X2): the segment, the memory's length, the inner mechanism's xp module, its checked
    inputs, and (X4) the next memory, the last ``mem_len`` of [memory, segment]."""
    memory_k, memory_v = x.memory_k, x.memory_v  # (B, Hkv, m, D), (B, Hkv, m, Dv)
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        keys = streaming.extend(memory_k, x.k[:, :, segment])  # (B, Hkv, m + n, D)
        values = streaming.extend(memory_v, x.v[:, :, segment])  # (B, Hkv, m + n, Dv)
        name, options = _step_attention(x, x.q[:, :, segment], keys, values, memory_k.shape[2])
        inputs = options["inputs"] if "inputs" in options else streaming.checked_inputs(name, options)[1]
        memory_len = memory_k.shape[2]
        memory_k, memory_v = streaming.last(keys, x.mem_len), streaming.last(values, x.mem_len)
        yield segment, memory_len, algorithm(name), inputs, {"memory_k": memory_k, "memory_v": memory_v}


def forward(x: XLRecurrenceInputs, xp) -> Result:
    """(X1)-(X4) over every segment."""
    outs, lses = [], []
    for _, _, inner, inputs, memory in _steps(x):
        result = inner.forward(inputs, xp)
        outs.append(result.out)
        lses.append(result.lse)
    return Result(out=xp.concatenate(outs, axis=2), lse=xp.concatenate(lses, axis=2), aux=memory)


def vjp(x: XLRecurrenceInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """(X4')-(X1') per step with the incoming memory held fixed, summed over the steps."""
    dq, dk, dv = [], [], []
    tables = {name: 0.0 for name in (x.relative or {})}
    for segment, m, inner, inputs, _ in _steps(x):
        step = Cotangents(streaming.rows(cotangents.dout, segment), streaming.rows(cotangents.dlse, segment))
        grads = inner.vjp(inputs, step, xp)
        # The memory's share of dk, dv is dropped: the memory is a constant of the step.
        dq.append(grads["q"])
        dk.append(grads["k"][:, :, m:])
        dv.append(grads["v"][:, :, m:])
        for table in tables:
            tables[table] = tables[table] + grads[table]
    return Grads(q=xp.concatenate(dq, axis=2), k=xp.concatenate(dk, axis=2), v=xp.concatenate(dv, axis=2), **tables)
