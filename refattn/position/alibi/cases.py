"""Conformance cases for ALiBi.

Each case is small and built so that the mistake its flags name changes the
numbers: a slope case has slopes that no simpler formula reproduces (4, 6, 12
or 16 heads), a position case has queries whose positions are not their
array indices, a form case has keys on both sides of the query, and the
shortcut case has queries far from position 0, so that the key-only bias's
log-sum-exp is off by a large ``m_h · p_i``.

Positions are arrays of the case (``param.q_positions``, ``param.k_positions``,
int64). Slopes are the defaults (``alibi_slopes(Hq)``), which an
implementation must compute itself, except in the explicit-slopes case.

Seeds are the CRC-32 of the case id (refattn.conformance.case); the flags
only ALiBi uses are described in :data:`FLAGS`.
"""

from __future__ import annotations

from ...conformance.case import ArrayMaker, Case, Dims, make_case
from ..rope.cases import cached_positions, draw_with_positions, spread_positions

FLAGS: dict[str, str] = {
    "ALIBI_SLOPES": (
        "The default ALiBi slopes are the authors' get_slopes(Hq): for Hq a power of two, m_h = 2^(-8(h+1)/Hq) "
        "(1/2 ... 1/256 for 8 heads, 1/4 ... 1/256 for 4, 2^(-(h+1)/2) for 16). Cases use 4 or 16 heads, where "
        "2^-(h+1), 2^(-8h/Hq) or a float32 pow of a rounded base give other slopes."
    ),
    "ALIBI_NON_POW2_HEADS": (
        "For Hq not a power of two, the slopes of the largest power of two c below Hq come first, then every "
        "other slope of 2c heads (the 1st, 3rd, ...), Hq - c of them: 6 heads give 1/4, 1/16, 1/64, 1/256, 1/2, "
        "1/8. Fails implementations that use the geometric 2^(-8(h+1)/Hq) for every head count, or round up."
    ),
    "ALIBI_SLOPE_ORDER": (
        "Query head h uses slope m_h, in the order get_slopes returns them, also with grouped-query heads (the "
        "slope follows the query head, not the kv head h // G). Fails reversed slopes and slopes indexed by kv head."
    ),
    "ALIBI_SIGN": (
        "The ALiBi term is a penalty: m_h (p_j - p_i) for keys before the query, i.e. -m_h (p_i - p_j), or "
        "-m_h |p_i - p_j| in the symmetric form. Fails an implementation that adds +m_h |p_i - p_j|."
    ),
    "ALIBI_SYMMETRIC_FORM": (
        "form = 'causal' is m_h (p_j - p_i) for every key, so without a causal mask keys after the query get a "
        "positive term; form = 'symmetric' is -m_h |p_j - p_i| (FlashAttention's non-causal ALiBi). Cases have "
        "keys on both sides of each query: using one form for the other fails."
    ),
    "ALIBI_POSITION_OFFSET": (
        "The distance is between the given positions p_i = q_positions[i] and p_j = k_positions[j], not array "
        "indices: decoding with a cache has q_positions = Nk - Nq + arange(Nq), packed sequences have gaps. Fails "
        "implementations that use i and j, or align queries top-left, in the bias."
    ),
    "ALIBI_SHORTCUT_LSE": (
        "Adding m_h p_j alone (BLOOM, MPT, the authors' fairseq code, FlashAttention's causal path) differs from "
        "the causal form by m_h p_i, a constant per query row: outputs and gradients are the same, the "
        "log-sum-exp is larger by m_h p_i. Cases have queries far from position 0; the lse must be the causal form's."
    ),
    "ALIBI_EXPLICIT_SLOPES": (
        "Slopes given as an argument replace the default ones, one per query head, in the given order. Fails "
        "implementations that ignore them or recompute get_slopes(Hq)."
    ),
}


# --- positions: (rng, dims) -> (q_positions, k_positions) ----------------------


def _aligned(offset: int = 0):
    """Keys at ``offset + arange(Nk)``, queries at ``offset + Nk − Nq + arange(Nq)``: aligned bottom-right,
    as in cached decoding (with Nq > Nk the first queries sit before key 0)."""
    return lambda rng, dims: cached_positions(dims, offset)


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, positions=None, std: float = 1.0,
          slopes: ArrayMaker | None = None, bias: ArrayMaker | None = None, mask: ArrayMaker | None = None,
          **params) -> Case:  # fmt: skip
    """One ALiBi case; ``params`` are the JSON keyword arguments (form, causal, window, scale, ...)."""
    extra = {key: make for key, make in {"slopes": slopes, "bias": bias, "mask": mask}.items() if make is not None}
    return make_case(
        "alibi", name, description, flags, draw_with_positions(dims, positions or _aligned(), extra, std=std),
        params=params, differentiable=("q", "k", "v", "bias") if bias is not None else ("q", "k", "v"),
    )  # fmt: skip


def cases() -> list[Case]:
    """The ALiBi conformance cases, in reading order."""
    return [
        # --- slopes ----------------------------------------------------------
        _case("causal_4_heads", "Causal self-attention, 4 heads (slopes 1/4, 1/16, 1/64, 1/256), N=16.",
              ("ALIBI_SLOPES", "ALIBI_SIGN", "CAUSAL_MASK"), Dims(1, 4, 2, 16, 16, 8), form="causal", causal=True),
        _case("causal_16_heads_decode", "One query at position 40 over 41 keys, MQA 16:1: slopes 2^(-(h+1)/2).",
              ("ALIBI_SLOPES", "SINGLE_TOKEN", "MULTI_QUERY"), Dims(1, 16, 1, 1, 41, 8), form="causal", causal=True),
        _case("non_pow2_6_heads", "6 heads over one kv head: slopes 1/4, 1/16, 1/64, 1/256, 1/2, 1/8, causal, N=12.",
              ("ALIBI_NON_POW2_HEADS", "MULTI_QUERY"), Dims(1, 6, 1, 12, 12, 8), form="causal", causal=True),
        _case("non_pow2_12_heads_gqa", "12 heads over 4 kv heads, symmetric form, not causal, N=10.",
              ("ALIBI_NON_POW2_HEADS", "ALIBI_SYMMETRIC_FORM", "GQA_HEAD_MAP"), Dims(1, 12, 4, 10, 10, 8),
              form="symmetric"),
        _case("gqa_8_to_2", "8 query heads over 2 kv heads, causal: query head h uses slope 2^-(h+1).",
              ("ALIBI_SLOPE_ORDER", "GQA_HEAD_MAP", "GQA_GRAD_REDUCTION"), Dims(1, 8, 2, 11, 11, 8),
              form="causal", causal=True),
        _case("explicit_slopes", "Slopes drawn uniformly from [0.05, 1], 4 heads, symmetric, B=2.",
              ("ALIBI_EXPLICIT_SLOPES", "MULTI_BATCH"), Dims(2, 4, 2, 9, 9, 8),
              slopes=lambda rng, dims: rng.uniform(0.05, 1.0, dims.hq), form="symmetric"),
        # --- forms -------------------------------------------------------------
        _case("symmetric_bidirectional", "Symmetric form -m|p_j - p_i|, not causal, 4 heads, N=13.",
              ("ALIBI_SYMMETRIC_FORM", "ALIBI_SIGN"), Dims(1, 4, 2, 13, 13, 8), form="symmetric"),
        _case("causal_form_unmasked", "Causal form m (p_j - p_i) without a causal mask: keys after the query gain.",
              ("ALIBI_SYMMETRIC_FORM",), Dims(1, 4, 2, 12, 12, 8), form="causal"),
        # --- positions -----------------------------------------------------------
        _case("decode_offset", "3 queries at positions 17-19 over 20 cached keys, causal bottom-right, 8 heads.",
              ("ALIBI_POSITION_OFFSET", "ALIBI_SHORTCUT_LSE", "CAUSAL_ALIGNMENT"), Dims(1, 8, 2, 3, 20, 8),
              form="causal", causal=True),
        _case("cross_symmetric_offset", "5 queries at positions 8-12 over 13 keys, symmetric, not causal.",
              ("ALIBI_POSITION_OFFSET", "UNEQUAL_LENGTHS"), Dims(1, 4, 2, 5, 13, 8), form="symmetric"),
        _case("gapped_positions", "Keys at 14 sorted distinct positions in [0, 60), queries at 6 of them, symmetric.",
              ("ALIBI_POSITION_OFFSET",), Dims(1, 4, 2, 6, 14, 8), positions=spread_positions(60), form="symmetric"),
        _case("shortcut_lse", "Causal, positions 300-315: the key-only shortcut's lse is off by m_h p_i >= 1.17.",
              ("ALIBI_SHORTCUT_LSE", "ALIBI_POSITION_OFFSET"), Dims(1, 4, 1, 16, 16, 8), positions=_aligned(300),
              form="causal", causal=True),
        # --- with the dense options ------------------------------------------
        _case("bias_softcap_window", "User bias (1, H, 1, Nk) + ALiBi after soft-cap 2, causal window (4, 0), GQA 4:2.",
              ("SOFTCAP_BEFORE_BIAS", "BIAS_BROADCAST", "SLIDING_WINDOW"), Dims(1, 4, 2, 12, 12, 8), std=1.5,
              bias=lambda rng, dims: rng.standard_normal((1, dims.hq, 1, dims.nk)), form="causal", causal=True,
              window=[4, 0], softcap=2.0),
        _case("fully_masked_rows", "7 queries over 4 keys, causal bottom-right: queries 0-2 see no key.",
              ("FULLY_MASKED_ROW", "CAUSAL_ALIGNMENT"), Dims(1, 4, 4, 7, 4, 8), form="causal", causal=True),
    ]  # fmt: skip
