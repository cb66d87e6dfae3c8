"""Conformance cases for Longformer: global tokens inside and outside the band, at the
ends of the sequence, different per batch element, with and without their own
projections, and the hf preset's padding to a multiple of the window."""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, draw, make_case, normal

FLAGS: dict[str, str] = {
    "LONGFORMER_BAND": (
        "Local rows attend to |i - j| <= attention_window / 2 (the window counts both sides). Fails a band of "
        "attention_window per side."
    ),
    "LONGFORMER_GLOBAL_ONCE": (
        "A global key inside a row's band is one key, not two (HF removes global keys from the band before adding "
        "them as global columns). Fails counting it twice."
    ),
    "LONGFORMER_GLOBAL_ROWS": (
        "Global rows attend to every key (symmetric global attention); every row attends to every global key. "
        "Fails one direction missing."
    ),
    "LONGFORMER_GLOBAL_PROJECTIONS": (
        "Global rows use their own q_global, k_global, v_global over every key; local rows see global keys through "
        "the local k and v. Fails mixing the two sets of projections."
    ),
    "LONGFORMER_PADDING": (
        "preset 'hf': the sequence is padded to a multiple of attention_window with masked tokens and the padded "
        "rows dropped; real outputs are those of no padding. Fails padding keys that are attended."
    ),
}


def _global(rows: dict[int, list[int]]):
    def make(rng, dims):
        tokens = np.zeros((dims.b, dims.nq), dtype=bool)
        for b, chosen in rows.items():
            tokens[b, chosen] = True
        return tokens

    return make


def _case(name, description, flags, dims, *, globals_=None, projections=False, **params) -> Case:
    extra = {}
    if globals_ is not None:
        extra["global_tokens"] = _global(globals_)
    if projections:
        extra.update(q_global=normal(Dims.q_shape.fget), k_global=normal(Dims.k_shape.fget),
                     v_global=normal(Dims.v_shape.fget))  # fmt: skip
    differentiable = ("q", "k", "v") + (("q_global", "k_global", "v_global") if projections else ())
    return make_case("longformer", name, description, flags, draw(dims, extra), params=params,
                     differentiable=differentiable, preset=params.get("preset"))  # fmt: skip


def cases() -> list[Case]:
    return [
        _case("band_only", "attention_window 4 over 13 tokens, no global token: the sliding window (2, 2).",
              ("LONGFORMER_BAND", "ODD_LENGTH"), Dims(1, 2, 2, 13, 13, 16), attention_window=4),
        _case("global_in_band", "Global token 6 inside the band of rows 4..8, and token 0; shared projections.",
              ("LONGFORMER_GLOBAL_ONCE", "LONGFORMER_GLOBAL_ROWS"), Dims(1, 2, 2, 13, 13, 16),
              globals_={0: [0, 6]}, attention_window=4),
        _case("global_projections", "B = 2 with different global tokens (first; last two), own global projections, "
              "GQA 4:2.", ("LONGFORMER_GLOBAL_PROJECTIONS", "MULTI_BATCH", "GQA_HEAD_MAP"), Dims(2, 4, 2, 11, 11, 8),
              globals_={0: [0], 1: [9, 10]}, projections=True, attention_window=4),
        _case("hf_padding", "preset 'hf': 13 tokens padded to 16 for attention_window 8, global token 12 at the end.",
              ("LONGFORMER_PADDING", "LONGFORMER_GLOBAL_PROJECTIONS"), Dims(1, 2, 2, 13, 13, 16),
              globals_={0: [12]}, projections=True, attention_window=8, preset="hf"),
    ]  # fmt: skip
