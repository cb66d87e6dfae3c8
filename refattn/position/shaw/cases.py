"""Conformance cases for Shaw relative position representations.

Each case is small (a few kilobytes) and built so that the mistake each of
its flags names gives different numbers: lengths well above ``K`` (so that
distances are clipped), tables drawn independently for every row (so that
reading them mirrored, ``i - j`` for ``j - i``, changes every logit), a
relative value table as large as the values, scales far from ``1/sqrt(D)``,
and positions that are not ``arange(N)`` (KV-cache offsets, gaps, negative
positions).

Unless a case says otherwise, keys sit at positions ``0 .. Nk-1`` and
queries at the last ``Nq`` of them, ``(Nk - Nq) + arange(Nq)``: the layout
of tensor2tensor's relative attention (``range_vec_k[-length_q:]``) and of a
KV cache, which bottom-right causal alignment matches.

Arrays are drawn with the shared helpers of refattn/conformance/case.py
(seeded by the CRC-32 of the case id).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...conformance.case import ArrayMaker, Case, Dims, draw, key_padding, make_case, normal, random_mask

PositionMaker = Callable[[Dims], np.ndarray]
SCORES = Dims.scores.fget  # shape_of for a full (B, Hq, Nq, Nk) array


# --- positions: dims -> int64 array -------------------------------------------


#: The flags only these cases use (the shared ones are in refattn/conformance/flags.py).
FLAGS: dict[str, str] = {
    "SHAW_CLIP": (
        "Relative distances beyond K = max_relative_position are clipped to -K or K: every key K or more "
        "positions before the query reads table row 0, every key K or more after reads row 2K. Cases have "
        "lengths well above K (and one has K = 0). Fails implementations that wrap the distance modulo 2K + 1, "
        "give far keys a zero embedding, or index out of the table."
    ),
    "SHAW_DIRECTION": (
        "Row r of the tables is the distance k_position - q_position = r - K (key minus query, as in "
        "tensor2tensor), so row K + 1 is the key just after the query. Cases use independently drawn table "
        "rows and non-causal attention, so both sides are read. Fails implementations that use q - k "
        "(Hugging Face BERT's relative_key distance) without mirroring the tables."
    ),
    "SHAW_VALUE_TERM": (
        "out_i = sum_j P'_ij (v_j + rel_v[r_ij]): the relative value rows are added to the values and weighted "
        "by the same attention weights, after dropout. Cases use a value table as large as the values. Fails "
        "implementations that leave the value term out (relative_key in Hugging Face BERT has none), add it "
        "unweighted, or apply dropout to one term only."
    ),
    "SHAW_SCALE": (
        "The relative key term is inside the scaled logits: scale * (q_i . k_j + q_i . rel_k[r_ij]), so it is "
        "also inside the soft-cap, and the bias comes after both. Cases use a scale far from 1/sqrt(D) or a "
        "soft-cap. Fails implementations that add q_i . rel_k[r_ij] after scaling or after capping."
    ),
    "SHAW_TABLE_GRADIENT": (
        "The gradient of a table row sums over every batch element, head and (query, key) pair that reads it "
        "(the adjoint of a gather is a scatter-add); the clipped edge rows collect every far pair. Fails "
        "backwards that overwrite instead of add, keep one head or one batch element, or drop clipped pairs."
    ),
    "SHAW_POSITIONS": (
        "Relative distances come from the given q_positions and k_positions, not from array indices: with a "
        "KV cache the queries sit at offset + arange(Nq); positions may have gaps or be negative. Fails "
        "implementations that use arange(Nq) for the queries, or align them with the first keys."
    ),
}


def _key_positions(dims: Dims) -> np.ndarray:
    """Keys at ``0 .. Nk-1``."""
    return np.arange(dims.nk, dtype=np.int64)


def _last_query_positions(dims: Dims) -> np.ndarray:
    """Queries at the last ``Nq`` key positions, ``(Nk - Nq) + arange(Nq)`` (tensor2tensor, KV caches)."""
    return np.arange(dims.nq, dtype=np.int64) + (dims.nk - dims.nq)


def _shifted(maker: PositionMaker, shift: int) -> PositionMaker:
    return lambda dims: maker(dims) + shift


def _fixed(positions: list[int]) -> PositionMaker:
    return lambda dims: np.array(positions, dtype=np.int64)


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, clip: int, *, std: float = 1.0,
          table_std: float = 1.0, q_positions: PositionMaker = _last_query_positions,
          k_positions: PositionMaker = _key_positions, bias: ArrayMaker | None = None,
          mask: ArrayMaker | None = None, keep: ArrayMaker | None = None, **params) -> Case:  # fmt: skip
    """One Shaw case with clipping distance ``K = clip``; ``params`` are the other JSON keyword arguments.

    Drawn in order: q, k, v, the tables ``rel_k`` (2K+1, D) and ``rel_v`` (2K+1, Dv), then the
    positions (not random) and ``bias``, ``mask``, ``dropout_keep`` where given.
    """
    rows = 2 * clip + 1
    extra = {
        "rel_k": normal(lambda d: (rows, d.d), table_std),
        "rel_v": normal(lambda d: (rows, d.v_shape[-1]), table_std),
        "q_positions": lambda rng, d: q_positions(d),
        "k_positions": lambda rng, d: k_positions(d),
        **{key: make for key, make in {"bias": bias, "mask": mask, "dropout_keep": keep}.items() if make is not None},
    }
    differentiable = ("q", "k", "v", "rel_k", "rel_v") + (("bias",) if bias is not None else ())
    return make_case("shaw", name, description, flags, draw(dims, extra, std=std),
                     params={"max_relative_position": clip, **params}, differentiable=differentiable)  # fmt: skip


def cases() -> list[Case]:
    """The Shaw conformance cases, in reading order."""
    return [
        # --- the encoding itself ------------------------------------------------
        _case("baseline", "Self-attention over 12 tokens, K = 3, no options: both directions read, both clipped.",
              ("SHAW_CLIP", "SHAW_DIRECTION", "SHAW_VALUE_TERM"), Dims(1, 2, 2, 12, 12, 16), 3),
        _case("clip_far", "K = 2 over 23 tokens: most pairs read the edge rows 0 and 4.",
              ("SHAW_CLIP", "ODD_LENGTH"), Dims(1, 2, 2, 23, 23, 8), 2),
        _case("clip_zero", "K = 0: every pair reads row 0 (q·rel_k[0] per row, rel_v[0] added to every output).",
              ("SHAW_CLIP",), Dims(1, 2, 2, 9, 9, 8), 0),
        _case("direction", "Non-causal, K = 6 over 10 tokens, tables twice as large as q and k: j - i, not i - j.",
              ("SHAW_DIRECTION",), Dims(1, 2, 2, 10, 10, 8), 6, std=0.5, table_std=2.0),
        _case("value_term", "Value table of standard deviation 3 against values of 1: out = sum P (v + rel_v).",
              ("SHAW_VALUE_TERM",), Dims(1, 2, 2, 11, 11, 8), 4, table_std=3.0),
        _case("value_term_dropout", "Dropout p = 0.25 with a keep-mask: both value terms use the dropped weights.",
              ("SHAW_VALUE_TERM", "DROPOUT_SCALING"), Dims(1, 2, 2, 12, 12, 8), 3, table_std=2.0,
              keep=random_mask(SCORES, 0.75), dropout_p=0.25),
        _case("scale_override", "Scale 2.5, q and k of standard deviation 0.4: the relative term is scaled too.",
              ("SHAW_SCALE", "SCALE_OVERRIDE"), Dims(1, 2, 2, 10, 10, 16), 3, std=0.4, table_std=1.5, scale=2.5),
        _case("softcap_bias", "Soft-cap 1.5 over scale * (q·k + q·rel_k), then a bias of standard deviation 2.",
              ("SHAW_SCALE", "SOFTCAP_BEFORE_BIAS", "BIAS"), Dims(1, 2, 2, 9, 9, 16), 3, std=1.5, table_std=1.5,
              bias=normal(SCORES, 2.0), softcap=1.5),
        _case("table_gradient", "B = 2, 3 heads, K = 2 over 14 tokens: table gradients sum batches, heads, far pairs.",
              ("SHAW_TABLE_GRADIENT", "SHAW_CLIP", "MULTI_BATCH"), Dims(2, 3, 3, 14, 14, 8), 2),
        # --- positions -----------------------------------------------------------
        _case("decode_single_query", "One query at position 18 over 19 cached keys, causal, MQA 4:1.",
              ("SHAW_POSITIONS", "SINGLE_TOKEN", "MULTI_QUERY", "CAUSAL_ALIGNMENT"), Dims(1, 4, 1, 1, 19, 8), 4,
              causal=True),
        _case("chunked_prefill", "5 queries at positions 8..12 over 13 keys, causal bottom-right.",
              ("SHAW_POSITIONS", "CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 5, 13, 8), 3, causal=True),
        _case("cross_offset", "7 queries at positions 100..106 over 10 keys at 97..106, non-causal.",
              ("SHAW_POSITIONS", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 7, 10, 8), 4,
              q_positions=_shifted(lambda d: np.arange(d.nq, dtype=np.int64), 100),
              k_positions=_shifted(_key_positions, 97)),
        _case("positions_with_gaps", "Positions with gaps and repeats: keys at 0 1 2 5 6 9 9 10 15, queries at 3 6 9.",
              ("SHAW_POSITIONS", "SHAW_CLIP"), Dims(1, 2, 2, 3, 9, 8), 3,
              q_positions=_fixed([3, 6, 9]), k_positions=_fixed([0, 1, 2, 5, 6, 9, 9, 10, 15])),
        _case("negative_positions", "Positions -40..-29, causal, K = 5: only differences matter.",
              ("SHAW_POSITIONS",), Dims(1, 2, 2, 12, 12, 8), 5, causal=True,
              q_positions=_shifted(_last_query_positions, -40), k_positions=_shifted(_key_positions, -40)),
        # --- the dense pipeline around it ------------------------------------------
        _case("causal", "Causal self-attention over 17 tokens, K = 4.",
              ("CAUSAL_MASK", "SHAW_CLIP"), Dims(1, 2, 2, 17, 17, 16), 4, causal=True),
        _case("causal_long_queries", "9 queries over 5 keys, causal bottom-right: queries 0..3 see no key.",
              ("FULLY_MASKED_ROW", "CAUSAL_ALIGNMENT"), Dims(1, 2, 2, 9, 5, 8), 2, causal=True,
              q_positions=_shifted(lambda d: np.arange(d.nq, dtype=np.int64), -4)),
        _case("sliding_window", "Window (3, 1) over 15 tokens, K = 2: window and clipping are independent.",
              ("SLIDING_WINDOW", "SHAW_CLIP"), Dims(1, 2, 2, 15, 15, 8), 2, window=[3, 1]),
        _case("gqa_causal_cross", "GQA 4:2, B = 2, 6 queries over 10 keys, causal bottom-right, K = 3.",
              ("GQA_HEAD_MAP", "GQA_GRAD_REDUCTION", "SHAW_TABLE_GRADIENT", "MULTI_BATCH"),
              Dims(2, 4, 2, 6, 10, 8), 3, causal=True),
        _case("head_dim_59", "D = 59 for q, k and rel_k, 5 queries over 7 keys, K = 2.",
              ("AWKWARD_HEAD_DIM", "SCALE_DEFAULT"), Dims(1, 1, 1, 5, 7, 59), 2),
        _case("value_dim_differs", "D = 20, Dv = 7: rel_k is (2K+1, 20), rel_v (2K+1, 7), scale 1/sqrt(20).",
              ("VALUE_DIM_DIFFERS", "SCALE_DEFAULT"), Dims(1, 2, 2, 10, 10, 20, 7), 3),
        _case("odd_length_67", "Causal over 67 tokens, K = 8: tails past one 64-wide tile.",
              ("ODD_LENGTH",), Dims(1, 1, 1, 67, 67, 8), 8, causal=True),
        _case("padding_mask", "B = 2, key padding (B, 1, 1, Nk) with valid lengths 11 and 6, K = 3.",
              ("PADDING_MASK", "MASK_BROADCAST", "MULTI_BATCH"), Dims(2, 2, 2, 11, 11, 8), 3,
              mask=key_padding((11, 6))),
    ]  # fmt: skip
