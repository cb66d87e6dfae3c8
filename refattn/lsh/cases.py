"""Conformance cases for LSH attention.

Each case is small (N <= 64, files under 32 KB) and built so that the mistake
its flags name changes the numbers: factorised buckets with unequal factors,
few chunks per round so that windows wrap and cross rounds, causal cases
(token 0 can only see itself), padding long enough that some padded tokens
see only padded tokens, four rounds over few buckets for the count
correction, lengths that make a chunk straddle two rounds, and short
sequences of several rounds, where the full-attention rule and the LSH path
differ.

Arrays: ``input.qk``, ``input.v`` (differentiable), ``param.rotations``
((H, R, D, P), or (B, H, R, D, P) for trax's per-example rotations) and
``param.key_padding_mask`` ((B, N) bool) where used. Parameters are spelled
out in full (the preset's values resolved), so a consumer needs no preset
table; the case's ``preset`` says whose they are. Rotations are standard
normal. ``qk`` is drawn token by token until every hashing decision has a
margin of at least :data:`MIN_MARGIN` (:func:`refattn.lsh.bucket_margins`),
so float32, float16 and bfloat16 implementations reproduce every bucket.

Seeds are the CRC-32 of the case id.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..conformance.case import Case
from .inputs import bucket_factors
from .presets import PRESETS, preset_values
from .reference import bucket_margins

#: Smallest bucket margin of every token in every case (bucket_margins' units).
MIN_MARGIN = 0.05


class Dims(NamedTuple):
    """Sizes of one case: qk (b, h, n, d), v (b, h, n, dv); dv = d when None."""

    b: int
    h: int
    n: int
    d: int
    dv: int | None = None


def draw_qk(rng: np.random.Generator, rotations: np.ndarray, n_buckets, shape: tuple, *, std: float = 1.0,
            min_margin: float = MIN_MARGIN, max_draws: int = 1000) -> np.ndarray:  # fmt: skip
    """Standard-normal ``qk`` (times ``std``), each token redrawn until all its decisions have ``min_margin``."""
    qk = std * rng.standard_normal(shape)
    for _ in range(max_draws):
        low = bucket_margins(qk, rotations, n_buckets).min(axis=2) < min_margin  # (B, H, N)
        if not low.any():
            return qk
        qk[low] = std * rng.standard_normal((int(low.sum()), shape[-1]))
    raise RuntimeError(f"no qk with bucket margins >= {min_margin} after {max_draws} draws")


def padded_tail(counts: tuple[int, ...]) -> Callable[[Dims], np.ndarray]:
    """Key padding mask (B, N): batch element ``b`` has its last ``counts[b]`` tokens padded."""

    def make(dims: Dims) -> np.ndarray:
        valid = np.ones((dims.b, dims.n), dtype=bool)
        for b, count in enumerate(counts):
            valid[b, dims.n - count :] = False
        return valid

    return make


def _arrays(dims: Dims, n_buckets, n_hashes: int, std: float, per_example: bool, padding):
    """``arrays(rng)``: rotations first, then qk (with margins), v and the padding mask."""
    half = sum(bucket_factors(n_buckets)) // 2

    def arrays(rng: np.random.Generator) -> dict:
        lead = (dims.b,) if per_example else ()
        rotations = rng.standard_normal(lead + (dims.h, n_hashes, dims.d, half))
        qk = draw_qk(rng, rotations, n_buckets, (dims.b, dims.h, dims.n, dims.d), std=std)
        out = {"qk": qk, "v": rng.standard_normal((dims.b, dims.h, dims.n, dims.dv or dims.d)), "rotations": rotations}
        if padding is not None:
            out["key_padding_mask"] = padding(dims)
        return out

    return arrays


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, n_buckets, n_hashes: int,
          chunk_len: int, preset: str | None = None, causal: bool = False, padding=None, per_example: bool = False,
          std: float = 1.0, **overrides) -> Case:  # fmt: skip
    case_id = f"lsh/{name}"
    params = dict(n_buckets=n_buckets, n_hashes=n_hashes, chunk_len=chunk_len, causal=causal)
    params.update(preset_values(PRESETS[preset]), **overrides)
    return Case(
        id=case_id,
        mechanism="lsh",
        description=f"{description} Every bucket decision has margin >= {MIN_MARGIN}.",
        flags=flags,
        seed=zlib.crc32(case_id.encode()),
        arrays=_arrays(dims, n_buckets, n_hashes, std, per_example, padding),
        params=params,
        differentiable=("qk", "v"),
        preset=preset,
    )


def cases() -> list[Case]:
    return [
        # --- canonical (preset None) ------------------------------------------------
        _case("two_rounds", "Two rounds of 4 buckets, N=32, chunks of 8: 8 chunks, the first wrapping to the last.",
              ("MULTI_ROUND_COMBINE", "WRAPPED_LOOKBACK", "LSH_STABLE_SORT", "LSH_KEY_NORMALISATION"),
              Dims(1, 2, 32, 8), n_buckets=4, n_hashes=2, chunk_len=8),
        _case("partial_last_chunk", "N=20, 2 rounds, chunks of 16: chunk 1 holds the end of round 0 and the start of "
              "round 1, and the last chunk has 8 items.",
              ("CHUNK_STRADDLES_ROUNDS", "WRAPPED_LOOKBACK"), Dims(1, 2, 20, 8), n_buckets=4, n_hashes=2, chunk_len=16),
        _case("causal_padded", "Causal, batch element 1 has its last 7 tokens padded (padding bucket): token 0 sees "
              "only itself.",
              ("SELF_ONLY_ROW", "PADDING_BUCKET", "LSH_CAUSAL_POSITIONS"), Dims(2, 1, 24, 8), n_buckets=4, n_hashes=2,
              chunk_len=8, causal=True, padding=padded_tail((0, 7))),
        _case("dup_correction", "Count correction over 4 rounds of 2 buckets, N=16, chunks of 8: keys recur within "
              "and across rounds, through wrapped windows.",
              ("DUP_COUNT", "DUP_COUNT_CROSS_ROUND"), Dims(1, 2, 16, 8), n_buckets=2, n_hashes=4, chunk_len=8,
              dup_correction=True),
        _case("look_ahead", "One chunk before and one after: the last chunk's next chunk is the first.",
              ("WRAPPED_LOOKBACK",), Dims(1, 2, 24, 8), n_buckets=6, n_hashes=2, chunk_len=8, n_chunks_after=1),
        _case("factorised", "Buckets factorised as [4, 6] (24 per round): factor 0 is the least significant.",
              ("LSH_FACTORISED_BUCKETS",), Dims(1, 2, 32, 8), n_buckets=[4, 6], n_hashes=2, chunk_len=8),
        _case("window_repeats_chunk", "N=8 in one chunk of 8 with one chunk before: the window holds the chunk twice, "
              "every key counts twice.",
              ("WRAPPED_LOOKBACK",), Dims(1, 2, 8, 8), n_buckets=2, n_hashes=1, chunk_len=8),
        # --- hf ------------------------------------------------------------------------
        _case("hf_two_rounds", "HF: two rounds of 4 buckets, N=32, chunks of 8.",
              ("MULTI_ROUND_COMBINE", "WRAPPED_LOOKBACK"), Dims(1, 2, 32, 8), preset="hf", n_buckets=4, n_hashes=2,
              chunk_len=8),
        _case("hf_factorised", "HF: buckets [2, 4], N=64, two rounds.", ("LSH_FACTORISED_BUCKETS",), Dims(1, 1, 64, 8),
              preset="hf", n_buckets=[2, 4], n_hashes=2, chunk_len=8),
        _case("hf_causal_padded", "HF, causal; only batch element 1 is padded (last 10 tokens), yet both get the "
              "padding bucket (HF decides over the batch).",
              ("PADDING_BUCKET", "SELF_ONLY_ROW", "LSH_CAUSAL_POSITIONS"), Dims(2, 1, 32, 8), preset="hf",
              n_buckets=4, n_hashes=2, chunk_len=8, causal=True, padding=padded_tail((0, 10))),
        _case("hf_straddle", "HF: N=24, 2 rounds, chunks of 16 (n_hashes·N = 48): chunk 1 straddles the rounds.",
              ("CHUNK_STRADDLES_ROUNDS",), Dims(1, 2, 24, 8), preset="hf", n_buckets=4, n_hashes=2, chunk_len=16),
        _case("hf_short_sequence", "HF: N=24 <= chunk_len=32 with 4 rounds: one dense round over all keys (the LSH "
              "path would give 3 chunks of uneven windows).",
              ("SHORT_SEQUENCE_FALLBACK",), Dims(1, 2, 24, 8), preset="hf", n_buckets=4, n_hashes=4, chunk_len=32),
        _case("hf_look_ahead", "HF: no chunk before, one after; the last chunk wraps to the first.",
              ("WRAPPED_LOOKBACK",), Dims(1, 2, 32, 8), preset="hf", n_buckets=4, n_hashes=2, chunk_len=8,
              n_chunks_before=0, n_chunks_after=1),
        # --- trax ----------------------------------------------------------------------
        _case("trax_masked", "trax: a mask is given, so the padding bucket exists even for the unpadded element 0; "
              "element 1 has 20 padded tokens, some seeing only padded tokens (-1e9 added to all of them); rotations "
              "per example.",
              ("PADDING_BUCKET", "LSH_MASK_MODE"), Dims(2, 1, 32, 8), preset="trax", n_buckets=4, n_hashes=2,
              chunk_len=8, padding=padded_tail((0, 20)), per_example=True),
        _case("trax_causal", "trax, causal: token 0's logit with itself is its score minus 1e5.",
              ("SELF_ONLY_ROW", "LSH_MASK_MODE", "MULTI_ROUND_COMBINE"), Dims(1, 2, 32, 8), preset="trax",
              n_buckets=4, n_hashes=2, chunk_len=8, causal=True),
        # --- lucidrains -----------------------------------------------------------------
        _case("lucidrains_two_rounds", "lucidrains: l2-normalised keys, logits scaled by 1/sqrt(D), N=32, buckets "
              "N/chunk_len = 4, two rounds.",
              ("LSH_KEY_NORMALISATION", "MULTI_ROUND_COMBINE"), Dims(1, 2, 32, 8), preset="lucidrains", n_buckets=4,
              n_hashes=2, chunk_len=8),
        _case("lucidrains_padded_queries", "lucidrains: the last 10 tokens are padded and, as queries, see only "
              "themselves.",
              ("LSH_PADDED_QUERIES",), Dims(1, 2, 32, 8), preset="lucidrains", n_buckets=4, n_hashes=2, chunk_len=8,
              padding=padded_tail((10,))),
        _case("lucidrains_dup_correction", "allow_duplicate_attention=False: keys seen through the first chunk's "
              "wrapped window and across rounds count too (reformer-pytorch's own count misses them).",
              ("DUP_COUNT", "DUP_COUNT_CROSS_ROUND"), Dims(1, 2, 32, 8), preset="lucidrains", n_buckets=4, n_hashes=2,
              chunk_len=8, dup_correction=True),
        _case("lucidrains_short_sequence", "lucidrains: N=24 <= bucket_size=32 with 4 rounds: full attention (the "
              "LSH path would give 3 chunks of uneven windows).",
              ("SHORT_SEQUENCE_FALLBACK",), Dims(1, 2, 24, 8), preset="lucidrains", n_buckets=2, n_hashes=4,
              chunk_len=32),
    ]  # fmt: skip
