"""Transformer-XL segment-level recurrence: the executable specification.

Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a
Fixed-Length Context", Sec. 3.2, in the form of the authors' code
(kimiyoung/transformer-xl, ``pytorch/mem_transformer.py``,
``MemTransformerLM._forward`` and ``_update_mems``). The sequence is cut into
segments of ``segment_len`` tokens; each segment's queries attend over the
memory (the keys and values of the last ``mem_len`` tokens before it, held
without gradient) and over the segment itself, causally. The memory then
becomes the last ``mem_len`` of ``[memory, segment]``.

With an empty initial memory this is exactly one pass over the whole sequence
with the mask ``j <= i and j >= L * floor(i / L) - M`` (spec/memory.md,
"Streaming equals the full pass"); ``same_length`` turns it into a window of
``M`` tokens. Scores are dense attention's, or Transformer-XL's relative
scores (refattn.position.transformer_xl) when ``r`` is given.

Steps (X1)-(X4) match spec/memory.md. Array letters: b batch, h head, n token,
d head dim, e value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...position.transformer_xl.inputs import check_transformer_xl_inputs
from .. import streaming

STATE = ("memory_k", "memory_v")


@dataclass(frozen=True)
class XLRecurrenceInputs(streaming.StreamInputs):
    """Checked q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), the initial memory and the options."""

    segment_len: int
    mem_len: int
    memory_k: np.ndarray  # (B, Hkv, m, D), m <= mem_len (0: empty)
    memory_v: np.ndarray  # (B, Hkv, m, Dv)
    same_length: bool
    relative: dict | None  # {"r": (Hq, R, D), "u": (Hq, D), "v_bias": (Hq, D)}, or None for dense scores
    scale: float


def check_xl_recurrence_inputs(q, k, v, *, segment_len, mem_len, memory_k, memory_v, same_length,
                               hf_zero_memory, r, u, v_bias, scale) -> XLRecurrenceInputs:  # fmt: skip
    """Check every argument of ``xl_recurrence_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = streaming.self_attention_shape(q, k, v)
    segment_len = streaming.segment_length(segment_len, shape.q_len, equal=False)
    mem_len = streaming.integer(mem_len, "mem_len", 0)
    same_length = checks.flag(same_length, "same_length")
    if same_length and mem_len == 0:
        raise SpecError("mem_len", "at least 1 with same_length (a window of mem_len tokens; the original masks "
                        "every key when mem_len = 0)", "0")  # fmt: skip
    if checks.flag(hf_zero_memory, "hf_zero_memory"):
        if memory_k is not None or memory_v is not None:
            raise SpecError("hf_zero_memory", "False when an initial memory is given", "True")
        memory_k = np.zeros((shape.batch, shape.kv_heads, mem_len, shape.head_dim), q.dtype)
        memory_v = np.zeros((shape.batch, shape.kv_heads, mem_len, shape.value_dim), q.dtype)
    memory_k, memory_v = streaming.memory_pair(memory_k, memory_v, STATE, shape, mem_len)
    relative = None
    if r is not None or u is not None or v_bias is not None:
        # Transformer-XL's own check of the tables, on the largest step: a full memory and a full segment.
        longest = min(segment_len, shape.q_len) + mem_len
        tables = check_transformer_xl_inputs(
            q[:, :, :1], k[:, :, :1], v[:, :, :1], r=r, u=u, v_bias=v_bias,
            q_positions=np.zeros(1, np.int64), k_positions=np.zeros(1, np.int64), mask=None, bias=None,
            causal=False, causal_alignment="bottom_right", window=None, scale=scale, softcap=0.0,
            dropout_keep=None, dropout_p=0.0,
        )  # fmt: skip
        if tables.n_rows < longest:
            raise SpecError("r", f"at least segment_len + mem_len = {longest} rows (one per distance a step "
                            "can see)", f"{tables.n_rows} rows")  # fmt: skip
        relative = {"r": tables.r, "u": tables.u, "v_bias": tables.v_bias}
    scale = checks.scale(scale, shape.head_dim)
    # Every score a step can form: each query against the initial memory and the stream (steps are not checked again).
    checks.scores_within_range(q, np.concatenate([memory_k, k.astype(memory_k.dtype, copy=False)], axis=2), scale,
                               "q, memory_k and k")  # fmt: skip
    return XLRecurrenceInputs(q, k, v, shape, segment_len, mem_len, memory_k, memory_v, same_length, relative, scale)


def xl_recurrence_attention(
    q, k, v, *,
    segment_len, mem_len, memory_k=None, memory_v=None, same_length=False, hf_zero_memory=False, r=None, u=None,
    v_bias=None,
    scale=None, precision=None, backend="reference") -> Result:
    """Stream ``q, k, v`` through Transformer-XL's segment recurrence: the outputs of every step, and the final memory.

    Parameters
    ----------
    q : ndarray (B, Hq, N, D)
    k : ndarray (B, Hkv, N, D)
        The stream's own keys, one per query (``Hq % Hkv == 0``).
    v : ndarray (B, Hkv, N, Dv)
    segment_len : int >= 1
        ``L``, tokens per step; the last segment may be shorter.
    mem_len : int >= 0
        ``M``, how many past keys and values the memory holds.
    memory_k, memory_v : ndarray (B, Hkv, m, D), (B, Hkv, m, Dv), ``m <= M``, optional
        The initial memory (a previous call's ``aux``); None: empty.
    same_length : bool
        The original's ``same_length``: every query sees exactly its last ``M``
        tokens (itself included) instead of the whole memory; needs ``M >= 1``.
    hf_zero_memory : bool
        Start from ``M`` zero keys and values, as HF ``TransfoXLModel.init_mems``
        does (zero hidden states, bias-free projections). Not equivalent to the
        full pass: the zero keys take weight in the first segments.
    r, u, v_bias : ndarray (Hq, R, D), (Hq, D), (Hq, D), optional
        Transformer-XL relative scores (refattn.position.transformer_xl); ``R``
        at least ``L + M``. None: plain dense scores.
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv), ``lse`` (B, Hq, N); ``aux`` the final state
        ``memory_k`` (B, Hkv, min(M, m + N), D) and ``memory_v``.
    """
    return registry.call_forward("xl_recurrence", locals())


xl_recurrence_attention_vjp = registry.vjp_function(
    xl_recurrence_attention, "xl_recurrence", grads="""    ``q``, ``k``, ``v`` (the stream's shapes) and, with relative scores,
    ``r``, ``u``, ``v_bias``: each step's gradient with its incoming memory
    held fixed (stop-gradient, as the original's ``_update_mems`` runs under
    ``no_grad``), summed over the steps. A key therefore gets gradient only
    from the queries of its own segment; the initial memory gets none.""",
)


def xl_recurrence_step(state, q, k, v, *, mem_len, same_length=False, r=None, u=None, v_bias=None, scale=None,
                       precision=None, backend="reference") -> tuple[dict, Result]:  # fmt: skip
    """One step: ``state, out = xl_recurrence_step(state, q, k, v, ...)`` for one segment.

    ``state`` is ``{"memory_k": ..., "memory_v": ...}`` or None (empty); the
    segment is the whole of ``q, k, v``. The same as
    :func:`xl_recurrence_attention` with ``segment_len`` the segment's length.
    """
    memory = state or {}
    result = xl_recurrence_attention(
        q, k, v, segment_len=streaming.step_length(q), mem_len=mem_len,
        memory_k=memory.get("memory_k"), memory_v=memory.get("memory_v"), same_length=same_length,
        r=r, u=u, v_bias=v_bias, scale=scale, precision=precision, backend=backend,
    )  # fmt: skip
    return streaming.as_step(result)


# --------------------------------------------------------------------------
# The steps, for any backend of the inner attention.
# --------------------------------------------------------------------------


def _step_attention(x: XLRecurrenceInputs, q, keys, values, memory_len: int) -> tuple[str, dict]:
    """(X2) The attention of one step: the inner mechanism and its arguments.

    Query ``i`` of the segment sits after the ``m`` memory entries, so
    ``causal`` bottom-right alignment lets it see the memory and the segment
    up to itself (the original's ``triu(ones, 1 + mlen)`` masks the rest);
    ``same_length`` adds the window of ``M`` keys, itself included.
    """
    n = q.shape[2]
    window = (x.mem_len - 1, 0) if x.same_length else None
    if x.relative is None:  # the stream was checked whole (check_xl_recurrence_inputs)
        return "dense", dict(inputs=streaming.checked_dense(q, keys, values, causal=True, window=window, scale=x.scale))
    # Relative scores: queries at m + i, keys at 0 .. m + n - 1, as the original's pos_seq.
    positions = dict(q_positions=memory_len + np.arange(n), k_positions=np.arange(memory_len + n))
    return "transformer_xl", dict(q=q, k=keys, v=values, causal=True, causal_alignment="bottom_right", scale=x.scale,
                                  window=window, **positions, **x.relative)  # fmt: skip


def stream(x: XLRecurrenceInputs, num: Numerics | None, backend: str) -> Result:
    """Steps (X1)-(X4) over every segment, the attention on ``backend``."""
    memory_k, memory_v = x.memory_k, x.memory_v  # (B, Hkv, m, D), (B, Hkv, m, Dv)
    outs, lses = [], []
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        # (X1) Keys and values of the step: the memory, then the segment.
        keys = streaming.extend(memory_k, x.k[:, :, segment])  # (B, Hkv, m + n, D)
        values = streaming.extend(memory_v, x.v[:, :, segment])  # (B, Hkv, m + n, Dv)
        # (X2)-(X3) Causal attention of the segment's queries over them.
        name, options = _step_attention(x, x.q[:, :, segment], keys, values, memory_k.shape[2])
        result = streaming.attend(name, num, backend, **options)
        outs.append(result.out)
        lses.append(result.lse)
        # (X4) The next memory: the last M of [memory, segment] (no gradient flows through it).
        memory_k, memory_v = streaming.last(keys, x.mem_len), streaming.last(values, x.mem_len)
    return Result(out=np.concatenate(outs, axis=2), lse=np.concatenate(lses, axis=2),
                  aux={"memory_k": memory_k, "memory_v": memory_v})  # fmt: skip


def stream_vjp(x: XLRecurrenceInputs, cotangents: Cotangents, num: Numerics | None, backend: str) -> Grads:
    """(X4')-(X1') per step with the incoming memory held fixed, summed over the steps."""
    memory_k, memory_v = x.memory_k, x.memory_v
    dq, dk, dv = [], [], []
    tables = {name: 0.0 for name in (x.relative or {})}
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        keys = streaming.extend(memory_k, x.k[:, :, segment])
        values = streaming.extend(memory_v, x.v[:, :, segment])
        name, options = _step_attention(x, x.q[:, :, segment], keys, values, memory_k.shape[2])
        grads = streaming.attend_vjp(name, num, backend, streaming.rows(cotangents.dout, segment),
                                     streaming.rows(cotangents.dlse, segment), **options)  # fmt: skip
        # The memory's share of dk, dv is dropped: the memory is a constant of the step.
        m = memory_k.shape[2]
        dq.append(grads["q"])
        dk.append(grads["k"][:, :, m:])
        dv.append(grads["v"][:, :, m:])
        for table in tables:
            tables[table] = tables[table] + np.asarray(grads[table], np.float64)
        memory_k, memory_v = streaming.last(keys, x.mem_len), streaming.last(values, x.mem_len)
    return Grads(q=np.concatenate(dq, axis=2), k=np.concatenate(dk, axis=2), v=np.concatenate(dv, axis=2), **tables)


def forward(x: XLRecurrenceInputs, num: Numerics) -> Result:
    """The reference backend: (X1)-(X4) with the reference attention in precision ``num``."""
    return stream(x, num, registry.REFERENCE)


def vjp(x: XLRecurrenceInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP in precision ``num``."""
    return stream_vjp(x, cotangents, num, registry.REFERENCE)
