"""The Compressive Transformer over an array namespace ``xp`` (NumPy or CuPy): the GPU path.

Steps (C1) and (C3)-(C5) of spec/memory.md, the keys ``[compressed memory,
memory, segment]``, the eviction, ``f_c`` and the usage, are the reference's
own (``_run``), on the host; each step's attention (C2) is dense attention's
tiled algorithm over ``xp`` (refattn/dense/xp.py), causal bottom-right, so
memory is O(segment + mem_len + compressed_len) per step. Only ``f_c =
"most_used"`` needs a step's ``lse`` on the host (for the usage). Outputs and
gradients stay on the device until the end; the final state (``aux``) is the host's.
"""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import to_host
from ...dense import xp as dense_xp
from .. import streaming
from .reference import CompressiveInputs, _run

#: Its streaming steps are the reference's, on the host: device inputs come back for them (core/xp.py).
STEPS_ON_HOST = True

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # tiles of each step's attention (C2)


def _step_inputs(x: CompressiveInputs, segment: slice, keys, values, options: dict):
    """(C2)'s dense problem, checked as the reference checks it."""
    return streaming.checked_inputs("dense", dict(q=x.q[:, :, segment], k=keys, v=values, **options))[1]


def _for_state(x: CompressiveInputs, out, lse) -> Result:
    """What the state's update reads of a step: its ``lse`` on the host, for ``most_used`` only."""
    return Result(out=out, lse=to_host(lse) if x.compression.rule == "most_used" else None, aux={})


def forward(x: CompressiveInputs, xp) -> Result:
    """(C1)-(C5) over every segment."""
    outs, lses = [], []

    def attend(segment, keys, values, held, options):
        out, lse = dense_xp.attend(_step_inputs(x, segment, keys, values, options), xp, (BLOCK_Q, BLOCK_K))
        outs.append(out)
        lses.append(lse)
        return _for_state(x, out, lse)

    state = _run(x, None, None, attend)
    return Result(out=xp.concatenate(outs, axis=2), lse=xp.concatenate(lses, axis=2), aux=state)


def vjp(x: CompressiveInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """(C2') per step with both memories held fixed; their share of dk, dv is dropped."""
    dq, dk, dv = [], [], []

    def attend(segment, keys, values, held, options):
        inputs = _step_inputs(x, segment, keys, values, options)
        out, lse = dense_xp.attend(inputs, xp, (BLOCK_Q, BLOCK_K))
        step = Cotangents(streaming.rows(cotangents.dout, segment), streaming.rows(cotangents.dlse, segment))
        grads = dense_xp.attend_vjp(inputs, step, xp, (BLOCK_Q, BLOCK_K), Result(out=out, lse=lse, aux={}))
        dq.append(grads["q"])
        dk.append(grads["k"][:, :, held:])
        dv.append(grads["v"][:, :, held:])
        return _for_state(x, out, lse)

    _run(x, None, None, attend)
    return Grads(q=xp.concatenate(dq, axis=2), k=xp.concatenate(dk, axis=2), v=xp.concatenate(dv, axis=2))
