"""Memory tokens (the Recurrent Memory Transformer) over an array namespace ``xp`` (NumPy or CuPy): the GPU path.

Steps (T1)-(T3) of spec/memory.md, the wrapped segment ``[read, segment,
write]``, its positions and mask, are the reference's own (``_wrapped``), on
the host; (T4), RoPE attention over the wrapped segment, is RoPE's tiled
algorithm over ``xp`` (refattn/position/rope/xp.py). (T5) The write tokens'
outputs are the next memory: (B, m, Hq·Dv), brought back to the host for the
next step's (T1). Outputs and gradients stay on the device until the end.
"""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import algorithm, compute_dtype, to_host
from .. import streaming
from .reference import MemoryTokenInputs, _wrapped

#: Its streaming steps are the reference's, on the host: device inputs come back for them (core/xp.py).
STEPS_ON_HOST = True

INNER = "rope"
BLOCK_Q, BLOCK_K = algorithm(INNER).BLOCK_Q, algorithm(INNER).BLOCK_K  # the tiles are RoPE's (its xp.py's)


def _attend(x: MemoryTokenInputs, memory, segment: slice, xp):
    """(T1)-(T4) for one segment: RoPE's checked inputs over the wrapped segment, and its result."""
    inputs = streaming.checked_inputs(INNER, _wrapped(x, memory, segment))[1]
    return inputs, algorithm(INNER).forward(inputs, xp)


def _next_memory(result, memory, start: int):
    """(T5) The write tokens' outputs (rows ``start`` on), heads side by side, on the host (B, m, Hq·Dv)."""
    write = to_host(result.out[:, :, start:])  # (B, Hq, m, Dv)
    return write.transpose(0, 2, 1, 3).reshape(memory.shape)


def _in_rows(values, shape: tuple, rows: slice, dtype, xp):
    """Zeros of ``shape`` on the device with ``values`` in ``rows`` of axis 2."""
    full = xp.zeros(shape, dtype=dtype)
    full[:, :, rows] = xp.asarray(values, dtype=dtype)
    return full


def forward(x: MemoryTokenInputs, xp) -> Result:
    """(T1)-(T5) over every segment."""
    memory = x.memory  # (B, m, E)
    m = memory.shape[1]
    outs, lses = [], []
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        n = segment.stop - segment.start
        _, result = _attend(x, memory, segment, xp)
        outs.append(result.out[:, :, m : m + n])
        lses.append(result.lse[:, :, m : m + n])
        memory = _next_memory(result, memory, m + n)
    return Result(out=xp.concatenate(outs, axis=2), lse=xp.concatenate(lses, axis=2), aux={"memory": memory})


def vjp(x: MemoryTokenInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """(T5')-(T1') per segment with the incoming memory held fixed, summed over the segments."""
    dtype = compute_dtype(x.q.dtype)
    memory = x.memory
    m = memory.shape[1]
    dq, dk, dv = [], [], []
    dw = {"w_q": 0.0, "w_k": 0.0, "w_v": 0.0}
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        n = segment.stop - segment.start
        inputs, result = _attend(x, memory, segment, xp)
        # Cotangents of the wrapped outputs: the segment's; the read and write rows get none (stop-gradient).
        rows = slice(m, m + n)
        dout = _in_rows(cotangents.dout[:, :, segment], result.out.shape, rows, dtype, xp)
        dlse = None
        if cotangents.dlse is not None:
            dlse = _in_rows(cotangents.dlse[:, :, segment], result.lse.shape, rows, dtype, xp)
        grads = algorithm(INNER).vjp(inputs, Cotangents(dout, dlse), xp, result)
        dq.append(grads["q"][:, :, m : m + n])
        dk.append(grads["k"][:, :, m : m + n])
        dv.append(grads["v"][:, :, m : m + n])
        # (T1') The memory tokens' rows (read and write) go to the projections.
        on_device = xp.asarray(streaming.einsum_operand(memory), dtype=dtype)  # (B, m, E)
        for name, key in (("w_q", "q"), ("w_k", "k"), ("w_v", "v")):
            memory_rows = grads[key][:, :, :m] + grads[key][:, :, m + n :]  # (B, H, m, D)
            dw[name] = dw[name] + xp.einsum("bme,bhmd->ehd", on_device, memory_rows)
        memory = _next_memory(result, memory, m + n)
    return Grads(q=xp.concatenate(dq, axis=2), k=xp.concatenate(dk, axis=2), v=xp.concatenate(dv, axis=2), **dw)
