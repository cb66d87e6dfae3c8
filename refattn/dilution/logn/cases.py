"""Conformance cases for log-n scaled attention.

Each case is small and built so that the mistake its flags name changes the
numbers: the scale cases have ``log n`` far from ``log2 n`` and ``1 / log n``
(``n`` = 10 or 512), the length cases have ``Nq != Nk`` or masks under which
the per-row attended count differs from ``Nk`` (log-n keeps ``log Nk``), the
explicit-``n`` case has ``n`` far from ``Nk``, and the ``n = 1`` case has
every score 0. ``n`` is a JSON parameter when given.

Arrays are drawn with the shared helpers of refattn/conformance/case.py
(seeded by the CRC-32 of the case id).
"""

from __future__ import annotations

from ...conformance.case import ArrayMaker, Case, Dims, draw, key_padding, make_case, normal


#: The flags only these cases use (the shared ones are in refattn/conformance/flags.py).
FLAGS: dict[str, str] = {
    "LOGN_SCALE": (
        "The scaled scores are multiplied by the natural log of n, before the soft-cap and the bias (the bias is "
        "not multiplied); n = 1 gives log 1 = 0 and uniform scores. Fails implementations that use log2 n or "
        "log10 n, divide by log n, or multiply the final logits (after the cap, bias included)."
    ),
    "LOGN_LENGTH": (
        "By default n is Nk, the number of keys, the same for every row and unchanged by masks. Cases have Nq != "
        "Nk, causal or padding masks. Fails implementations that use the query length Nq, the per-row attended "
        "count (SSMax's n), the unpadded length, or the query position."
    ),
    "LOGN_EXPLICIT_N": (
        "An explicit n (a training length) replaces Nk in log n, on every row. Fails implementations that ignore "
        "it, use log(Nk) / log(n) (Qwen's log_n(i) with the training length as base) or clamp the factor at 1."
    ),
    "LOGN_TRAINING_LENGTH": (
        "With training_length L (Qwen's use_logn_attn at inference; QwenLM/Qwen-Audio 0b0e882, modeling_qwen.py, "
        "QWenAttention): row i at position p_i = i + Nk - Nq gets log(p_i + 1) / log L where p_i + 1 > L and 1 "
        "elsewhere, a factor per row. Cases decode past L. Fails one n for every row, the factor without the 1 floor, "
        "positions counted from the first query instead of the sequence, or natural log n without the base L."
    ),
}


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, std: float = 1.0,
          bias: ArrayMaker | None = None, mask: ArrayMaker | None = None, **params) -> Case:  # fmt: skip
    """One log-n case; ``params`` are the JSON keyword arguments (n, causal, window, softcap, ...)."""
    extra = {key: make for key, make in {"bias": bias, "mask": mask}.items() if make is not None}
    differentiable = ("q", "k", "v", "bias") if bias is not None else ("q", "k", "v")
    return make_case("logn", name, description, flags, draw(dims, extra, std=std), params=params,
                     differentiable=differentiable)  # fmt: skip


def cases() -> list[Case]:
    """The log-n conformance cases, in reading order."""
    return [
        _case("self_default_n", "Self-attention N = 10, no mask: logits times ln 10 = 2.30 (log2 10 = 3.32).",
              ("LOGN_SCALE", "BASELINE"), Dims(1, 4, 2, 10, 10, 8)),
        _case("causal_cross_default_n", "5 queries over 13 keys, causal bottom-right: n = 13 on every row, not 5 or i + 9.",
              ("LOGN_LENGTH", "UNEQUAL_LENGTHS", "CAUSAL_ALIGNMENT"), Dims(1, 4, 2, 5, 13, 8), causal=True),
        _case("padding_default_n", "Keys padded to 12, batch 1 has 5 real keys: n = 12 for both, not 5.",
              ("LOGN_LENGTH", "PADDING_MASK", "MULTI_BATCH"), Dims(2, 4, 2, 7, 12, 8), mask=key_padding((12, 5))),
        _case("explicit_training_length", "n = 512 given (a training length) over 9 keys: ln 512 = 6.24, not ln 9.",
              ("LOGN_EXPLICIT_N", "LOGN_SCALE"), Dims(1, 4, 2, 9, 9, 8), std=0.6, n=512),
        _case("n_one_uniform", "n = 1: log 1 = 0, every score 0; the bias alone shapes the weights, causal N = 8.",
              ("LOGN_SCALE", "LOGN_EXPLICIT_N", "BIAS"), Dims(1, 4, 2, 8, 8, 8), n=1, causal=True,
              bias=normal(lambda d: (1, d.hq, d.nq, d.nk))),
        _case("scope_window_softcap_bias", "GQA 8:2, window (2, 1), soft-cap 2, (1, Hq, 1, Nk) bias: log n before both.",
              ("LOGN_SCALE", "SOFTCAP_BEFORE_BIAS", "SLIDING_WINDOW", "GQA_HEAD_MAP"), Dims(1, 8, 2, 11, 11, 8),
              std=1.5, bias=normal(lambda d: (1, d.hq, 1, d.nk), 1.5), window=[2, 1],
              softcap=2.0),
        _case("fully_masked_rows", "6 queries over 3 keys, causal bottom-right: rows 0-2 see no key; n = 3.",
              ("FULLY_MASKED_ROW", "LOGN_LENGTH", "CAUSAL_ALIGNMENT"), Dims(1, 4, 2, 6, 3, 8), causal=True),
        _case("qwen_training_length", "Qwen's rule, L = 8: 6 queries over 14 cached keys, causal, positions 8-13: "
              "rows at p + 1 <= 8 keep factor 1, later rows log(p + 1) / log 8.",
              ("LOGN_TRAINING_LENGTH", "CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS"), Dims(1, 4, 2, 6, 14, 8), causal=True,
              training_length=8),
        _case("decode_single_query", "One query over 40 keys, MQA 4:1, n = 4096 given: ln 4096 = 8.32.",
              ("LOGN_EXPLICIT_N", "SINGLE_TOKEN", "MULTI_QUERY"), Dims(1, 4, 1, 1, 40, 8), std=0.5, n=4096),
    ]  # fmt: skip
