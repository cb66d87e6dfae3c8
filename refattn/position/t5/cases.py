"""Conformance cases for T5's bucketed relative position bias.

Each case is small and built so that the mistake its flags name changes the
numbers: positions span more than ``max_exact`` (log buckets) and, where
saturation is the point, more than ``max_distance``; tables have a standard
deviation of 1.5 so that a wrong bucket moves the logits visibly; the
layout case has as many buckets as heads, where a transposed table reads
without a shape error.

The buckets are returned as ``aux.buckets`` (Nq, Nk) and must match exactly.
Except in the boundary case, no bucket lies at a distance where float32 and
float64 evaluation of the logarithmic branch disagree (tests check this).

Seeds are the CRC-32 of the case id (refattn.conformance.case); the flags
only T5 uses are described in :data:`FLAGS`.
"""

from __future__ import annotations

import numpy as np

from ...conformance.case import ArrayMaker, Case, Dims, make_case, normal
from ..rope.cases import cached_positions, draw_with_positions, spread_positions

FLAGS: dict[str, str] = {
    "T5_BUCKET_DIRECTION": (
        "The relative position is key minus query, r = p_j - p_i (HF: memory_position - context_position), and "
        "with bidirectional buckets r > 0 (a key after the query) takes the upper half. Fails implementations "
        "that use p_i - p_j, which swaps the two halves."
    ),
    "T5_LOG_BUCKETS": (
        "Distances n >= max_exact share logarithmic buckets max_exact + trunc(log(n / max_exact) / "
        "log(max_distance / max_exact) * (side_buckets - max_exact)). Fails log2 or log1p, rounding instead of "
        "truncating, and a max_exact that is not half of one side's buckets."
    ),
    "T5_UNIDIRECTIONAL": (
        "With bidirectional = False (T5's decoder) all num_buckets buckets measure n = max(p_i - p_j, 0): past "
        "keys use both halves' worth of buckets and every key after the query falls in bucket 0. Fails "
        "implementations that bucket a decoder like an encoder, or take |r| for future keys."
    ),
    "T5_MAX_DISTANCE_SATURATION": (
        "Every distance from max_distance on shares the last bucket of its side (the min with side_buckets - 1). "
        "Cases have positions farther apart than max_distance: without the clamp the bucket leaves its half of "
        "the table or the table."
    ),
    "T5_BUCKET_BOUNDARY": (
        "HF computes the logarithmic branch in float32 and truncates; where the exact value is an integer the "
        "float32 rounding decides. With 20 buckets and max_distance 160, distances 10, 20 and 80 fall in bucket "
        "max_exact + 1, + 2, + 4 in float32 but one lower in float64. Fails implementations that compute it in "
        "float64."
    ),
    "T5_POSITION_OFFSET": (
        "The relative position is between the given positions (q_positions, k_positions), not array indices: a "
        "decoder step with a cache has q_positions = Nk - Nq + arange(Nq). Fails implementations that bucket "
        "j - i."
    ),
    "T5_TABLE_LAYOUT": (
        "The table is (num_buckets, Hq), HF's nn.Embedding(num_buckets, n_heads).weight; Mesh TensorFlow and "
        "flaxformer store (heads, buckets). The case has num_buckets = Hq, where reading the transpose raises no "
        "shape error but gives other biases."
    ),
    "T5_TABLE_GRADIENT": (
        "The table's gradient is the bias gradient summed over the batch and over every (query, key) pair in "
        "each bucket (a scatter-add, the adjoint of the gather). Fails backwards that keep one pair per bucket "
        "(a scatter that overwrites), drop the batch sum or mix heads."
    ),
}


# --- positions: (rng, dims) -> (q_positions, k_positions) ----------------------


def _aligned(rng, dims):
    """Keys at ``arange(Nk)``; queries aligned bottom-right, at ``Nk - Nq + arange(Nq)`` (cached decoding)."""
    return cached_positions(dims)


def _fixed(q_positions, k_positions):
    """Given positions (the boundary case needs particular distances)."""
    return lambda rng, dims: (np.array(q_positions), np.array(k_positions))


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, num_buckets: int = 32,
          max_distance: int = 128, bidirectional: bool = True, positions=_aligned, std: float = 1.0,
          bias: ArrayMaker | None = None, mask: ArrayMaker | None = None, **params) -> Case:  # fmt: skip
    """One T5 case: q, k, v, the table (std 1.5), the positions, then ``bias`` and ``mask``;
    ``params`` are the dense JSON keyword arguments (causal, window, scale, ...)."""
    extra = {key: make for key, make in {"bias": bias, "mask": mask}.items() if make is not None}
    table = normal(lambda dims: (num_buckets, dims.hq), std=1.5)
    return make_case(
        "t5", name, description, flags, draw_with_positions(dims, positions, extra, std=std, first={"table": table}),
        params=dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance, **params),
        differentiable=("q", "k", "v", "table", "bias") if bias is not None else ("q", "k", "v", "table"),
    )  # fmt: skip


def cases() -> list[Case]:
    """The T5 conformance cases, in reading order."""
    return [
        # --- buckets -----------------------------------------------------------
        _case("encoder_32_128", "Bidirectional 32 buckets / 128, N=24: distances 0-7 exact, 8-23 in log buckets.",
              ("T5_BUCKET_DIRECTION", "T5_LOG_BUCKETS"), Dims(1, 2, 2, 24, 24, 8)),
        _case("encoder_scale_1", "As T5 computes it: scale 1 (no 1/sqrt(D)), bidirectional, q and k of std 0.3.",
              ("SCALE_OVERRIDE", "T5_BUCKET_DIRECTION"), Dims(1, 2, 1, 16, 16, 8), std=0.3, scale=1.0),
        _case("decoder_causal", "Unidirectional 32 / 128 with a causal mask, N=40: past distances 16-39 in log buckets.",
              ("T5_UNIDIRECTIONAL", "T5_LOG_BUCKETS", "CAUSAL_MASK"), Dims(1, 2, 2, 40, 40, 4),
              bidirectional=False, causal=True),
        _case("decoder_unmasked", "Unidirectional without a mask: every key after its query is in bucket 0.",
              ("T5_UNIDIRECTIONAL",), Dims(1, 2, 1, 20, 20, 8), bidirectional=False),
        _case("saturation_spread", "Positions spread over [0, 600): most pairs are past max_distance 128.",
              ("T5_MAX_DISTANCE_SATURATION", "T5_BUCKET_DIRECTION"), Dims(1, 2, 2, 12, 24, 8),
              positions=spread_positions(600)),
        _case("awkward_10_20", "10 buckets, max_distance 20, N=45: max_exact 2, saturation from distance 20.",
              ("T5_MAX_DISTANCE_SATURATION", "T5_LOG_BUCKETS"), Dims(1, 2, 1, 45, 45, 4), num_buckets=10,
              max_distance=20),
        _case("decoder_64_256_spread", "Unidirectional 64 / 256, causal, positions spread over [0, 700), B=2.",
              ("T5_UNIDIRECTIONAL", "T5_MAX_DISTANCE_SATURATION", "MULTI_BATCH"), Dims(2, 2, 1, 16, 30, 4),
              num_buckets=64, max_distance=256, bidirectional=False, causal=True, positions=spread_positions(700)),
        _case("bucket_boundary_20_160", "20 buckets / 160 at distances +-10, 20, 40, 80: ties that float32 decides.",
              ("T5_BUCKET_BOUNDARY",), Dims(1, 2, 2, 4, 12, 8), num_buckets=20, max_distance=160,
              positions=_fixed([0, 40, 80, 100], [0, 10, 20, 30, 40, 60, 80, 90, 100, 120, 160, 180])),
        # --- positions and layout ----------------------------------------------------
        _case("decode_offset", "2 queries at positions 28-29 over 30 cached keys, decoder, causal, GQA 4:2.",
              ("T5_POSITION_OFFSET", "CAUSAL_ALIGNMENT", "GQA_HEAD_MAP"), Dims(1, 4, 2, 2, 30, 8),
              bidirectional=False, causal=True),
        _case("cross_offset", "6 queries at positions 14-19 over 20 keys, bidirectional, not causal.",
              ("T5_POSITION_OFFSET", "T5_BUCKET_DIRECTION", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 6, 20, 8)),
        _case("table_layout_square", "8 buckets and 8 heads (max_distance 10): a transposed table has the right shape.",
              ("T5_TABLE_LAYOUT",), Dims(1, 8, 2, 14, 14, 4), num_buckets=8, max_distance=10),
        _case("table_gradient", "B=3, N=18, dlse given: many (query, key) pairs per bucket, summed over the batch.",
              ("T5_TABLE_GRADIENT", "MULTI_BATCH", "LSE_GRADIENT"), Dims(3, 2, 1, 18, 18, 4)),
        # --- with the dense options ------------------------------------------
        _case("bias_softcap_window", "User bias (Nq, Nk) + T5 bias after soft-cap 3, window (6, 2), B=2.",
              ("SOFTCAP_BEFORE_BIAS", "BIAS_BROADCAST", "SLIDING_WINDOW", "T5_TABLE_GRADIENT"),
              Dims(2, 2, 2, 14, 14, 8), std=1.5, bias=lambda rng, dims: rng.standard_normal((dims.nq, dims.nk)),
              window=[6, 2], softcap=3.0),
        _case("fully_masked_rows", "8 queries over 5 keys, decoder, causal bottom-right: queries 0-2 see no key.",
              ("FULLY_MASKED_ROW", "CAUSAL_ALIGNMENT"), Dims(1, 2, 2, 8, 5, 8), bidirectional=False, causal=True),
    ]  # fmt: skip
