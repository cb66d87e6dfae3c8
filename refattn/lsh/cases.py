"""Conformance cases for LSH attention, and the flags only they use.

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

Cases are built with the shared helpers of refattn/conformance/case.py
(seeded by the CRC-32 of the case id); the arrays are drawn in the order
rotations, ``qk``, ``v``, which is part of each case's data.
"""

from __future__ import annotations

import numpy as np

from ..conformance.case import EXACT_TIES, EXACT_TIES_DESCRIPTION, ArrayMaker, Case, Dims, make_case
from .inputs import bucket_factors
from .presets import PRESETS, preset_values
from .reference import bucket_margins

#: Smallest bucket margin of every token in every case (bucket_margins' units).
MIN_MARGIN = 0.05

#: The flags only LSH cases use (the shared catalogue is refattn/conformance/flags.py).
FLAGS: dict[str, str] = {
    "LSH_FACTORISED_BUCKETS": (
        "With num_buckets a list of even factors, factor k reads the next f_k / 2 rotation columns, its bucket is "
        "argmax([xR_k, -xR_k]), and the factors combine with the first least significant: b_0 + f_0 b_1 + f_0 f_1 "
        "b_2 ... (HF, trax). Cases use unequal factors: fails the first factor made most significant, columns "
        "interleaved between factors, or one argmax over all columns."
    ),
    "WRAPPED_LOOKBACK": (
        "Each chunk of the sorted items also attends to num_chunks_before previous and num_chunks_after next chunks "
        "modulo the number of chunks: chunk 0's previous chunk is the last one, the last chunk's next is chunk 0, "
        "and with fewer chunks than the window a chunk occurs in it more than once (HF and trax concatenate rolled "
        "copies). Fails windows that stop at the ends, or that drop repeated chunks."
    ),
    "SELF_ONLY_ROW": (
        "A token's own key (its copy from any round) gets the finite self_mask_value (-1e5; trax subtracts 1e5 "
        "from the score) instead of being excluded, so a query with no other visible key (token 0 under causal "
        "masking, a padded token among padded ones) attends to itself with weight 1 and its lse is near -1e5. "
        "Fails implementations that mask self pairs with -inf (output 0 or NaN) or not at all."
    ),
    "PADDING_BUCKET": (
        "Padded tokens get an extra bucket, prod(num_buckets), and each round then has prod(num_buckets) + 1 bucket "
        "ids (offsets r (n + 1)): trax whenever a mask is given, HF when some token of the batch is padded (one "
        "padded sequence moves every sequence's offsets). Fails implementations without the extra bucket, with "
        "offsets r n, or that decide per sequence."
    ),
    "MULTI_ROUND_COMBINE": (
        "Hashing rounds are combined by their log-sum-exps: out = sum_r exp(lse_r - LSE) o_r, LSE = log sum_r "
        "exp(lse_r), which is also the returned lse. Fails averaging the rounds, keeping one of them, or "
        "returning one round's lse."
    ),
    "DUP_COUNT": (
        "With dup_correction, each occurrence of key j in query i's windows has its logit lowered by log n_ij, "
        "n_ij counted over the windows of all of i's rounds, so that every visible key counts once (trax v1, "
        "reformer-pytorch allow_duplicate_attention=False); without it a key seen n times weighs n exp(z). Fails "
        "applying or skipping the correction against the parameter."
    ),
    "DUP_COUNT_CROSS_ROUND": (
        "n_ij also counts occurrences through windows that reach another round: the look-back of a round's first "
        "chunk is the previous round's last chunk (round 0's wraps to the last round's), and a straddling chunk "
        "holds two rounds. trax v1 and reformer-pytorch compare same-round chunk locations only (locs1, "
        "locs2 = locs1 + 1), so a key seen only that way gets count 0 and its logit raised by -log(1e-9) = 20.7. "
        "Fails that count."
    ),
    "CHUNK_STRADDLES_ROUNDS": (
        "Chunks are cut from the concatenation of all rounds' sorted items: with N not a multiple of chunk_len a "
        "chunk holds the end of one round and the start of the next, and a round's first chunk looks back into "
        "the previous round. Fails chunking each round on its own (padding or wrapping within a round)."
    ),
    "SHORT_SEQUENCE_FALLBACK": (
        "HF and reformer-pytorch replace LSH by one dense round when N <= chunk_len: every key once, with the "
        "same key normalisation, masks and self value, whatever num_hashes. Cases have N < chunk_len < num_hashes N, "
        "where hashing anyway gives uneven windows and another lse. Fails implementations that hash anyway, or "
        "fall back where the preset does not."
    ),
    "LSH_STABLE_SORT": (
        "Items are sorted by bucket and, within a bucket, by position (HF's _stable_argsort, trax's key "
        "N bucket + position); chunk boundaries cut buckets, so the order within a bucket decides which tokens "
        "see each other. Fails unstable sorts and reversed order within a bucket."
    ),
    "LSH_KEY_NORMALISATION": (
        "Keys are the shared vectors length-normalised, queries are not: HF and trax use x / sqrt(mean(x^2) + "
        "1e-6) / sqrt(D) = x / sqrt(|x|^2 + 1e-6 D) and unscaled logits q.k; reformer-pytorch uses x / max(|x|, "
        "1e-12) and scales the logits by 1/sqrt(D). Fails normalising queries too, the other normalisation or "
        "epsilon, and a missing or extra 1/sqrt(D)."
    ),
    "LSH_CAUSAL_POSITIONS": (
        "Causal masking compares the tokens' original positions (key position <= query position), not their "
        "slots in the sorted order or in the chunk. Fails a triangular mask applied to the sorted window."
    ),
    "LSH_MASK_MODE": (
        "How masked and self pairs enter the logits: HF and reformer-pytorch replace a masked logit by mask_value, "
        "then a self pair's by self_mask_value; trax adds both (score - 1e9 - 1e5), so a padded token whose "
        "windows hold only padded tokens attends to the others, not to itself, and token 0's lse under causal "
        "masking is its score - 1e5. Fails using one rule for the other."
    ),
    "LSH_TRAX_PADDING_MARKS": (
        "trax decides padding and self pairs from marks, info = n + 1 for a real token and 1 - n for a padded one "
        "(padding_marks='negated_positions'): a padded token at n >= 1 gets no self value (its own pair is an ordinary "
        "padded pair, -1e9), padded keys at positions 0 and 1 are not masked, and padded keys are never causally "
        "masked. google/trax 7c189c2, efficient_attention.py, LSHSelfAttention.forward_unbatched and attend. Fails "
        "the self value on every i == j (refattn before issue 14), and masking padded keys by the mask alone."
    ),
    "LSH_REFORMER_PYTORCH_DUP_COUNT": (
        "Reproduces a defect of reformer-pytorch (allow_duplicate_attention=False; lucidrains preset, "
        "dup_count='reformer_pytorch'): the count n'_ij covers same-round windows only, so a key seen only through a "
        "window reaching into another round gets log(0 + 1e-9) and its logit raised by 20.7, and log(n' + 1e-9) is "
        "taken in float32 even for float64 input. The right count is the canonical one (DUP_COUNT_CROSS_ROUND). "
        "Fails the exact count under this preset, and the float64 log of the same-round count."
    ),
    "LSH_TIES": (
        "Exact ties, reproduced in every precision: an all-zero token hashes to bucket 0 in every round and factor "
        "(argmax of an all-zero [xR, -xR] takes the first index: NumPy, torch and JAX argmax), and duplicated tokens "
        "share every bucket, so their order in the sort is by position (HF's stable argsort, trax's and "
        "reformer-pytorch's key N bucket + n). Fails the last index on a tied argmax, and unstable or reversed "
        "sorts of equal buckets."
    ),
    EXACT_TIES: EXACT_TIES_DESCRIPTION,
    "LSH_DUP_COUNT_SELF_PAIRS": (
        "The duplicate correction applies to self pairs too: z_ii = self_mask_value - log n_ii. The case has a "
        "score-sized self value (-1), so every row weighs its own key, and causal masking leaves token 0 alone, "
        "whose lse is then self_mask_value exactly (self_mask_value + log n_00 - log n_00). Fails skipping the "
        "correction on self pairs (each own key n_ii times too heavy, token 0's lse off by log n_00)."
    ),
    "LSH_PADDING_BUCKET_IF_MASK": (
        "padding_bucket='if_mask' (canonical, trax) adds the padding bucket whenever key_padding_mask is given, "
        "even when no token is padded: round offsets r (n + 1) in aux.buckets; 'if_padded' (HF) adds it only when "
        "some token of the batch is padded. The case gives a mask with no padded token. Fails 'if_padded' under "
        "the canonical preset (offsets r n); out and lse cannot tell, only the reported buckets."
    ),
    "LSH_PADDED_QUERIES": (
        "reformer-pytorch masks a padded query's whole row (the query and key padding masks multiplied), so a "
        "padded token attends only to itself (the self value is written after the mask); HF and trax mask padded "
        "keys only. Fails masking keys only under that preset, or rows under the others."
    ),
}


def qk_dims(b: int, h: int, n: int, d: int, dv: int | None = None) -> Dims:
    """Sizes of a shared-QK problem: qk (b, h, n, d) (``dims.q_shape``), v (b, h, n, dv) (``dims.v_shape``)."""
    return Dims(b, h, h, n, n, d, dv)


def draw_qk(rng: np.random.Generator, rotations: np.ndarray, num_buckets, shape: tuple, *, std: float = 1.0,
            min_margin: float = MIN_MARGIN, max_draws: int = 1000) -> np.ndarray:  # fmt: skip
    """Standard-normal ``qk`` (times ``std``), each token redrawn until all its decisions have ``min_margin``."""
    qk = std * rng.standard_normal(shape)
    for _ in range(max_draws):
        low = bucket_margins(qk, rotations, num_buckets).min(axis=2) < min_margin  # (B, H, N)
        if not low.any():
            return qk
        qk[low] = std * rng.standard_normal((int(low.sum()), shape[-1]))
    raise RuntimeError(f"no qk with bucket margins >= {min_margin} after {max_draws} draws")


def padded_tail(counts: tuple[int, ...]) -> ArrayMaker:
    """Key padding mask (B, N): batch element ``b`` has its last ``counts[b]`` tokens padded."""

    def make(rng: np.random.Generator, dims: Dims) -> np.ndarray:
        valid = np.ones((dims.b, dims.nk), dtype=bool)
        for b, count in enumerate(counts):
            valid[b, dims.nk - count :] = False
        return valid

    return make


def padded_head(counts: tuple[int, ...]) -> ArrayMaker:
    """Key padding mask (B, N): batch element ``b`` has its first ``counts[b]`` tokens padded."""

    def make(rng: np.random.Generator, dims: Dims) -> np.ndarray:
        valid = np.ones((dims.b, dims.nk), dtype=bool)
        for b, count in enumerate(counts):
            valid[b, :count] = False
        return valid

    return make


def tied_tokens(qk: np.ndarray) -> np.ndarray:
    """``qk`` with exact ties: token 1 all zero, and every token from N/2 on a copy of the token N/2 before it."""
    qk = qk.copy()
    half = qk.shape[2] // 2
    qk[:, :, half : 2 * half] = qk[:, :, :half]
    qk[:, :, 1] = qk[:, :, half + 1] = 0.0
    return qk


def _arrays(dims: Dims, num_buckets, num_hashes: int, std: float, per_example: bool, padding: ArrayMaker | None,
            ties: bool = False):  # fmt: skip
    """``arrays(rng)``: rotations first, then qk (with margins; tied afterwards with ``ties``), v and the padding mask."""
    half = sum(bucket_factors(num_buckets)) // 2

    def arrays(rng: np.random.Generator) -> dict:
        lead = (dims.b,) if per_example else ()
        rotations = rng.standard_normal(lead + (dims.hq, num_hashes, dims.d, half))
        qk = draw_qk(rng, rotations, num_buckets, dims.q_shape, std=std)
        if ties:
            qk = tied_tokens(qk)
        out = {"qk": qk, "v": rng.standard_normal(dims.v_shape), "rotations": rotations}
        if padding is not None:
            out["key_padding_mask"] = padding(rng, dims)
        return out

    return arrays


#: Why a tie case's VJP is not the derivative of its forward (Case.not_a_derivative).
TIE = "bucket decisions sit exactly on ties, which any perturbation breaks; the VJP holds the decisions fixed"


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, num_buckets, num_hashes: int,
          chunk_len: int, preset: str | None = None, causal: bool = False, padding: ArrayMaker | None = None,
          per_example: bool = False, std: float = 1.0, ties: bool = False, **overrides) -> Case:  # fmt: skip
    """One LSH case; ``overrides`` replace the preset's values of the behaviours (``presets.PARAMETERS``)."""
    params = dict(num_buckets=num_buckets, num_hashes=num_hashes, chunk_len=chunk_len, causal=causal)
    params.update(preset_values(PRESETS[preset]), **overrides)
    margins = "Every bucket decision of the other tokens" if ties else "Every bucket decision"
    return make_case(
        "lsh",
        name,
        f"{description} {margins} has margin >= {MIN_MARGIN}.",
        flags,
        _arrays(dims, num_buckets, num_hashes, std, per_example, padding, ties),
        params=params,
        differentiable=("qk", "v"),
        preset=preset,
        not_a_derivative=TIE if ties else None,
    )


def cases() -> list[Case]:
    """The LSH conformance cases, in reading order."""
    return [
        # --- canonical (preset None) ------------------------------------------------
        _case("two_rounds", "Two rounds of 4 buckets, N=32, chunks of 8: 8 chunks, the first wrapping to the last.",
              ("MULTI_ROUND_COMBINE", "WRAPPED_LOOKBACK", "LSH_STABLE_SORT", "LSH_KEY_NORMALISATION"),
              qk_dims(1, 2, 32, 8), num_buckets=4, num_hashes=2, chunk_len=8),
        _case("partial_last_chunk", "N=20, 2 rounds, chunks of 16: chunk 1 holds the end of round 0 and the start of "
              "round 1, and the last chunk has 8 items.",
              ("CHUNK_STRADDLES_ROUNDS", "WRAPPED_LOOKBACK"), qk_dims(1, 2, 20, 8), num_buckets=4, num_hashes=2, chunk_len=16),
        _case("causal_padded", "Causal, batch element 1 has its last 7 tokens padded (padding bucket): token 0 sees "
              "only itself.",
              ("SELF_ONLY_ROW", "PADDING_BUCKET", "LSH_CAUSAL_POSITIONS"), qk_dims(2, 1, 24, 8), num_buckets=4, num_hashes=2,
              chunk_len=8, causal=True, padding=padded_tail((0, 7))),
        _case("dup_correction", "Count correction over 4 rounds of 2 buckets, N=16, chunks of 8: keys recur within "
              "and across rounds, through wrapped windows.",
              ("DUP_COUNT", "DUP_COUNT_CROSS_ROUND"), qk_dims(1, 2, 16, 8), num_buckets=2, num_hashes=4, chunk_len=8,
              dup_correction=True),
        _case("dup_correction_self_pairs", "Count correction on self pairs: causal, 3 rounds of 2 buckets, N=16, "
              "chunks of 4, self value -1, so every own key weighs exp(-1 - log n_ii) and token 0, alone, has lse -1.",
              ("LSH_DUP_COUNT_SELF_PAIRS", "DUP_COUNT", "SELF_ONLY_ROW"), qk_dims(1, 2, 16, 8), num_buckets=2,
              num_hashes=3, chunk_len=4, causal=True, dup_correction=True, self_mask_value=-1.0),
        _case("look_ahead", "One chunk before and one after: the last chunk's next chunk is the first.",
              ("WRAPPED_LOOKBACK",), qk_dims(1, 2, 24, 8), num_buckets=6, num_hashes=2, chunk_len=8, num_chunks_after=1),
        _case("factorised", "Buckets factorised as [4, 6] (24 per round): factor 0 is the least significant.",
              ("LSH_FACTORISED_BUCKETS",), qk_dims(1, 2, 32, 8), num_buckets=[4, 6], num_hashes=2, chunk_len=8),
        _case("ties", "Exact ties: token 1 is all zero (bucket 0 in every round and factor), tokens 8-15 copy tokens "
              "0-7 (equal buckets, sorted by position); buckets [4, 2], N = 16, chunks of 4.",
              (EXACT_TIES, "LSH_TIES", "LSH_STABLE_SORT", "LSH_FACTORISED_BUCKETS"), qk_dims(1, 2, 16, 8), num_buckets=[4, 2],
              num_hashes=2, chunk_len=4, ties=True),
        _case("mask_without_padding", "A key padding mask with no padded token: padding_bucket='if_mask' still adds "
              "the padding bucket, so round r's buckets are offset by 5 r, not 4 r (aux.buckets; the sort, and so "
              "out and lse, are the same either way).",
              ("LSH_PADDING_BUCKET_IF_MASK", "PADDING_BUCKET"), qk_dims(1, 2, 16, 8), num_buckets=4, num_hashes=3,
              chunk_len=4, padding=padded_tail((0,))),
        _case("window_repeats_chunk", "N=8 in one chunk of 8 with one chunk before: the window holds the chunk twice, "
              "every key counts twice.",
              ("WRAPPED_LOOKBACK",), qk_dims(1, 2, 8, 8), num_buckets=2, num_hashes=1, chunk_len=8),
        # --- hf ------------------------------------------------------------------------
        _case("hf_two_rounds", "HF: two rounds of 4 buckets, N=32, chunks of 8.",
              ("MULTI_ROUND_COMBINE", "WRAPPED_LOOKBACK"), qk_dims(1, 2, 32, 8), preset="hf", num_buckets=4, num_hashes=2,
              chunk_len=8),
        _case("hf_factorised", "HF: buckets [2, 4], N=64, two rounds.", ("LSH_FACTORISED_BUCKETS",), qk_dims(1, 1, 64, 8),
              preset="hf", num_buckets=[2, 4], num_hashes=2, chunk_len=8),
        _case("hf_causal_padded", "HF, causal; only batch element 1 is padded (last 10 tokens), yet both get the "
              "padding bucket (HF decides over the batch).",
              ("PADDING_BUCKET", "SELF_ONLY_ROW", "LSH_CAUSAL_POSITIONS"), qk_dims(2, 1, 32, 8), preset="hf",
              num_buckets=4, num_hashes=2, chunk_len=8, causal=True, padding=padded_tail((0, 10))),
        _case("hf_straddle", "HF: N=24, 2 rounds, chunks of 16 (num_hashes·N = 48): chunk 1 straddles the rounds.",
              ("CHUNK_STRADDLES_ROUNDS",), qk_dims(1, 2, 24, 8), preset="hf", num_buckets=4, num_hashes=2, chunk_len=16),
        _case("hf_short_sequence", "HF: N=24 <= chunk_len=32 with 4 rounds: one dense round over all keys (the LSH "
              "path would give 3 chunks of uneven windows).",
              ("SHORT_SEQUENCE_FALLBACK",), qk_dims(1, 2, 24, 8), preset="hf", num_buckets=4, num_hashes=4, chunk_len=32),
        _case("hf_look_ahead", "HF: no chunk before, one after; the last chunk wraps to the first.",
              ("WRAPPED_LOOKBACK",), qk_dims(1, 2, 32, 8), preset="hf", num_buckets=4, num_hashes=2, chunk_len=8,
              num_chunks_before=0, num_chunks_after=1),
        # --- trax ----------------------------------------------------------------------
        _case("trax_masked", "trax: a mask is given, so the padding bucket exists even for the unpadded element 0; "
              "element 1 has 20 padded tokens, some seeing only padded tokens (-1e9 added to all of them, itself "
              "included: trax's marks give a padded token no self pair); rotations per example.",
              ("PADDING_BUCKET", "LSH_MASK_MODE", "LSH_TRAX_PADDING_MARKS"), qk_dims(2, 1, 32, 8), preset="trax", num_buckets=4, num_hashes=2,
              chunk_len=8, padding=padded_tail((0, 20)), per_example=True),
        _case("trax_causal", "trax, causal: token 0's logit with itself is its score minus 1e5.",
              ("SELF_ONLY_ROW", "LSH_MASK_MODE", "MULTI_ROUND_COMBINE"), qk_dims(1, 2, 32, 8), preset="trax",
              num_buckets=4, num_hashes=2, chunk_len=8, causal=True),
        _case("trax_leading_padding", "trax, causal: element 1's first 5 tokens padded, so its padded keys 0 and 1 "
              "escape the padding mask (marks 1 and 0 are not negative), padded token 0 keeps its self pair and "
              "padded keys are never causally masked.",
              ("LSH_TRAX_PADDING_MARKS", "PADDING_BUCKET"), qk_dims(2, 1, 16, 8), preset="trax", num_buckets=4,
              num_hashes=2, chunk_len=8, causal=True, padding=padded_head((0, 5))),
        # --- lucidrains -----------------------------------------------------------------
        _case("lucidrains_two_rounds", "lucidrains: l2-normalised keys, logits scaled by 1/sqrt(D), N=32, buckets "
              "N/chunk_len = 4, two rounds.",
              ("LSH_KEY_NORMALISATION", "MULTI_ROUND_COMBINE"), qk_dims(1, 2, 32, 8), preset="lucidrains", num_buckets=4,
              num_hashes=2, chunk_len=8),
        _case("lucidrains_padded_queries", "lucidrains: the last 10 tokens are padded and, as queries, see only "
              "themselves.",
              ("LSH_PADDED_QUERIES",), qk_dims(1, 2, 32, 8), preset="lucidrains", num_buckets=4, num_hashes=2, chunk_len=8,
              padding=padded_tail((10,))),
        _case("lucidrains_dup_correction", "allow_duplicate_attention=False as reformer-pytorch computes it: the "
              "same-round count, keys seen only through windows reaching into another round raised by 20.7, the log "
              "in float32.",
              ("DUP_COUNT", "LSH_REFORMER_PYTORCH_DUP_COUNT"), qk_dims(1, 2, 32, 8), preset="lucidrains", num_buckets=4, num_hashes=2,
              chunk_len=8, dup_correction=True),
        _case("lucidrains_short_sequence", "lucidrains: N=24 <= bucket_size=32 with 4 rounds: full attention (the "
              "LSH path would give 3 chunks of uneven windows).",
              ("SHORT_SEQUENCE_FALLBACK",), qk_dims(1, 2, 24, 8), preset="lucidrains", num_buckets=2, num_hashes=4,
              chunk_len=32),
    ]  # fmt: skip
