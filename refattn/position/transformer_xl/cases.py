"""Conformance cases for Transformer-XL relative attention scores.

Each case is small (a few kilobytes) and built so that the mistake each of
its flags names changes the numbers: ``r`` has rows for exactly the
distances an implementation must read (and sometimes more, or fewer behind
a window), ``u`` and ``v_bias`` are distinct, lengths are awkward (D = 59,
Nq != Nk, 67 tokens), and positions carry memory offsets, constant shifts
and gaps. Most cases follow the original's setup -- causal, ``k_positions =
arange(Nk)``, ``q_positions = mem_len + arange(Nq)``, ``R = Nk`` -- and the
others depart from it one way at a time.

The sinusoid table (``sinusoid_relative_embeddings``: layout, descending
distances, ``clamp_len``) is not a mechanism input -- implementations are
given ``r`` -- so it has no case here; tests/test_position_transformer_xl.py
checks it against closed forms and the original's code.

Arrays are drawn with the shared helpers of refattn/conformance/case.py
(seeded by the CRC-32 of the case id).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...conformance.case import ArrayMaker, Case, Dims, draw, key_padding, make_case, normal, random_mask

Positions = Callable[[Dims], tuple[np.ndarray, np.ndarray]]
SCORES = Dims.scores.fget  # shape_of for a full (B, Hq, Nq, Nk) array


# --- positions: dims -> (q_positions, k_positions) ---------------------------


#: The flags only these cases use (the shared ones are in refattn/conformance/flags.py).
FLAGS: dict[str, str] = {
    "XL_REL_SHIFT": (
        "Query i and key j read row R - 1 - (q_positions[i] - k_positions[j]) of r: rows run in descending "
        "order of distance (the original's pos_seq = arange(klen - 1, -1, -1)), whatever R is. Fails a relative "
        "shift that is off by one (the row of distance d +- 1), r read in ascending order (row t for distance t), "
        "and rows counted from Nk instead of R."
    ),
    "XL_BIAS_TERMS": (
        "u (the original's r_w_bias) is added to q in the content term, (q + u) . k, and v_bias (r_r_bias) in "
        "the position term, (q + v_bias) . r. Cases use distinct, large u and v_bias. Fails implementations that "
        "swap them, drop one or add one to both terms, and backwards that do not sum du and dv_bias over the "
        "batch and the queries."
    ),
    "XL_MEMORY": (
        "Keys include mem_len cached positions before the queries (Nk = mem_len + Nq, q_positions = mem_len + "
        "arange(Nq), k_positions = arange(Nk)): query i is at distance mem_len + i - j from key j and sees keys "
        "j <= i + mem_len. Fails distances measured from query indices without the memory offset, and a causal "
        "mask aligned top-left."
    ),
    "XL_EXPLICIT_POSITIONS": (
        "Distances come from the given q_positions and k_positions: the case's positions carry a constant "
        "offset or gaps. Fails implementations that index r by absolute position, or derive distances from "
        "indices (as the original's rel-shift does, which is right only for q_positions = mem_len + arange(Nq) "
        "and k_positions = arange(Nk))."
    ),
    "XL_SOFTCAP_SCOPE": (
        "The soft-cap applies to the whole scaled score scale * ((q + u) . k + (q + v_bias) . r). Fails "
        "implementations that cap the content term alone and add the position term afterwards, as a bias "
        "passed to a dense kernel would be."
    ),
    "XL_TABLE_GRADIENTS": (
        "Row t of dr sums, over the batch, every pair (i, j) that read row t (pairs at equal distance share a "
        "row); rows that no unmasked pair reads get 0; r, u and v_bias have one row per query head, also under "
        "GQA. Fails backwards that overwrite instead of adding, keep one batch element, or index the tables "
        "by kv head."
    ),
}


def _original(offset: int = 0) -> Positions:
    """The original's positions, shifted by ``offset``: keys at ``offset + arange(Nk)``, queries at
    ``offset + mem_len + arange(Nq)`` with ``mem_len = Nk - Nq`` (the last Nq key positions; negative
    first positions when Nq > Nk)."""

    def make(dims: Dims):
        return offset + np.arange(dims.nk - dims.nq, dims.nk), offset + np.arange(dims.nk)

    return make


def _after_the_keys(dims: Dims):
    """Queries at Nk ... Nk + Nq - 1, after every key at 0 ... Nk - 1: every distance is positive."""
    return dims.nk + np.arange(dims.nq), np.arange(dims.nk)


def _with_gaps(step: tuple[int, ...]) -> Positions:
    """Keys at the cumulative sums of ``step`` (repeated), queries at the last Nq key positions."""

    def make(dims: Dims):
        keys = np.cumsum(np.resize(np.array(step), dims.nk)) - step[0]
        return keys[-dims.nq :], keys

    return make


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, rows: int, positions: Positions, *,
          std: float = 1.0, table_std: float = 1.0, bias_std: float = 0.5, bias: ArrayMaker | None = None,
          mask: ArrayMaker | None = None, keep: ArrayMaker | None = None, causal: bool = True,
          **params) -> Case:  # fmt: skip
    """One case with ``rows`` rows of ``r``; ``params`` are the JSON keyword arguments (window, scale, softcap, ...).

    Drawn in order: q, k, v, ``r`` (Hq, rows, D), ``u`` and ``v_bias`` (Hq, D), then the positions (not
    random) and ``bias``, ``mask``, ``dropout_keep`` where given.
    """
    extra = {
        "r": normal(lambda d: (d.hq, rows, d.d), table_std),
        "u": normal(lambda d: (d.hq, d.d), bias_std),
        "v_bias": normal(lambda d: (d.hq, d.d), bias_std),
        "q_positions": lambda rng, d: positions(d)[0].astype(np.int64),
        "k_positions": lambda rng, d: positions(d)[1].astype(np.int64),
        **{key: make for key, make in (("bias", bias), ("mask", mask), ("dropout_keep", keep)) if make is not None},
    }
    differentiable = ("q", "k", "v", "r", "u", "v_bias") + (("bias",) if bias is not None else ())
    return make_case("transformer_xl", name, description, flags, draw(dims, extra, std=std),
                     params=dict(causal=causal, **params), differentiable=differentiable)  # fmt: skip


def cases() -> list[Case]:
    """The Transformer-XL conformance cases, in reading order."""
    return [
        # --- the original's setup ---------------------------------------------
        _case("original_no_memory", "The original without memory: 12 tokens, causal, R = Nk = 12.",
              ("XL_REL_SHIFT", "CAUSAL_MASK"), Dims(1, 2, 2, 12, 12, 8), 12, _original()),
        _case("original_with_memory", "mem_len 7: 9 queries at positions 7..15 over 16 keys, causal bottom-right, "
              "R = 16, B = 2.",
              ("XL_MEMORY", "XL_REL_SHIFT", "CAUSAL_ALIGNMENT", "MULTI_BATCH"), Dims(2, 2, 2, 9, 16, 8), 16,
              _original()),
        _case("bias_terms", "u and v_bias of standard deviation 2 against keys and r of standard deviation 0.5, "
              "mem_len 3: swapping or dropping either term moves every score.",
              ("XL_BIAS_TERMS", "XL_MEMORY"), Dims(2, 2, 2, 8, 11, 8), 11, _original(), std=0.5, table_std=0.5,
              bias_std=2.0),
        _case("more_rows_than_keys", "R = 20 rows for 11 keys, B = 2: row t holds distance 19 - t, rows 0..8 are "
              "never read and get no gradient.",
              ("XL_REL_SHIFT", "XL_TABLE_GRADIENTS", "MULTI_BATCH"), Dims(2, 2, 2, 11, 11, 8), 20, _original()),
        _case("odd_length_67", "67 tokens, causal, R = 67: tiles of 64 and a tail; distances up to 66.",
              ("XL_REL_SHIFT", "ODD_LENGTH"), Dims(1, 1, 1, 67, 67, 8), 67, _original(), table_std=0.5),
        # --- positions --------------------------------------------------------
        _case("shifted_positions", "The memory setup with every position shifted by 1000: distances, and so "
              "outputs, are those of positions 0..15.",
              ("XL_EXPLICIT_POSITIONS", "XL_MEMORY"), Dims(1, 2, 2, 6, 15, 8), 15, _original(offset=1000)),
        _case("positions_with_gaps", "Keys at positions with gaps of 1, 3 and 2 (0, 3, 5, 6, ...), queries the "
              "last 7 of them, causal; R = 33 covers the largest distance.",
              ("XL_EXPLICIT_POSITIONS", "XL_TABLE_GRADIENTS"), Dims(1, 2, 2, 7, 16, 8), 33, _with_gaps((1, 3, 2))),
        _case("queries_after_keys", "Not causal: 7 queries at positions 19..25 after 19 keys at 0..18, no mask; "
              "every distance lies in 1..25 and R = 26.",
              ("XL_EXPLICIT_POSITIONS", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 7, 19, 8), 26, _after_the_keys,
              causal=False),
        _case("window_fewer_rows", "Causal window (4, 0) with mem_len 9 and R = 5: only distances 0..4 have a row, "
              "and the window masks every other pair.",
              ("XL_REL_SHIFT", "XL_MEMORY", "SLIDING_WINDOW"), Dims(1, 2, 2, 8, 17, 8), 5, _original(),
              window=[4, 0]),
        # --- heads and tokens -------------------------------------------------
        _case("gqa_memory", "GQA 4:2, D = 59, mem_len 4: 6 queries over 10 keys, causal bottom-right; "
              "r, u, v_bias per query head.",
              ("GQA_HEAD_MAP", "GQA_GRAD_REDUCTION", "XL_TABLE_GRADIENTS", "AWKWARD_HEAD_DIM"),
              Dims(1, 4, 2, 6, 10, 59), 10, _original()),
        _case("decode_single_query", "One query at position 22 over 23 cached keys, MQA 4:1, causal.",
              ("SINGLE_TOKEN", "XL_MEMORY", "MULTI_QUERY"), Dims(1, 4, 1, 1, 23, 8), 23, _original()),
        _case("more_queries_than_keys", "9 queries at positions -4..4 over 5 keys, causal bottom-right: queries "
              "0..3 see no key.",
              ("FULLY_MASKED_ROW", "CAUSAL_ALIGNMENT"), Dims(1, 2, 2, 9, 5, 8), 5, _original()),
        # --- logits -----------------------------------------------------------
        _case("softcap_whole_score", "Soft-cap 2 on scores of standard deviation about 3, mem_len 5: the cap "
              "applies to content plus position term.",
              ("XL_SOFTCAP_SCOPE", "SOFTCAP"), Dims(1, 2, 2, 8, 13, 8), 13, _original(), std=1.5, table_std=1.5,
              softcap=2.0),
        _case("bias_mask_dropout", "A (1, H, 1, Nk) bias, key padding (13 and 9 keys), dropout 0.2, scale 0.3, "
              "mem_len 4, Dv = 7.",
              ("BIAS_BROADCAST", "PADDING_MASK", "DROPOUT_SCALING", "SCALE_OVERRIDE"),
              Dims(2, 2, 2, 9, 13, 8, 7), 13, _original(), bias=normal(lambda d: (1, d.hq, 1, d.nk)),
              mask=key_padding((13, 9)), keep=random_mask(SCORES, 0.8), dropout_p=0.2, scale=0.3),
    ]  # fmt: skip
