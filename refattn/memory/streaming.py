"""What every recurrent-memory mechanism shares (spec/memory.md, "Streaming").

A streamed sequence of ``N`` tokens is cut into segments of ``segment_len``
tokens (the last may be shorter where a mechanism allows it). Each step sees
one segment and the state the previous step left, and returns the segment's
output and the next state. The state is explicit: arrays in, arrays out,
named as the whole-sequence function's keyword arguments that start the
stream, so that ``result.aux`` (the final state) can start the next call.

The attention inside a step is another registered mechanism (dense,
Transformer-XL relative scores, RoPE), called through its checked inputs and
its own backend, so the reference steps run the reference's numbered steps
and the Numba backend runs the tiled kernels over ``segment + memory`` keys.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
import numbers

import numpy as np

from ..core import checks, registry
from ..core.errors import SpecError
from ..core.precision import STORAGE_DTYPES, Numerics
from ..core.results import Cotangents, Grads, Result
from ..dense.inputs import DenseInputs


# --------------------------------------------------------------------------
# Checks shared by the mechanisms' check_inputs.
# --------------------------------------------------------------------------


def integer(x, name: str, minimum: int) -> int:
    """A Python or NumPy integer (not a bool) of at least ``minimum``."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or x < minimum:
        raise SpecError(name, f"an int >= {minimum}", checks.summary(x))
    return int(x)


def segment_length(segment_len, seq_len: int, *, equal: bool) -> int:
    """``segment_len``: an int >= 1; with ``equal``, one dividing the sequence length (no short last segment)."""
    segment_len = integer(segment_len, "segment_len", 1)
    if equal and seq_len % segment_len:
        raise SpecError(
            "segment_len",
            f"a length dividing the sequence length {seq_len} (this mechanism needs segments of equal length)",
            repr(segment_len),
        )
    return segment_len


def self_attention_shape(q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray, checks.AttentionShape]:
    """q, k, v of one stream: :func:`refattn.core.checks.qkv` with as many keys as queries."""
    q, k, v, shape = checks.qkv(q, k, v)
    if shape.kv_len != shape.q_len:
        raise SpecError("k", f"{shape.q_len} tokens, one per query (a stream's keys are its own tokens)",
                        f"{shape.kv_len} tokens")  # fmt: skip
    return q, k, v, shape


def state_array(x, name: str, leading: tuple, last: int, *, max_len: int | None, what: str) -> np.ndarray:
    """A state array (B, H, n, last) with (B, H) = ``leading`` and ``n <= max_len``; ``n`` may be 0."""
    expected = f"shape {leading + ('n', last)} ({what})" + ("" if max_len is None else f" with n <= {max_len}")
    if not isinstance(x, np.ndarray):
        raise SpecError(name, f"a numpy array of {expected}", checks.summary(x))
    if x.ndim != 4 or x.shape[:2] != leading or x.shape[3] != last or (max_len is not None and x.shape[2] > max_len):
        raise SpecError(name, expected, f"shape {x.shape}")
    return checks.float_array(x, name)


def memory_pair(memory_k, memory_v, names: tuple[str, str], shape: checks.AttentionShape, max_len: int):
    """Keys (B, Hkv, n, D) and values (B, Hkv, n, Dv) held as memory: both given, or both None (empty)."""
    if (memory_k is None) != (memory_v is None):
        given = names[0] if memory_v is None else names[1]
        raise SpecError(names[0] if memory_k is None else names[1], f"an array, as {given} is given", "None")
    leading = (shape.batch, shape.kv_heads)
    if memory_k is None:
        return np.zeros(leading + (0, shape.head_dim)), np.zeros(leading + (0, shape.value_dim))
    memory_k = state_array(memory_k, names[0], leading, shape.head_dim, max_len=max_len, what="(B, Hkv, n, D) keys")
    memory_v = state_array(memory_v, names[1], leading, shape.value_dim, max_len=max_len, what="(B, Hkv, n, Dv) values")
    if memory_v.shape[2] != memory_k.shape[2]:
        raise SpecError(names[1], f"{memory_k.shape[2]} entries (as {names[0]})", f"shape {memory_v.shape}")
    return memory_k, memory_v


# --------------------------------------------------------------------------
# Segments and memory.
# --------------------------------------------------------------------------


def segments(seq_len: int, segment_len: int) -> list[slice]:
    """The token ranges of the steps: ``[0, L), [L, 2L), ...``; the last may be shorter."""
    return [slice(start, min(start + segment_len, seq_len)) for start in range(0, seq_len, segment_len)]


def extend(memory: np.ndarray, current: np.ndarray) -> np.ndarray:
    """``[memory, current]`` along the sequence axis (axis 2)."""
    return np.concatenate([memory, current.astype(memory.dtype, copy=False)], axis=2)


def last(x: np.ndarray, count: int) -> np.ndarray:
    """The last ``count`` entries along the sequence axis (none for ``count = 0``)."""
    return x[:, :, x.shape[2] - min(count, x.shape[2]):]


def gather_segments(parts: list[np.ndarray | None]) -> np.ndarray | None:
    """Per-step results, joined along the sequence axis (None when the steps define none)."""
    return None if parts[0] is None else np.concatenate(parts, axis=2)


# --------------------------------------------------------------------------
# One attention step by another registered mechanism.
# --------------------------------------------------------------------------


def checked_inputs(name: str, arguments: dict):
    """Mechanism ``name`` and its checked inputs for ``arguments`` (its public defaults filling the rest)."""
    mechanism = registry.get(name)
    defaults = {
        p.name: p.default for p in inspect.signature(mechanism.forward).parameters.values()
        if p.default is not inspect.Parameter.empty and p.name not in registry.DISPATCH_ARGUMENTS
    }  # fmt: skip
    return mechanism, mechanism.check_inputs(**{**defaults, **arguments})


def checked_dense(q, k, v, *, causal: bool, window, scale: float) -> DenseInputs:
    """Dense attention's checked inputs for one step, built without checking again.

    Only for arrays that are slices and concatenations of a stream its
    mechanism's ``check_inputs`` has already checked whole, the score range
    (:func:`refattn.core.checks.scores_within_range`) of its queries against
    every key it can read included: checking each step again would cost as
    much as the step's attention (rows of 2560 keys at every 512 queries).
    """
    b, hq, nq, d = q.shape
    shape = checks.AttentionShape(b, hq, k.shape[1], nq, k.shape[2], d, v.shape[3])
    return DenseInputs(q, k, v, shape, None, None, causal, "bottom_right", window, scale, 0.0, None, 0.0)


def attend(name: str, num: Numerics | None, backend: str, inputs=None, **arguments) -> Result:
    """Mechanism ``name``'s forward on ``backend`` (``num`` for the reference), its result in its own dtype.

    ``inputs``: its checked inputs when the caller has them (:func:`checked_dense`); else ``arguments``
    are checked by its ``check_inputs``.
    """
    mechanism, inputs = (registry.get(name), inputs) if inputs is not None else checked_inputs(name, arguments)
    module = mechanism.backend(backend)
    return module.forward(inputs, num) if backend == registry.REFERENCE else module.forward(inputs)


def attend_vjp(name: str, num: Numerics | None, backend: str, dout, dlse, inputs=None, **arguments) -> Grads:
    """Mechanism ``name``'s VJP on ``backend`` for the cotangents ``dout`` and ``dlse`` (None: 0); ``inputs``
    as :func:`attend`."""
    mechanism, inputs = (registry.get(name), inputs) if inputs is not None else checked_inputs(name, arguments)
    module = mechanism.backend(backend)
    cotangents = Cotangents(dout=dout, dlse=dlse)
    return module.vjp(inputs, cotangents, num) if backend == registry.REFERENCE else module.vjp(inputs, cotangents)


def rows(x: np.ndarray | None, part: slice) -> np.ndarray | None:
    """``x[:, :, part]`` (None stays None): a segment's slice of a cotangent."""
    return None if x is None else x[:, :, part]


def einsum_operand(x: np.ndarray) -> np.ndarray:
    """``x`` as NumPy's einsum takes it: bfloat16 (an ml_dtypes type einsum has no loop for) widened to float32."""
    return x.astype(np.float32) if x.dtype == STORAGE_DTYPES["bfloat16"] else x


def kernel_numerics(q: np.ndarray) -> Numerics:
    """How a kernel backend computes a mechanism's own steps: in float32 for float32, float16 and
    bfloat16 inputs, float64 otherwise, rounding nothing further (the tiles' rule)."""
    narrow = q.dtype.name in ("float32", "float16", "bfloat16")
    dtype = np.dtype(np.float32 if narrow else np.float64)
    return Numerics(dtype.name, dtype, dtype)


@dataclass(frozen=True)
class StreamInputs:
    """The checked stream every mechanism here has: q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv)
    in the caller's dtype, and their sizes. Each mechanism's inputs add its state and options."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    shape: checks.AttentionShape

    def cotangent_shapes(self) -> dict:
        """``dout`` (B, Hq, N, Dv) and ``dlse`` (B, Hq, N)."""
        s = self.shape
        return {"dout": (s.batch, s.q_heads, s.q_len, s.value_dim), "dlse": (s.batch, s.q_heads, s.q_len)}


def step_length(q) -> int:
    """A step function's segment length: all of its queries (1 when ``q`` is not a 4-D array, which
    the whole-sequence function's check then rejects)."""
    return q.shape[2] if isinstance(q, np.ndarray) and q.ndim == 4 else 1


def as_step(result: Result) -> tuple[dict, Result]:
    """A whole-sequence result as a step's ``(state, out)``: the final state, and out and lse alone."""
    return dict(result.aux), Result(out=result.out, lse=result.lse, aux={})
