"""Attention sinks over an array namespace ``xp`` (NumPy or CuPy): the GPU path.

Steps (S1)-(S4) of spec/memory.md are the reference's own (``_steps``: the cache
and the segment's keys, their RoPE positions, the eviction), on the host; each
step's attention (S3) is RoPE attention's tiled algorithm over ``xp``
(refattn/position/rope/xp.py) over ``cache + segment`` keys, so memory is
O(segment + sink_count + recent_size) per step. Outputs and gradients stay on
the device until the end; the final cache (``aux``) is the host's.
"""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import algorithm
from .. import streaming
from .reference import SinkInputs, _steps

#: Its streaming steps are the reference's, on the host: device inputs come back for them (core/xp.py).
STEPS_ON_HOST = True

INNER = "rope"
BLOCK_Q, BLOCK_K = algorithm(INNER).BLOCK_Q, algorithm(INNER).BLOCK_K  # the tiles are RoPE's (its xp.py's)


def _step_inputs(x: SinkInputs, segment: slice, keys, values, options: dict):
    """(S3)'s checked RoPE inputs: the segment's queries over the cache and the segment."""
    return streaming.checked_inputs(INNER, dict(q=x.q[:, :, segment], k=keys, v=values, **options))[1]


def forward(x: SinkInputs, xp) -> Result:
    """(S1)-(S4) over every segment."""
    rope = algorithm(INNER)
    outs, lses = [], []
    for segment, keys, values, _, options, cache in _steps(x):
        result = rope.forward(_step_inputs(x, segment, keys, values, options), xp)
        outs.append(result.out)
        lses.append(result.lse)
    return Result(out=xp.concatenate(outs, axis=2), lse=xp.concatenate(lses, axis=2), aux=cache)


def vjp(x: SinkInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """(S3') per step with the incoming cache held fixed; the cache's share of dk, dv is dropped."""
    rope = algorithm(INNER)
    dq, dk, dv = [], [], []
    for segment, keys, values, cached, options, _ in _steps(x):
        step = Cotangents(streaming.rows(cotangents.dout, segment), streaming.rows(cotangents.dlse, segment))
        grads = rope.vjp(_step_inputs(x, segment, keys, values, options), step, xp)
        dq.append(grads["q"])
        dk.append(grads["k"][:, :, cached:])
        dv.append(grads["v"][:, :, cached:])
    return Grads(q=xp.concatenate(dq, axis=2), k=xp.concatenate(dk, axis=2), v=xp.concatenate(dv, axis=2))
