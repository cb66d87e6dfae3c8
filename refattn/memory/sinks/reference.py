"""Attention sinks (StreamingLLM): the executable specification.

Xiao, Tian, Chen, Han and Lewis 2024, "Efficient Streaming Language Models
with Attention Sinks", Sec. 3, in the form of the authors' code
(mit-han-lab/streaming-llm, ``streaming_llm/kv_cache.py``
``StartRecentKVCache.__call__`` and ``streaming_llm/pos_shift/modify_llama.py``
``llama_pos_shift_attention_forward``). The key/value cache keeps the first
``sink_count`` tokens of the stream (the sinks) and the ``recent_size`` most
recent ones; everything between is evicted. Keys are cached *before* RoPE.

Positions are an explicit choice (``positions``):

* ``"cache"`` (the paper's Sec. 3.2 and the code's pos-shift): every key is
  rotated at its slot in the cache, ``0 .. n_cache - 1``, and the queries of a
  step at ``n_cache + i``; distances are cache distances.
* ``"original"``: every token keeps its position in the stream. Streaming then
  equals one full pass with the mask ``j <= i and (j < s or j >= c(i) - w)``,
  ``c(i)`` the first token of query i's step (spec/memory.md).

Steps (S1)-(S4) match spec/memory.md. Array letters: b batch, h head, n token,
d head dim.
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

STATE = ("cache_k", "cache_v", "cache_positions")
POSITIONS = ("cache", "original")


@dataclass(frozen=True)
class SinkInputs(streaming.StreamInputs):
    """Checked q (B, Hq, N, D), k, v, the initial cache and the options."""

    sink_count: int
    recent_size: int
    segment_len: int
    positions: str
    cache_k: np.ndarray  # (B, Hkv, n, D), n <= sink_count + recent_size, unrotated
    cache_v: np.ndarray  # (B, Hkv, n, Dv)
    cache_positions: np.ndarray  # (n,) int64, each cached token's position in the stream
    rope: RopeParams
    scale: float

    @property
    def cache_size(self) -> int:
        return self.sink_count + self.recent_size


def check_sink_inputs(q, k, v, *, sink_count, recent_size, segment_len, positions, cache_k, cache_v,
                      cache_positions, rotary_dim, rope_base, rope_layout, scale) -> SinkInputs:  # fmt: skip
    """Check every argument of ``sink_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = streaming.self_attention_shape(q, k, v)
    sink_count = streaming.integer(sink_count, "sink_count", 0)
    recent_size = streaming.integer(recent_size, "recent_size", 0)
    segment_len = streaming.segment_length(segment_len, shape.q_len, equal=False)
    positions = checks.choice(positions, "positions", POSITIONS)
    cache_k, cache_v = streaming.memory_pair(cache_k, cache_v, STATE[:2], shape, sink_count + recent_size)
    if cache_positions is None:
        if cache_k.shape[2]:
            raise SpecError("cache_positions", f"{cache_k.shape[2]} positions, one per cached token", "None")
        cache_positions = np.zeros(0, np.int64)
    elif cache_k.shape[2] == 0:
        raise SpecError("cache_positions", "None with an empty cache", checks.summary(cache_positions))
    else:
        cache_positions = checks.positions(cache_positions, "cache_positions", cache_k.shape[2])
        if np.any(np.diff(cache_positions) <= 0):
            raise SpecError("cache_positions", "increasing positions (the cache keeps stream order)",
                            checks.summary(cache_positions))  # fmt: skip
    rope = check_rope_params(rotary_dim, rope_base, 1.0, rope_layout, shape.head_dim)
    scale = checks.scale(scale, shape.head_dim)
    return SinkInputs(q, k, v, shape, sink_count, recent_size, segment_len, positions, cache_k, cache_v,
                      cache_positions, rope, scale)  # fmt: skip


def sink_attention(
    q, k, v, *,
    sink_count, recent_size, segment_len=1, positions="cache", cache_k=None, cache_v=None, cache_positions=None,
    rotary_dim=None, rope_base=10000.0, rope_layout="half",
    scale=None, precision=None, backend="reference") -> Result:
    """Stream ``q, k, v`` through a cache of attention sinks and recent tokens (StreamingLLM).

    Parameters
    ----------
    q : ndarray (B, Hq, N, D)
    k : ndarray (B, Hkv, N, D)
        Keys before RoPE (they are cached unrotated).
    v : ndarray (B, Hkv, N, Dv)
    sink_count : int >= 0
        ``s``, the first tokens of the stream kept for ever (StreamingLLM's ``start_size``).
    recent_size : int >= 0
        ``w``, the most recent tokens kept (``recent_size``).
    segment_len : int >= 1
        Tokens per step; 1 is token-by-token decoding (the code's evaluation).
    positions : {"cache", "original"}
        RoPE positions: slots in the cache (StreamingLLM) or positions in the stream.
    cache_k, cache_v : ndarray (B, Hkv, n, D), (B, Hkv, n, Dv), ``n <= s + w``, optional
        The initial cache, unrotated (a previous call's ``aux``); None: empty.
    cache_positions : int ndarray (n,), optional
        Stream position of each cached token, increasing; the stream goes on at
        ``cache_positions[-1] + 1`` (0 without a cache).
    rotary_dim, rope_base, rope_layout
        RoPE's ``rotary_dim`` (None: D), ``base`` and ``layout`` (refattn.position.rope).
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv), ``lse`` (B, Hq, N); ``aux`` the final state
        ``cache_k``, ``cache_v`` (unrotated) and ``cache_positions``.
    """
    return registry.call_forward("sinks", locals())


sink_attention_vjp = registry.vjp_function(
    sink_attention, "sinks", grads="""    ``q``, ``k``, ``v``: each step's gradient with its incoming cache held
    fixed (stop-gradient), summed over the steps: a key gets gradient only
    from the queries of its own step. The initial cache gets none.""",
)


def sink_step(state, q, k, v, *, sink_count, recent_size, positions="cache", rotary_dim=None, rope_base=10000.0,
              rope_layout="half", scale=None, precision=None, backend="reference") -> tuple[dict, Result]:  # fmt: skip
    """One step: ``state, out = sink_step(state, q, k, v, ...)``; ``state`` is a previous ``aux`` or None."""
    cache = state or {}
    result = sink_attention(
        q, k, v, sink_count=sink_count, recent_size=recent_size,
        segment_len=streaming.step_length(q), positions=positions,
        cache_k=cache.get("cache_k"), cache_v=cache.get("cache_v"), cache_positions=cache.get("cache_positions"),
        rotary_dim=rotary_dim, rope_base=rope_base, rope_layout=rope_layout, scale=scale, precision=precision,
        backend=backend,
    )  # fmt: skip
    return streaming.as_step(result)


# --------------------------------------------------------------------------
# The steps, for any backend of the inner attention.
# --------------------------------------------------------------------------


def _steps(x: SinkInputs):
    """Yield, per step, the segment, the step's keys and values, the cache length, the RoPE attention's
    options and the cache the step leaves."""
    cache = {"cache_k": x.cache_k, "cache_v": x.cache_v, "cache_positions": x.cache_positions}
    first = int(x.cache_positions[-1]) + 1 if x.cache_positions.size else 0
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        n, c = segment.stop - segment.start, cache["cache_k"].shape[2]
        stream_positions = first + np.arange(segment.start, segment.stop)  # (n,)
        # (S1) The step's keys and values: the cache, then the segment (all unrotated).
        keys = streaming.extend(cache["cache_k"], x.k[:, :, segment])  # (B, Hkv, c + n, D)
        values = streaming.extend(cache["cache_v"], x.v[:, :, segment])  # (B, Hkv, c + n, Dv)
        key_positions = np.concatenate([cache["cache_positions"], stream_positions])  # (c + n,)
        # (S2) RoPE positions: cache slots, or stream positions.
        if x.positions == "cache":
            q_pos, k_pos = c + np.arange(n), np.arange(c + n)
        else:
            q_pos, k_pos = stream_positions, key_positions
        options = dict(q_positions=q_pos, k_positions=k_pos, rotary_dim=x.rope.rotary_dim, base=x.rope.base,
                       layout=x.rope.layout, causal=True, causal_alignment="bottom_right", scale=x.scale)  # fmt: skip
        # (S4) Evict: keep the first s and the last w of [cache, segment] once they exceed s + w.
        kept = np.arange(c + n)
        if c + n > x.cache_size:
            kept = np.r_[0 : x.sink_count, c + n - x.recent_size : c + n]
        cache = {"cache_k": keys[:, :, kept], "cache_v": values[:, :, kept], "cache_positions": key_positions[kept]}
        yield segment, keys, values, c, options, cache


def stream(x: SinkInputs, num: Numerics | None, backend: str) -> Result:
    """Steps (S1)-(S4) over every segment; (S3) is RoPE attention, causal bottom-right, on ``backend``."""
    outs, lses = [], []
    for segment, keys, values, _, options, cache in _steps(x):
        # (S3) Causal RoPE attention of the segment over the cache and itself.
        result = streaming.attend("rope", num, backend, q=x.q[:, :, segment], k=keys, v=values, **options)
        outs.append(result.out)
        lses.append(result.lse)
    return Result(out=np.concatenate(outs, axis=2), lse=np.concatenate(lses, axis=2), aux=cache)


def stream_vjp(x: SinkInputs, cotangents: Cotangents, num: Numerics | None, backend: str) -> Grads:
    """(S3') per step with the incoming cache held fixed; the cache's share of dk, dv is dropped."""
    dq, dk, dv = [], [], []
    for segment, keys, values, c, options, _ in _steps(x):
        grads = streaming.attend_vjp("rope", num, backend, streaming.rows(cotangents.dout, segment),
                                     streaming.rows(cotangents.dlse, segment), q=x.q[:, :, segment], k=keys,
                                     v=values, **options)  # fmt: skip
        dq.append(grads["q"])
        dk.append(grads["k"][:, :, c:])
        dv.append(grads["v"][:, :, c:])
    return Grads(q=np.concatenate(dq, axis=2), k=np.concatenate(dk, axis=2), v=np.concatenate(dv, axis=2))


def forward(x: SinkInputs, num: Numerics) -> Result:
    """The reference backend: (S1)-(S4) with RoPE attention's reference in precision ``num``."""
    return stream(x, num, registry.REFERENCE)


def vjp(x: SinkInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP in precision ``num``."""
    return stream_vjp(x, cotangents, num, registry.REFERENCE)
