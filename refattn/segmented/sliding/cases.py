"""Conformance cases for sliding windows as each library counts them: one case per
convention at a window where the off-by-one changes the outputs, each with an
awkward length, and a decoding case (Nq < Nk, bottom-right alignment)."""

from __future__ import annotations

from ...conformance.case import Case, Dims, draw, make_case

FLAGS: dict[str, str] = {
    "WINDOW_COUNT_HF_CAUSAL": (
        "HF's causal sliding window W keeps W keys, i - W < j <= i (window (W - 1, 0)). Fails keeping W + 1 "
        "(j >= i - W, the Mistral paper's count)."
    ),
    "WINDOW_COUNT_HF_BIDIRECTIONAL": (
        "HF's bidirectional sliding window W keeps |i - j| <= W: 2W + 1 keys (window (W, W)). Fails W // 2 per "
        "side or W - 1."
    ),
    "WINDOW_COUNT_MISTRAL": (
        "The Mistral paper's window W: position i attends to i - W ... i, W + 1 keys (window (W, 0)). Fails "
        "keeping W keys (HF's count)."
    ),
    "WINDOW_COUNT_LONGFORMER": (
        "Longformer's attention_window W (even): W / 2 keys on each side (window (W/2, W/2)). Fails W per side."
    ),
}


def _case(name, description, flags, dims, **params) -> Case:
    return make_case("sliding_window", name, description, flags, draw(dims), params=params)


def cases() -> list[Case]:
    return [
        _case("hf_causal", "HF causal window 4 over 13 tokens: 4 keys per query.",
              ("WINDOW_COUNT_HF_CAUSAL", "ODD_LENGTH"), Dims(1, 2, 2, 13, 13, 16), window_size=4, convention="hf_causal"),
        _case("hf_causal_one", "HF causal window 1: each query sees itself only.",
              ("WINDOW_COUNT_HF_CAUSAL",), Dims(1, 2, 2, 7, 7, 8), window_size=1, convention="hf_causal"),
        _case("hf_causal_decode", "HF causal window 5, 3 queries over 12 cached keys (bottom-right), GQA 4:2.",
              ("WINDOW_COUNT_HF_CAUSAL", "CAUSAL_ALIGNMENT", "GQA_HEAD_MAP"), Dims(1, 4, 2, 3, 12, 16),
              window_size=5, convention="hf_causal"),
        _case("hf_bidirectional", "HF bidirectional window 3 over 13 tokens: 7 keys per middle query.",
              ("WINDOW_COUNT_HF_BIDIRECTIONAL", "ODD_LENGTH"), Dims(1, 2, 2, 13, 13, 16),
              window_size=3, convention="hf_bidirectional"),
        _case("mistral", "Mistral window 4 over 13 tokens: 5 keys per query.",
              ("WINDOW_COUNT_MISTRAL", "ODD_LENGTH"), Dims(1, 2, 2, 13, 13, 16), window_size=4, convention="mistral"),
        _case("longformer", "Longformer attention_window 6 over 15 tokens: 3 keys per side.",
              ("WINDOW_COUNT_LONGFORMER", "ODD_LENGTH", "AWKWARD_HEAD_DIM"), Dims(1, 2, 2, 15, 15, 59),
              window_size=6, convention="longformer"),
    ]  # fmt: skip
