"""Memory tokens, the Recurrent Memory Transformer: the executable specification.

Bulatov, Kuratov and Burtsev 2022, "Recurrent Memory Transformer", Sec. 3:
each segment is wrapped as ``[read memory, segment, write memory]``; the read
and the write tokens both carry the memory (``H̃ = [H_mem ∘ H ∘ H_mem]``), and
the outputs at the write positions become the next segment's memory. At one
attention layer the memory is ``m`` vectors of width ``E = Hq · Dv`` (the
layer's output, heads side by side); projections ``w_q``, ``w_k``, ``w_v`` turn
them into the memory tokens' queries, keys and values.

Two choices are explicit:

* ``positions`` (RoPE positions of the wrapped segment): ``"sequential"``, the
  paper's ``0 .. 2m + L - 1`` in order; or ``"lucidrains"``, the offset of
  lucidrains/recurrent-memory-transformer-pytorch
  (``RecurrentMemoryTransformer.forward``): memory tokens at 0 and segment
  tokens at ``10000 + t``.
* ``memory_mask``: ``"causal"`` over the wrapped segment (the paper's decoder),
  or ``"memory_not_causal"`` (the same function's default): read tokens see
  each other, segment tokens see every read token and the segment causally,
  write tokens see everything.

Steps (T1)-(T5) match spec/memory.md. Array letters: b batch, h head, m memory
token, n token, d head dim, e memory width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...position.rope.reference import RopeParams, check_rope_params
from .. import streaming

STATE = ("memory",)
POSITIONS = ("sequential", "lucidrains")
MEMORY_MASKS = ("causal", "memory_not_causal")
#: lucidrains' offset of the segment's rotary positions (``mem_rel_dist``).
LUCIDRAINS_OFFSET = 10000


@dataclass(frozen=True)
class MemoryTokenInputs(streaming.StreamInputs):
    """Checked q (B, Hq, N, D), k, v, the memory (B, m, E), its projections and the options."""

    segment_len: int
    memory: np.ndarray  # (B, m, E), E = Hq * Dv
    w_q: np.ndarray  # (E, Hq, D)
    w_k: np.ndarray  # (E, Hkv, D)
    w_v: np.ndarray  # (E, Hkv, Dv)
    positions: str
    memory_mask: str
    rope: RopeParams
    scale: float


def check_memory_token_inputs(q, k, v, *, segment_len, memory, w_q, w_k, w_v, positions, memory_mask, rotary_dim,
                              rope_base, scale) -> MemoryTokenInputs:  # fmt: skip
    """Check every argument of ``memory_token_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, s = streaming.self_attention_shape(q, k, v)
    segment_len = streaming.segment_length(segment_len, s.q_len, equal=True)
    width = s.q_heads * s.value_dim
    if not isinstance(memory, np.ndarray) or memory.ndim != 3 or memory.shape[0] != s.batch or memory.shape[1] < 1 \
            or memory.shape[2] != width:  # fmt: skip
        raise SpecError("memory", f"shape (B, m, Hq * Dv) = ({s.batch}, m >= 1, {width})", checks.summary(memory))
    memory = checks.float_array(memory, "memory")
    weights = {}
    for name, x, heads, dim in (("w_q", w_q, s.q_heads, s.head_dim), ("w_k", w_k, s.kv_heads, s.head_dim),
                                ("w_v", w_v, s.kv_heads, s.value_dim)):  # fmt: skip
        if not isinstance(x, np.ndarray) or x.shape != (width, heads, dim):
            raise SpecError(name, f"shape (E, H, D) = ({width}, {heads}, {dim})", checks.summary(x))
        weights[name] = checks.float_array(x, name)
    return MemoryTokenInputs(
        q, k, v, s, segment_len, memory, **weights,
        positions=checks.choice(positions, "positions", POSITIONS),
        memory_mask=checks.choice(memory_mask, "memory_mask", MEMORY_MASKS),
        rope=check_rope_params(rotary_dim, rope_base, 1.0, "half", s.head_dim),
        scale=checks.scale(scale, s.head_dim),
    )  # fmt: skip


def memory_token_attention(
    q, k, v, *,
    segment_len, memory, w_q, w_k, w_v, positions="sequential", memory_mask="causal", rotary_dim=None,
    rope_base=10000.0,
    scale=None, precision=None, backend="reference") -> Result:
    """Stream ``q, k, v`` through read/write memory tokens (RMT) at one attention layer.

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, Dv)
    segment_len : int >= 1
        ``L``; must divide ``N`` (every wrapped segment has ``2m + L`` tokens).
    memory : ndarray (B, m, E), ``E = Hq * Dv``
        The initial memory (the learned memory embedding, or a previous ``aux``).
    w_q, w_k, w_v : ndarray (E, Hq, D), (E, Hkv, D), (E, Hkv, Dv)
        Projections of the memory vectors to the memory tokens' q, k, v.
    positions : {"sequential", "lucidrains"}
        RoPE positions of the wrapped segment (module docstring).
    memory_mask : {"causal", "memory_not_causal"}
        The wrapped segment's mask (module docstring).
    rotary_dim, rope_base
        RoPE's ``rotary_dim`` (None: D) and ``base``, layout ``"half"``.
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv) and ``lse`` (B, Hq, N) of the segment tokens;
        ``aux`` the final ``memory`` (B, m, E): the last write tokens' outputs.
    """
    return registry.call_forward("memory_tokens", locals())


memory_token_attention_vjp = registry.vjp_function(
    memory_token_attention, "memory_tokens", grads="""    ``q``, ``k``, ``v`` (the stream's shapes) and ``w_q``, ``w_k``, ``w_v``:
    each segment's gradient with its incoming memory held fixed
    (stop-gradient: no backpropagation through time), summed over the
    segments. The initial memory gets none.""",
)


def memory_token_step(state, q, k, v, *, w_q, w_k, w_v, positions="sequential", memory_mask="causal",
                      rotary_dim=None, rope_base=10000.0, scale=None, precision=None, backend="reference"):  # fmt: skip
    """One segment: ``state, out = memory_token_step(state, q, k, v, ...)``; ``state`` is ``{"memory": (B, m, E)}``."""
    result = memory_token_attention(
        q, k, v, segment_len=streaming.step_length(q), memory=state["memory"],
        w_q=w_q, w_k=w_k, w_v=w_v, positions=positions, memory_mask=memory_mask, rotary_dim=rotary_dim,
        rope_base=rope_base, scale=scale, precision=precision, backend=backend,
    )  # fmt: skip
    return streaming.as_step(result)


# --------------------------------------------------------------------------
# The wrapped segment.
# --------------------------------------------------------------------------


def wrapped_positions(m: int, n: int, positions: str) -> np.ndarray:
    """(T2) RoPE positions of ``[read (m), segment (n), write (m)]``."""
    if positions == "sequential":
        return np.arange(2 * m + n)
    return np.concatenate([np.zeros(m, np.int64), LUCIDRAINS_OFFSET + np.arange(n), np.zeros(m, np.int64)])


def wrapped_mask(m: int, n: int, memory_mask: str) -> np.ndarray:
    """(T3) The (2m + n, 2m + n) mask of the wrapped segment, True = may attend."""
    total = 2 * m + n
    mask = np.tril(np.ones((total, total), bool))
    if memory_mask == "memory_not_causal":
        mask[:, :m] = True  # every token sees every read token
        mask[:m, m:] = False  # read tokens see only read tokens
        mask[m + n:, :] = True  # write tokens see everything
    return mask


def _wrapped(x: MemoryTokenInputs, memory: np.ndarray, segment: slice) -> dict:
    """(T1)-(T3) The wrapped segment's q, k, v and the RoPE attention's options."""
    m, n = memory.shape[1], segment.stop - segment.start
    # (T1) The memory tokens' q, k, v: the memory vectors projected, read and write alike.
    memory = streaming.einsum_operand(memory)
    qm, km, vm = (np.einsum("bme,ehd->bhmd", memory, streaming.einsum_operand(w), optimize=True)
                  for w in (x.w_q, x.w_k, x.w_v))  # fmt: skip
    wrap = lambda mem, seq: np.concatenate([mem, seq.astype(mem.dtype, copy=False), mem], axis=2)  # noqa: E731
    place = wrapped_positions(m, n, x.positions)
    return dict(q=wrap(qm, x.q[:, :, segment]), k=wrap(km, x.k[:, :, segment]), v=wrap(vm, x.v[:, :, segment]),
                mask=wrapped_mask(m, n, x.memory_mask), q_positions=place, k_positions=place,
                rotary_dim=x.rope.rotary_dim, base=x.rope.base, layout=x.rope.layout, scale=x.scale)  # fmt: skip


def stream(x: MemoryTokenInputs, num: Numerics | None, backend: str) -> Result:
    """Steps (T1)-(T5) over every segment; (T4) is RoPE attention on ``backend``."""
    memory = x.memory  # (B, m, E)
    m = memory.shape[1]
    outs, lses = [], []
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        n = segment.stop - segment.start
        # (T4) Attention over the wrapped segment.
        result = streaming.attend("rope", num, backend, **_wrapped(x, memory, segment))
        outs.append(result.out[:, :, m:m + n])
        lses.append(result.lse[:, :, m:m + n])
        # (T5) The write tokens' outputs, heads side by side, are the next memory.
        write = result.out[:, :, m + n:]  # (B, Hq, m, Dv)
        memory = write.transpose(0, 2, 1, 3).reshape(memory.shape)  # (B, m, Hq * Dv)
    return Result(out=np.concatenate(outs, axis=2), lse=np.concatenate(lses, axis=2), aux={"memory": memory})


def stream_vjp(x: MemoryTokenInputs, cotangents: Cotangents, num: Numerics | None, backend: str) -> Grads:
    """(T5')-(T1') per segment with the incoming memory held fixed, summed over the segments."""
    memory = x.memory
    m = memory.shape[1]
    dq, dk, dv = [], [], []
    dw = {"w_q": 0.0, "w_k": 0.0, "w_v": 0.0}
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        n = segment.stop - segment.start
        wrapped = _wrapped(x, memory, segment)
        forward_result = streaming.attend("rope", num, backend, **wrapped)
        # Cotangents of the wrapped outputs: the segment's; the read and write rows get none (stop-gradient).
        b, h, _, e = forward_result.out.shape
        dout = np.zeros((b, h, 2 * m + n, e), cotangents.dout.dtype)
        dout[:, :, m:m + n] = cotangents.dout[:, :, segment]
        dlse = None
        if cotangents.dlse is not None:
            dlse = np.zeros((b, h, 2 * m + n), cotangents.dlse.dtype)
            dlse[:, :, m:m + n] = cotangents.dlse[:, :, segment]
        grads = streaming.attend_vjp("rope", num, backend, dout, dlse, **wrapped)
        dq.append(grads["q"][:, :, m:m + n])
        dk.append(grads["k"][:, :, m:m + n])
        dv.append(grads["v"][:, :, m:m + n])
        # (T1') The memory tokens' rows (read and write) go to the projections.
        for name, key in (("w_q", "q"), ("w_k", "k"), ("w_v", "v")):
            rows = np.asarray(grads[key][:, :, :m], np.float64) + np.asarray(grads[key][:, :, m + n:], np.float64)
            dw[name] = dw[name] + np.einsum("bme,bhmd->ehd", memory.astype(np.float64), rows, optimize=True)
        write = forward_result.out[:, :, m + n:]
        memory = write.transpose(0, 2, 1, 3).reshape(memory.shape)
    return Grads(q=np.concatenate(dq, axis=2), k=np.concatenate(dk, axis=2), v=np.concatenate(dv, axis=2), **dw)


def forward(x: MemoryTokenInputs, num: Numerics) -> Result:
    """The reference backend: (T1)-(T5) with RoPE attention's reference in precision ``num``."""
    return stream(x, num, registry.REFERENCE)


def vjp(x: MemoryTokenInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP in precision ``num``."""
    return stream_vjp(x, cotangents, num, registry.REFERENCE)
