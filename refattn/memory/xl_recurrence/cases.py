"""Conformance cases for Transformer-XL segment recurrence: multi-segment runs (state in, outputs per
segment, state out), sizes chosen so that an off-by-one memory or a gradient through memory shows."""

from __future__ import annotations

from ...conformance.case import Case, Dims, draw, make_case, normal
from ..flags import quote

FLAGS = quote("STREAM_STATE", "MEMORY_MASK_OFF_BY_ONE", "GRADIENT_THROUGH_MEMORY", "MEMORY_ZERO_INIT", "SAME_LENGTH",
              "RELATIVE_MEMORY_POSITIONS")  # fmt: skip


def _memory(length: int):
    """Initial memory keys and values of ``length`` entries."""
    return {"memory_k": normal(lambda d: (d.b, d.hkv, length, d.d)),
            "memory_v": normal(lambda d: (d.b, d.hkv, length, d.dv or d.d))}  # fmt: skip


def _relative(rows: int):
    """Transformer-XL tables r (Hq, R, D), u, v_bias (Hq, D)."""
    return {"r": normal(lambda d: (d.hq, rows, d.d), 0.5), "u": normal(lambda d: (d.hq, d.d), 0.5),
            "v_bias": normal(lambda d: (d.hq, d.d), 0.5)}  # fmt: skip


def _case(name, description, flags, dims, extra=None, **params) -> Case:
    extra = extra or {}
    differentiable = ("q", "k", "v") + tuple(n for n in ("r", "u", "v_bias") if n in extra)
    return make_case("xl_recurrence", name, description, flags, draw(dims, extra), params=params,
                     differentiable=differentiable)  # fmt: skip


def cases() -> list[Case]:
    return [
        _case("empty_memory", "13 tokens in segments of 4 (last 1) with memory 3, from empty memory: one pass under "
              "j <= i and j >= 4*floor(i/4) - 3.", ("MEMORY_MASK_OFF_BY_ONE", "GRADIENT_THROUGH_MEMORY"),
              Dims(1, 2, 2, 13, 13, 8), segment_len=4, mem_len=3),
        _case("state_in_out_gqa", "GQA 4:2, D=59, segments of 5 over 10 tokens from a given memory of 6 (memory 6).",
              ("STREAM_STATE", "GQA_HEAD_MAP", "AWKWARD_HEAD_DIM"), Dims(1, 4, 2, 10, 10, 59), _memory(6),
              segment_len=5, mem_len=6),
        _case("memory_longer_than_segment", "Memory 7 over segments of 3 and 12 tokens, B=2: the memory spans parts "
              "of three past segments; the last segment sees from token 2.", ("MEMORY_MASK_OFF_BY_ONE", "MULTI_BATCH"),
              Dims(2, 2, 1, 12, 12, 8), segment_len=3, mem_len=7),
        _case("hf_zero_memory", "HF TransfoXL: memory 4 of zeros at the start, segments of 4 over 8 tokens.",
              ("MEMORY_ZERO_INIT",), Dims(1, 2, 2, 8, 8, 8), segment_len=4, mem_len=4, hf_zero_memory=True),
        _case("same_length", "same_length with memory 3 and segments of 4: a window of 3 tokens.",
              ("SAME_LENGTH", "MEMORY_MASK_OFF_BY_ONE"), Dims(1, 2, 2, 12, 12, 8), segment_len=4, mem_len=3,
              same_length=True),
        _case("relative_scores", "Transformer-XL relative scores (R = 9 rows) over memory 4, segments of 4, from a "
              "memory of 2.", ("RELATIVE_MEMORY_POSITIONS", "STREAM_STATE"), Dims(1, 2, 2, 8, 8, 8),
              {**_memory(2), **_relative(9)}, segment_len=4, mem_len=4),
    ]  # fmt: skip
