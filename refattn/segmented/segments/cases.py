"""Conformance cases for segmented attention.

Lengths are not multiples of the segment length (the last segment is short,
or padded), heads are grouped (GQA) where a case says so, and each inter-segment
rule has a case where the wrong rule gives different numbers: a causal case
whose first segment sees no summary, a prefix summary that differs from the
full segment's, a padded mean that divides by L rather than the tokens present.
"""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, draw, make_case, normal

FLAGS: dict[str, str] = {
    "SEGMENT_BOUNDARY": (
        "Tokens attend only inside their segment (token i is in segment i // L). Fails implementations whose "
        "segments overlap, start at an offset, or let a token see the neighbouring segment."
    ),
    "LAST_SEGMENT_SHORT": (
        "N is not a multiple of the segment length: the last segment has N mod L tokens and its mean summary "
        "divides by that count. Fails implementations that drop, pad or average over L tokens."
    ),
    "LAST_SEGMENT_PADDED": (
        "last_segment='pad': the sequence is taken as padded with zero tokens to a multiple of L; padded keys are "
        "never attended but a mean summary divides by L. Fails dividing by the real count, or attending the padding."
    ),
    "INTER_SEGMENT_SUM": (
        "Integration (a) by sum: the local output plus a second attention of every token over the segment "
        "summaries (R k, R v). Fails a missing or mis-pooled summary attention."
    ),
    "INTER_SEGMENT_GATE": (
        "Integration (a) by a given gate g: g * local + (1 - g) * over_summaries; the gate gets a gradient. "
        "Fails the gate applied to the wrong term."
    ),
    "INTER_SEGMENT_LSE_MERGE": (
        "Integration (a) by lse-merge: one softmax over the segment's keys and the visible summary keys (the "
        "identity behind refattn.merge), lse of that softmax. Fails averaging the two outputs instead."
    ),
    "INTER_SEGMENT_CONCAT": (
        "Integration (b): [local output, own segment's summary value] times a given (2 Dv, F) map. Fails the "
        "wrong summary, the wrong concatenation order or the map transposed."
    ),
    "CAUSAL_SUMMARY_EXCLUDE": (
        "Causal, current_summary='exclude': a token sees the summaries of earlier segments only; the first "
        "segment sees none. Fails leaking a summary that includes the token's future."
    ),
    "CAUSAL_SUMMARY_PREFIX": (
        "Causal, current_summary='prefix': a token also sees the summary of its own segment's tokens <= i (their "
        "mean, or the first token). Fails using the whole segment's summary."
    ),
    "POOLING_FIRST_TOKEN": "pooling='first': a segment's summary is its first token's key and value.",
    "POOLING_GIVEN": (
        "A given pooling matrix R (S, N), here a one-hot selection (max pooling by a given argmax). Fails "
        "ignoring R or using its transpose."
    ),
}


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, extra=None, **params) -> Case:
    differentiable = ("q", "k", "v") + tuple(n for n in ("gate", "projection") if n in (extra or {}))
    return make_case("segmented", name, description, flags, draw(dims, extra), params=params,
                     differentiable=differentiable)  # fmt: skip


def _selection(rng, dims):
    """A one-hot (S, N) pooling matrix: one token of each segment of 5."""
    segments = -(-dims.nq // 5)
    pooling = np.zeros((segments, dims.nq))
    for s in range(segments):
        pooling[s, rng.integers(5 * s, min(5 * s + 5, dims.nq))] = 1.0
    return pooling


def cases() -> list[Case]:
    return [
        _case("local_only", "Segments of 5 over 17 tokens, D = 59: the last has 2 tokens; no integration.",
              ("SEGMENT_BOUNDARY", "LAST_SEGMENT_SHORT", "AWKWARD_HEAD_DIM"), Dims(1, 2, 2, 17, 17, 59), segment_len=5),
        _case("local_causal", "Causal segments of 4 over 13 tokens, GQA 4:2.",
              ("SEGMENT_BOUNDARY", "CAUSAL_MASK", "GQA_HEAD_MAP"), Dims(1, 4, 2, 13, 13, 16), segment_len=4, causal=True),
        _case("one_segment", "segment_len = N = 9, causal: dense causal attention.",
              ("SEGMENT_BOUNDARY", "CAUSAL_MASK"), Dims(1, 2, 2, 9, 9, 8), segment_len=9, causal=True),
        _case("sum_mean", "Sum of local and over-summaries, mean pooling, 14 tokens in segments of 4 (last has 2).",
              ("INTER_SEGMENT_SUM", "LAST_SEGMENT_SHORT"), Dims(1, 2, 2, 14, 14, 16), segment_len=4, integration="sum"),
        _case("gate", "Given gate (B, H, N, 1), GQA 4:2, B = 2, segments of 3 over 10 tokens.",
              ("INTER_SEGMENT_GATE", "GQA_HEAD_MAP", "MULTI_BATCH"), Dims(2, 4, 2, 10, 10, 8),
              extra={"gate": lambda rng, dims: rng.random((dims.b, dims.hq, dims.nq, 1))},
              segment_len=3, integration="gate"),
        _case("lse_merge", "One softmax over the segment's keys and every segment summary, 13 tokens, L = 4.",
              ("INTER_SEGMENT_LSE_MERGE", "LAST_SEGMENT_SHORT"), Dims(1, 2, 2, 13, 13, 16),
              segment_len=4, integration="lse_merge"),
        _case("lse_merge_causal_exclude", "Causal lse-merge, earlier segments' summaries only: segment 0 sees none.",
              ("CAUSAL_SUMMARY_EXCLUDE", "INTER_SEGMENT_LSE_MERGE"), Dims(1, 2, 2, 13, 13, 16),
              segment_len=4, causal=True, integration="lse_merge"),
        _case("lse_merge_causal_prefix", "Causal lse-merge with the prefix mean of the token's own segment.",
              ("CAUSAL_SUMMARY_PREFIX", "INTER_SEGMENT_LSE_MERGE"), Dims(1, 2, 2, 13, 13, 16),
              segment_len=4, causal=True, integration="lse_merge", current_summary="prefix"),
        _case("sum_causal_prefix_first", "Causal sum with first-token pooling and prefix summaries, GQA 4:1.",
              ("CAUSAL_SUMMARY_PREFIX", "POOLING_FIRST_TOKEN", "INTER_SEGMENT_SUM", "MULTI_QUERY"),
              Dims(1, 4, 1, 11, 11, 8), segment_len=3, causal=True, integration="sum", current_summary="prefix",
              pooling="first"),
        _case("padded_mean", "last_segment='pad': 10 tokens, L = 4, the last mean divides by 4, lse-merge.",
              ("LAST_SEGMENT_PADDED", "INTER_SEGMENT_LSE_MERGE"), Dims(1, 2, 2, 10, 10, 8),
              segment_len=4, last_segment="pad", integration="lse_merge"),
        _case("given_selection", "A given one-hot pooling matrix, causal, sum, 13 tokens in segments of 5.",
              ("POOLING_GIVEN", "INTER_SEGMENT_SUM", "CAUSAL_SUMMARY_EXCLUDE"), Dims(1, 2, 2, 13, 13, 8),
              extra={"pooling": _selection}, segment_len=5, causal=True, integration="sum"),
        _case("concat", "Concatenation with the segment mean value and a (2 Dv, 5) map, Dv = 6 != D = 8.",
              ("INTER_SEGMENT_CONCAT", "VALUE_DIM_DIFFERS"), Dims(1, 2, 2, 11, 11, 8, 6),
              extra={"projection": normal(lambda dims: (2 * dims.v_shape[3], 5))}, segment_len=4, integration="concat"),
        _case("concat_causal_prefix", "Causal concatenation with the prefix mean of the own segment.",
              ("INTER_SEGMENT_CONCAT", "CAUSAL_SUMMARY_PREFIX"), Dims(1, 2, 2, 11, 11, 8),
              extra={"projection": normal(lambda dims: (2 * dims.d, 3))}, segment_len=4, causal=True,
              integration="concat", current_summary="prefix"),
    ]  # fmt: skip
