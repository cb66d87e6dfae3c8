"""Conformance cases for memory tokens (RMT): several segments, memory carried by the write tokens,
both position conventions and both masks."""

from __future__ import annotations

from ...conformance.case import Case, Dims, draw, make_case, normal
from ..flags import quote

FLAGS = quote("STREAM_STATE", "MEMORY_TOKEN_POSITIONS", "MEMORY_TOKEN_MASK", "GRADIENT_THROUGH_MEMORY")


def _memory(tokens: int):
    """The initial memory (B, m, Hq * Dv) and the projections (E, H, D)."""
    width = lambda d: d.hq * (d.dv or d.d)  # noqa: E731
    return {"memory": normal(lambda d: (d.b, tokens, width(d))),
            "w_q": normal(lambda d: (width(d), d.hq, d.d), 0.3), "w_k": normal(lambda d: (width(d), d.hkv, d.d), 0.3),
            "w_v": normal(lambda d: (width(d), d.hkv, d.dv or d.d), 0.3)}  # fmt: skip


def _case(name, description, flags, dims, tokens, **params) -> Case:
    return make_case("memory_tokens", name, description, flags, draw(dims, _memory(tokens)), params=params,
                     differentiable=("q", "k", "v", "w_q", "w_k", "w_v"))  # fmt: skip


def cases() -> list[Case]:
    return [
        _case("sequential_causal", "Paper positions and causal mask: 2 memory tokens, 3 segments of 4.",
              ("STREAM_STATE", "MEMORY_TOKEN_POSITIONS", "GRADIENT_THROUGH_MEMORY"), Dims(1, 2, 2, 12, 12, 8), 2,
              segment_len=4),
        _case("lucidrains_positions", "lucidrains' rotary offset: memory tokens at 0, segment at 10000 + t.",
              ("MEMORY_TOKEN_POSITIONS",), Dims(1, 2, 2, 8, 8, 8), 2, segment_len=4, positions="lucidrains"),
        _case("memory_not_causal", "lucidrains' memory_not_causal mask, GQA 4:2, 3 memory tokens, 2 segments of 3.",
              ("MEMORY_TOKEN_MASK", "GQA_HEAD_MAP"), Dims(1, 4, 2, 6, 6, 8), 3, segment_len=3,
              memory_mask="memory_not_causal"),
    ]  # fmt: skip
