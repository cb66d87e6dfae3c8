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

Seeds are the CRC-32 of the case id.
"""

from __future__ import annotations

import zlib
from typing import Callable, NamedTuple

import numpy as np

from ...conformance.case import Case


ArrayMaker = Callable[[np.random.Generator, "Dims"], np.ndarray]


class Dims(NamedTuple):
    """Sizes of one case: q (b, hq, nq, d), k (b, hkv, nk, d), v (b, hkv, nk, dv); dv = d when None."""

    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int | None = None


# --- positions: (rng, dims) -> (q_positions, k_positions) ----------------------


def _aligned(rng, dims):
    """Keys at ``arange(Nk)``; queries aligned bottom-right, at ``Nk - Nq + arange(Nq)`` (cached decoding)."""
    return dims.nk - dims.nq + np.arange(dims.nq), np.arange(dims.nk)


def _spread(span: int):
    """Sorted distinct key positions in [0, span) and query positions among them: distances up to ``span``."""

    def make(rng, dims):
        keys = np.sort(rng.choice(span, size=dims.nk, replace=False))
        return np.sort(rng.choice(keys, size=dims.nq, replace=False)), keys

    return make


def _fixed(q_positions, k_positions):
    """Given positions (the boundary case needs particular distances)."""
    return lambda rng, dims: (np.array(q_positions), np.array(k_positions))


def _draw(dims: Dims, std: float, num_buckets: int, positions, extra: dict[str, ArrayMaker]):
    """``arrays(rng)``: q, k (standard deviation ``std``), v, the table (std 1.5), the positions, the ``extra`` arrays."""

    def arrays(rng: np.random.Generator) -> dict:
        out = {
            "q": std * rng.standard_normal((dims.b, dims.hq, dims.nq, dims.d)),
            "k": std * rng.standard_normal((dims.b, dims.hkv, dims.nk, dims.d)),
            "v": rng.standard_normal((dims.b, dims.hkv, dims.nk, dims.dv or dims.d)),
            "table": 1.5 * rng.standard_normal((num_buckets, dims.hq)),
        }
        q_positions, k_positions = positions(rng, dims)
        out["q_positions"] = np.asarray(q_positions, dtype=np.int64)
        out["k_positions"] = np.asarray(k_positions, dtype=np.int64)
        for name, make in extra.items():
            out[name] = make(rng, dims)
        return out

    return arrays


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, num_buckets: int = 32,
          max_distance: int = 128, bidirectional: bool = True, positions=_aligned, std: float = 1.0,
          bias: ArrayMaker | None = None, mask: ArrayMaker | None = None, **params) -> Case:  # fmt: skip
    """One T5 case; ``params`` are the dense JSON keyword arguments (causal, window, scale, ...)."""
    extra = {key: make for key, make in {"bias": bias, "mask": mask}.items() if make is not None}
    case_id = f"t5/{name}"
    return Case(
        id=case_id,
        mechanism="t5",
        description=description,
        flags=flags,
        seed=zlib.crc32(case_id.encode()),
        arrays=_draw(dims, std, num_buckets, positions, extra),
        params=dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance, **params),
        differentiable=("q", "k", "v", "table", "bias") if bias is not None else ("q", "k", "v", "table"),
    )


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
              positions=_spread(600)),
        _case("awkward_10_20", "10 buckets, max_distance 20, N=45: max_exact 2, saturation from distance 20.",
              ("T5_MAX_DISTANCE_SATURATION", "T5_LOG_BUCKETS"), Dims(1, 2, 1, 45, 45, 4), num_buckets=10,
              max_distance=20),
        _case("decoder_64_256_spread", "Unidirectional 64 / 256, causal, positions spread over [0, 700), B=2.",
              ("T5_UNIDIRECTIONAL", "T5_MAX_DISTANCE_SATURATION", "MULTI_BATCH"), Dims(2, 2, 1, 16, 30, 4),
              num_buckets=64, max_distance=256, bidirectional=False, causal=True, positions=_spread(700)),
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
