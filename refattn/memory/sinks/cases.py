"""Conformance cases for attention sinks: token-by-token and chunked streams that overflow the cache,
with RoPE positions by cache slot and by stream position."""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, draw, make_case, normal
from ..flags import quote

FLAGS = quote("STREAM_STATE", "SINK_POSITIONS", "SINK_EVICTION", "GRADIENT_THROUGH_MEMORY")


def _cache(length: int, first_position: int):
    """An initial cache of ``length`` tokens: 2 sinks at 0, 1 and the rest ending at ``first_position - 1``."""
    positions = np.r_[0:2, first_position - (length - 2):first_position]
    return {"cache_k": normal(lambda d: (d.b, d.hkv, length, d.d)),
            "cache_v": normal(lambda d: (d.b, d.hkv, length, d.dv or d.d)),
            "cache_positions": lambda rng, dims: positions.astype(np.int64)}  # fmt: skip


def _case(name, description, flags, dims, extra=None, **params) -> Case:
    return make_case("sinks", name, description, flags, draw(dims, extra or {}), params=params)


def cases() -> list[Case]:
    return [
        _case("decode_cache_positions", "Token by token over 12 tokens, 2 sinks + 4 recent, RoPE at cache slots.",
              ("SINK_POSITIONS", "SINK_EVICTION", "GRADIENT_THROUGH_MEMORY"), Dims(1, 2, 2, 12, 12, 8),
              sink_count=2, recent_size=4, positions="cache"),
        _case("decode_original_positions", "The same stream with RoPE at stream positions: one pass under "
              "j <= i and (j < 2 or j >= i - 4).", ("SINK_POSITIONS", "SINK_EVICTION"), Dims(1, 2, 2, 12, 12, 8),
              sink_count=2, recent_size=4, positions="original"),
        _case("chunks_gqa", "Chunks of 3 over 11 tokens, GQA 4:2, 1 sink + 3 recent, cache slots, half rotary dims.",
              ("SINK_POSITIONS", "SINK_EVICTION", "GQA_HEAD_MAP"), Dims(1, 4, 2, 11, 11, 8), segment_len=3,
              sink_count=1, recent_size=3, positions="cache", rotary_dim=4),
        _case("state_in_out", "From a full cache of 6 (sinks 0, 1; recent 16..19): 5 more tokens at 20..24.",
              ("STREAM_STATE", "SINK_POSITIONS"), Dims(1, 2, 1, 5, 5, 8), _cache(6, 20), sink_count=2, recent_size=4,
              segment_len=2, positions="original"),
        _case("no_sinks", "sink_count 0, recent 3: a plain rolling cache, cache slots.", ("SINK_EVICTION",),
              Dims(1, 2, 2, 9, 9, 8), sink_count=0, recent_size=3, positions="cache"),
    ]  # fmt: skip
