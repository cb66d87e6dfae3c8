"""Conformance cases for lucidrains' local-attention: look-around blocks, causal and
exact windows, shared-QK self score, rotary positions, autopadding; each lucidrains
defect as its own flagged case of the "lucidrains" preset."""

from __future__ import annotations

from ...conformance.case import Case, Dims, draw, make_case

FLAGS: dict[str, str] = {
    "LOCAL_LOOK_AROUND": (
        "Query block w sees key blocks w - look_backward ... w + look_forward (clipped at the ends). Fails "
        "counting look-around in tokens, or wrapping around."
    ),
    "LOCAL_EXACT_WINDOW": (
        "exact_windowsize trims the look-around to i - ws * look_backward <= j (<= i + ws * look_forward). Fails "
        "keeping whole blocks."
    ),
    "LOCAL_SHARED_QK_SELF_SCORE": (
        "shared_qk: keys l2-normalised and a query's own key scored -5e4 (a finite constant: a row that sees "
        "only itself still attends to itself). Fails masking self with -inf or not normalising."
    ),
    "LOCAL_ROTARY_POSITIONS": "rotary: RoPE with query i at position i and key j at j (relative offsets exact).",
    "LOCAL_AUTOPAD_MASKED": "autopad: padding keys past N are masked (canonical).",
    "LOCAL_LUCIDRAINS_ROTARY_SHIFT": (
        "preset 'lucidrains': its rotary gives queries the positions of the last look-around block, shifting "
        "every query by window_size * look_forward (freqs[-q_len:]). Fails the canonical positions."
    ),
    "LOCAL_LUCIDRAINS_PADDING_ATTENDED": (
        "preset 'lucidrains': autopadding without an input mask leaves the zero padding keys unmasked; real "
        "queries attend to them (score 0, value 0)."
    ),
}


def _case(name, description, flags, dims, *, grad=True, **params) -> Case:
    return make_case("local", name, description, flags, draw(dims), params=params, preset=params.get("preset"),
                     grad=grad)  # fmt: skip


LUCIDRAINS = dict(preset="lucidrains", attend_padding=True, rotary_query_shift=True)


def cases() -> list[Case]:
    return [
        _case("look_around", "Windows of 4 over 16 tokens, look back 1 and forward 1.",
              ("LOCAL_LOOK_AROUND",), Dims(1, 2, 2, 16, 16, 16), window_size=4, look_backward=1, look_forward=1),
        _case("causal_exact", "Causal, windows of 3, look back 2, exact window: 7 keys at most, GQA 4:2.",
              ("LOCAL_EXACT_WINDOW", "CAUSAL_MASK", "GQA_HEAD_MAP"), Dims(1, 4, 2, 15, 15, 8), window_size=3,
              causal=True, look_backward=2, look_forward=0, exact_windowsize=True),
        _case("forward_exact", "Windows of 4, look back 0, forward 2, exact.",
              ("LOCAL_EXACT_WINDOW", "LOCAL_LOOK_AROUND"), Dims(1, 2, 2, 16, 16, 8), window_size=4,
              look_backward=0, look_forward=2, exact_windowsize=True),
        _case("shared_qk_causal", "Shared-QK, causal, windows of 3, self score -20: token 0 attends only to itself.",
              ("LOCAL_SHARED_QK_SELF_SCORE", "CAUSAL_MASK"), Dims(1, 2, 2, 12, 12, 8), window_size=3, causal=True,
              look_backward=1, look_forward=0, shared_qk=True, self_score=-20.0),
        _case("shared_qk_default_score", "Shared-QK with the package's self score -5e4, causal, forward only (an lse "
              "of -5e4 on row 0 leaves finite differences no digits).", ("LOCAL_SHARED_QK_SELF_SCORE",),
              Dims(1, 2, 2, 9, 9, 8), grad=False, window_size=3, causal=True, look_backward=1, look_forward=0,
              shared_qk=True),
        _case("rotary", "Rotary, windows of 5 over 15 tokens, look forward 1: absolute positions.",
              ("LOCAL_ROTARY_POSITIONS",), Dims(1, 2, 2, 15, 15, 16), window_size=5, look_backward=1, look_forward=1,
              rotary=True),
        _case("autopad", "Autopad 13 tokens to 16 (windows of 4); padding masked.",
              ("LOCAL_AUTOPAD_MASKED", "ODD_LENGTH"), Dims(1, 2, 2, 13, 13, 8), window_size=4, look_backward=1,
              look_forward=1, autopad=True),
        _case("lucidrains_rotary_shift", "preset 'lucidrains', rotary, look forward 1: queries shifted by 5.",
              ("LOCAL_LUCIDRAINS_ROTARY_SHIFT",), Dims(1, 2, 2, 15, 15, 16), window_size=5, look_backward=1,
              look_forward=1, rotary=True, **LUCIDRAINS),
        _case("lucidrains_padding", "preset 'lucidrains', autopad 13 to 16 without a mask: padding keys attended.",
              ("LOCAL_LUCIDRAINS_PADDING_ATTENDED", "ODD_LENGTH"), Dims(1, 2, 2, 13, 13, 8), window_size=4,
              look_backward=1, look_forward=1, autopad=True, **LUCIDRAINS),
    ]  # fmt: skip
