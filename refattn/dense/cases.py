"""Conformance cases for dense attention.

Each case is small (a few kilobytes) and built to catch the bug classes its
flags name (refattn/conformance/flags.py): sizes are awkward on purpose
(D = 59, Nq != Nk, GQA 8:2 and 8:1, B = 2, N = 1, lengths like 67), and the
options are set so that the wrong variant of each behaviour gives different
numbers (a ``CAUSAL_ALIGNMENT`` case always has Nq != Nk, a ``GQA_HEAD_MAP``
case has at least two distinct kv heads, a ``SOFTCAP_BEFORE_BIAS`` case has
a bias large enough for the order to matter).

Arrays are drawn with the shared helpers of refattn/conformance/case.py
(seeded by the CRC-32 of the case id).

:func:`large_cases` lists the long-sequence cases of ``refattn export
--large``: forward only, computed with the Numba kernel, not committed.
"""

from __future__ import annotations

import numpy as np

from ..conformance.case import (
    ArrayMaker,
    Case,
    Dims,
    draw,
    every_row_has_a_key,
    key_padding,
    normal,
    make_case,
    query_and_key_padding,
    random_mask,
    with_empty_rows,
)

SCORES = Dims.scores.fget  # shape_of for a full (B, Hq, Nq, Nk) array


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, std: float = 1.0,
          bias: ArrayMaker | None = None, mask: ArrayMaker | None = None, keep: ArrayMaker | None = None,
          grad: bool = True, **params) -> Case:  # fmt: skip
    """One dense case; ``params`` are the JSON keyword arguments (causal, window, scale, ...)."""
    extra = {"bias": bias, "mask": mask, "dropout_keep": keep}
    extra = {key: make for key, make in extra.items() if make is not None}
    return make_case(
        "dense",
        name,
        description,
        flags,
        draw(dims, extra, std=std),
        params=params,
        differentiable=("q", "k", "v", "bias") if bias is not None else ("q", "k", "v"),
        grad=grad,
    )


def cases() -> list[Case]:
    """The dense conformance cases, in reading order."""
    return [
        # --- shapes and scale ------------------------------------------------
        _case("baseline", "Plain attention, B=1, H=2, N=16, D=16, no options.",
              ("BASELINE",), Dims(1, 2, 2, 16, 16, 16)),
        _case("head_dim_59", "Head dim 59 and length 23: default scale 1/sqrt(59), no aligned tiles.",
              ("AWKWARD_HEAD_DIM", "SCALE_DEFAULT", "ODD_LENGTH"), Dims(1, 2, 2, 23, 23, 59)),
        _case("value_dim_differs", "D=20 for q and k, Dv=7 for v: output (.., 7), scale 1/sqrt(20).",
              ("VALUE_DIM_DIFFERS", "SCALE_DEFAULT"), Dims(1, 2, 2, 12, 12, 20, 7)),
        _case("odd_length_67", "Causal self-attention over 67 tokens: tails past one 64-wide tile.",
              ("ODD_LENGTH", "CAUSAL_MASK"), Dims(1, 1, 1, 67, 67, 16), causal=True),
        _case("cross_short_queries", "7 queries over 19 keys, no mask.",
              ("UNEQUAL_LENGTHS", "ODD_LENGTH"), Dims(1, 2, 2, 7, 19, 16)),
        _case("cross_long_queries", "19 queries over 7 keys, no mask.",
              ("UNEQUAL_LENGTHS",), Dims(1, 2, 2, 19, 7, 16)),
        _case("scale_override", "Explicit scale 0.37 instead of 1/sqrt(16).",
              ("SCALE_OVERRIDE",), Dims(1, 2, 2, 12, 12, 16), scale=0.37),
        # --- single tokens ---------------------------------------------------
        _case("decode_single_query", "One query over 31 cached keys, causal bottom-right (sees every key), MQA 4:1.",
              ("SINGLE_TOKEN", "CAUSAL_ALIGNMENT", "MULTI_QUERY"), Dims(1, 4, 1, 1, 31, 16), causal=True),
        _case("single_key", "9 queries over one key: weights are exactly 1, dq and dk come from dlse alone.",
              ("SINGLE_TOKEN", "LSE_GRADIENT"), Dims(1, 2, 2, 9, 1, 16)),
        _case("single_token", "Nq = Nk = 1, causal, B=2.",
              ("SINGLE_TOKEN", "MULTI_BATCH"), Dims(2, 2, 2, 1, 1, 8), causal=True),
        # --- grouped-query heads ---------------------------------------------
        _case("gqa_8_to_2", "8 query heads over 2 distinct kv heads: head h reads kv head h // 4.",
              ("GQA_HEAD_MAP", "GQA_GRAD_REDUCTION"), Dims(1, 8, 2, 11, 11, 16)),
        _case("mqa_8_to_1", "8 query heads over one kv head; dk and dv sum all 8.",
              ("MULTI_QUERY", "GQA_GRAD_REDUCTION"), Dims(1, 8, 1, 11, 11, 16)),
        _case("gqa_causal_cross", "GQA 4:2, B=2, D=59, 6 queries over 10 keys, causal bottom-right.",
              ("GQA_HEAD_MAP", "CAUSAL_ALIGNMENT", "MULTI_BATCH", "AWKWARD_HEAD_DIM"),
              Dims(2, 4, 2, 6, 10, 59), causal=True),
        # --- causal alignment ------------------------------------------------
        _case("causal", "Causal self-attention, N=17.",
              ("CAUSAL_MASK",), Dims(1, 2, 2, 17, 17, 16), causal=True),
        _case("causal_bottom_right_short_queries", "5 queries over 13 keys, causal bottom-right: query 0 sees 0..8.",
              ("CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 5, 13, 16), causal=True),
        _case("causal_top_left_short_queries", "5 queries over 13 keys, causal top-left: query 0 sees key 0 only.",
              ("CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 5, 13, 16),
              causal=True, causal_alignment="top_left"),
        _case("causal_bottom_right_long_queries", "13 queries over 5 keys, causal bottom-right: queries 0..7 see none.",
              ("CAUSAL_ALIGNMENT", "FULLY_MASKED_ROW"), Dims(1, 2, 2, 13, 5, 16), causal=True),
        _case("causal_top_left_long_queries", "13 queries over 5 keys, causal top-left: queries 4..12 see every key.",
              ("CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 13, 5, 16),
              causal=True, causal_alignment="top_left"),
        # --- windows ---------------------------------------------------------
        _case("sliding_window", "Window (3, 2) over 20 tokens, not causal.",
              ("SLIDING_WINDOW",), Dims(1, 2, 2, 20, 20, 16), window=[3, 2]),
        _case("sliding_window_cross_bottom_right", "Window (3, 1) with 6 queries over 15 keys, bottom-right aligned.",
              ("SLIDING_WINDOW", "CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 6, 15, 16), window=[3, 1]),
        _case("sliding_window_cross_top_left", "Window (3, 1) with 6 queries over 15 keys, top-left aligned.",
              ("SLIDING_WINDOW", "CAUSAL_ALIGNMENT"), Dims(1, 2, 2, 6, 15, 16),
              window=[3, 1], causal_alignment="top_left"),
        _case("window_wider_than_sequence", "Window (64, 64) over 9 tokens: the same as no window.",
              ("WINDOW_WIDER_THAN_SEQUENCE",), Dims(1, 2, 2, 9, 9, 16), window=[64, 64]),
        _case("window_wider_causal_cross", "Causal, window (100, 0), 5 queries over 12 keys: the same as causal.",
              ("WINDOW_WIDER_THAN_SEQUENCE", "CAUSAL_ALIGNMENT"), Dims(1, 2, 2, 5, 12, 16),
              causal=True, window=[100, 0]),
        # --- masks -----------------------------------------------------------
        _case("mask_layout", "Unstructured (B, H, N, N) mask, about half the keys, every row non-empty.",
              ("MASK_LAYOUT", "MULTI_BATCH"), Dims(2, 2, 2, 12, 12, 16),
              mask=every_row_has_a_key(random_mask(SCORES, 0.5))),
        _case("mask_2d", "A (Nq, Nk) mask broadcast over batch and heads, 10 queries over 14 keys.",
              ("MASK_BROADCAST",), Dims(1, 2, 2, 10, 14, 8),
              mask=every_row_has_a_key(random_mask(lambda d: (d.nq, d.nk), 0.6))),
        _case("mask_causal_window", "A (1, H, N, N) mask over B=2, AND causal AND window (5, None), 15 tokens.",
              ("MASK_COMBINATION", "SLIDING_WINDOW", "MASK_BROADCAST"), Dims(2, 2, 2, 15, 15, 16),
              mask=random_mask(lambda d: (1, d.hq, d.nq, d.nk), 0.7), causal=True, window=[5, None]),
        _case("padding_mask_keys", "B=2, key padding mask (B, 1, 1, Nk), valid lengths 13 and 6.",
              ("PADDING_MASK", "MASK_BROADCAST", "MULTI_BATCH"), Dims(2, 2, 2, 13, 13, 16),
              mask=key_padding((13, 6))),
        _case("padding_mask_queries", "B=2, padded self-attention (B, 1, N, N), lengths 9, 4: padded queries see none.",
              ("PADDING_MASK", "FULLY_MASKED_ROW", "MULTI_BATCH"), Dims(2, 2, 2, 9, 9, 16),
              mask=query_and_key_padding((9, 4))),
        _case("fully_masked_rows", "Random mask with three query rows fully masked in different heads.",
              ("FULLY_MASKED_ROW", "MASK_LAYOUT"), Dims(1, 2, 2, 8, 10, 16),
              mask=with_empty_rows(every_row_has_a_key(random_mask(SCORES, 0.6)), [(0, 0, 2), (0, 1, 0), (0, 1, 5)])),
        _case("fully_masked_everything", "Every row fully masked: output, gradients all 0, lse all -inf.",
              ("FULLY_MASKED_ROW",), Dims(1, 2, 1, 4, 6, 8),
              mask=lambda rng, dims: np.zeros((dims.nq, dims.nk), dtype=bool)),
        # --- logits: scale, soft-cap, bias -----------------------------------
        _case("large_logits", "Scale 1e3: scores in the thousands, exp overflows without max-subtraction.",
              ("LARGE_LOGITS", "SCALE_OVERRIDE"), Dims(1, 2, 2, 10, 10, 8), std=0.5, scale=1000.0),
        _case("softcap_extreme", "Soft-cap 1.5 on scores of standard deviation 4: tanh saturates.",
              ("SOFTCAP",), Dims(1, 2, 2, 12, 12, 16), std=2.0, softcap=1.5),
        _case("softcap_before_bias", "Soft-cap 2 then a full bias of standard deviation 3.",
              ("SOFTCAP_BEFORE_BIAS", "BIAS"), Dims(1, 2, 2, 10, 10, 16), std=1.5,
              bias=normal(SCORES, 3.0), softcap=2.0),
        _case("softcap_before_mask", "Soft-cap 1, causal: capping after the mask would give masked keys logit -1.",
              ("SOFTCAP_BEFORE_MASK", "CAUSAL_MASK"), Dims(1, 2, 2, 12, 12, 16), std=2.0,
              softcap=1.0, causal=True),
        _case("bias_full", "Full (B, H, Nq, Nk) bias of standard deviation 1, 8 queries over 11 keys.",
              ("BIAS",), Dims(2, 2, 2, 8, 11, 16), bias=normal(SCORES)),
        _case("bias_broadcast_heads", "ALiBi-like (1, H, 1, Nk) bias, GQA 4:2; its gradient sums batch and queries.",
              ("BIAS_BROADCAST", "GQA_HEAD_MAP"), Dims(1, 4, 2, 9, 12, 16), bias=normal(lambda d: (1, d.hq, 1, d.nk), 2.0)),
        _case("bias_broadcast_2d", "(Nq, Nk) bias broadcast over B=2 and heads.",
              ("BIAS_BROADCAST", "MULTI_BATCH"), Dims(2, 2, 2, 10, 10, 8), bias=normal(lambda d: (d.nq, d.nk), 2.0)),
        # --- dropout and log-sum-exp -----------------------------------------
        _case("dropout", "Dropout p = 0.25 with a given keep-mask: kept weights times 4/3, lse unchanged.",
              ("DROPOUT_SCALING",), Dims(1, 2, 2, 12, 12, 16),
              keep=random_mask(SCORES, 0.75), dropout_p=0.25),
        _case("lse_definition", "Scale 0.7, a full bias and a partial mask: lse of the final logits, natural log.",
              ("LSE_DEFINITION",), Dims(1, 2, 2, 10, 13, 16), bias=normal(SCORES),
              mask=every_row_has_a_key(random_mask(SCORES, 0.7)), scale=0.7),
        # --- everything at once ----------------------------------------------
        _case("combined", "GQA 4:2, B=2, D=59, Dv=7, 9 queries over 14 keys, causal bottom-right, window (6, None), "
              "key padding, broadcast bias, soft-cap 5, scale 0.2, dropout 0.1.",
              ("MASK_COMBINATION", "CAUSAL_ALIGNMENT", "GQA_HEAD_MAP", "VALUE_DIM_DIFFERS", "PADDING_MASK"),
              Dims(2, 4, 2, 9, 14, 59, 7), std=1.5,
              bias=normal(lambda d: (1, d.hq, 1, d.nk)), mask=key_padding((14, 10)),
              keep=random_mask(SCORES, 0.9), causal=True, window=[6, None], softcap=5.0, scale=0.2, dropout_p=0.1),
    ]  # fmt: skip


def large_cases() -> list[Case]:
    """Long-sequence cases for ``refattn export --large``: forward only, computed with the Numba kernel.

    They are not committed (tens of MB each); their float64 outputs come from
    ``backend="numba"``, which the default suite verifies against the reference.
    """
    return [
        _case("long_causal_16384", "Causal self-attention over 16384 tokens, GQA 2:1, D=64.",
              ("LONG_SEQUENCE", "CAUSAL_MASK"), Dims(1, 2, 1, 16384, 16384, 64), grad=False, causal=True),
        _case("long_window_65536", "Causal sliding window (1024, 0) over 65536 tokens, D=32.",
              ("LONG_SEQUENCE", "SLIDING_WINDOW"), Dims(1, 1, 1, 65536, 65536, 32), grad=False,
              causal=True, window=[1024, 0]),
        _case("long_decode_65536", "One query over 65536 cached keys, MQA 8:1, D=64.",
              ("LONG_SEQUENCE", "SINGLE_TOKEN", "MULTI_QUERY"), Dims(1, 8, 1, 1, 65536, 64), grad=False, causal=True),
        _case("long_cross_gqa", "4096 queries over 32768 keys, causal bottom-right, GQA 4:2, D=59.",
              ("LONG_SEQUENCE", "CAUSAL_ALIGNMENT", "AWKWARD_HEAD_DIM"), Dims(1, 4, 2, 4096, 32768, 59),
              grad=False, causal=True),
    ]  # fmt: skip
