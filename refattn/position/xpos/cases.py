"""Conformance cases for xPos attention.

Each case is small and built so that the wrong variant of the behaviour its
flags name gives different numbers. Most cases use a small ``scale_base``
(16 to 64 instead of the default 512) so that the decay ``ζ^((n − m) / scale_base)``
is far from 1 over a dozen positions: with the default, a dozen tokens move
the scores by only a few percent. RoPE's flags (refattn/position/rope/cases.py)
name the mistakes in the rotation that xPos shares.

The layout default is ``"half"``, as for RoPE; torchscale's is interleaved,
so every case in that layout passes ``layout="interleaved"`` explicitly.

Seeds are the CRC-32 of the case id.
"""

from __future__ import annotations

from ...conformance.case import Case, Dims, key_padding
from ..rope import cases as rope_cases
from ..rope.cases import cached_positions, rotary_case

#: The RoPE flags xPos cases use (described in refattn/position/rope/cases.py), and xPos's own.
FLAGS: dict[str, str] = {
    **{name: rope_cases.FLAGS[name] for name in ("ROPE_LAYOUT", "ROPE_PARTIAL", "ROPE_POSITION_OFFSET",
                                                 "ROPE_TRANSPOSED_GRADIENT")},  # fmt: skip
    "XPOS_SCALE_DIRECTION": (
        "Queries are scaled by zeta^(+n/scale_base) and keys by zeta^(-m/scale_base) (torchscale: downscale=True "
        "for keys), so pair t of a score decays as zeta_t^((n - m)/scale_base) for keys in the past. Fails an "
        "implementation that swaps the two, or scales both the same way."
    ),
    "XPOS_SCALE_BASE": (
        "The exponent is position / scale_base with scale_base a parameter (512 in torchscale and lucidrains). "
        "Fails an implementation that hard-codes 512 or multiplies by it."
    ),
    "XPOS_DECAY_RATES": (
        "zeta_t = (2t/r + gamma) / (1 + gamma), t = 0 .. r/2 - 1, with r the rotated dims and gamma = 0.4. Fails "
        "an implementation that uses t/r, the head dim D instead of r under partial rotary, or drops gamma from "
        "numerator or denominator."
    ),
    "XPOS_SCALE_LAYOUT": (
        "Both dims of a rotated pair get the same factor zeta_t^(+-n/scale_base), laid out as the pairs are: "
        "repeated per element (2t, 2t + 1) in the interleaved layout, concatenated (t, t + r/2) in the half "
        "layout. Fails an implementation that lays the factors out in the other layout than the rotation "
        "(rotary-embedding-torch before its fix concatenated them while rotating interleaved pairs)."
    ),
    "XPOS_CENTRED_POSITIONS": (
        "Negative positions, as torchscale's centring produces (positions minus half the length). Fails an "
        "implementation that reads its tables at position modulo the table length, clamps positions at 0, or "
        "takes positions as unsigned."
    ),
}


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, **kwargs) -> Case:
    return rotary_case("xpos", name, description, flags, dims, **kwargs)


def cases() -> list[Case]:
    """The xPos conformance cases, in reading order."""
    return [
        _case("baseline", "torchscale's defaults: interleaved, r = D = 16, scale_base 512, gamma 0.4, 12 tokens, causal.",
              ("XPOS_SCALE_DIRECTION", "CAUSAL_MASK"), Dims(1, 2, 2, 12, 12, 16), layout="interleaved", causal=True),
        _case("scale_direction", "scale_base 16 over 14 tokens, causal: keys in the past are downweighted.",
              ("XPOS_SCALE_DIRECTION", "ROPE_TRANSPOSED_GRADIENT"), Dims(1, 2, 2, 14, 14, 16), layout="interleaved",
              scale_base=16.0, causal=True),
        _case("scale_base_64", "scale_base 64, 16 tokens, not causal, D = 32.",
              ("XPOS_SCALE_BASE",), Dims(1, 2, 2, 16, 16, 32), layout="interleaved", scale_base=64.0),
        _case("partial_decay_rates", "rotary_dim 16 of D = 24: zeta_t = (2t/16 + 0.4)/1.4; dims 16..23 unscaled.",
              ("XPOS_DECAY_RATES", "ROPE_PARTIAL"), Dims(1, 2, 2, 12, 12, 24), layout="interleaved",
              rotary_dim=16, scale_base=24.0, causal=True),
        _case("half_layout", "Half layout, scale_base 16: the factor of pair t multiplies dims t and t + 8.",
              ("ROPE_LAYOUT", "XPOS_SCALE_LAYOUT"), Dims(1, 2, 2, 12, 12, 16), layout="half", scale_base=16.0),
        _case("interleaved_scale_layout", "Interleaved layout, scale_base 16: the factor of pair t multiplies dims "
              "2t and 2t + 1.", ("XPOS_SCALE_LAYOUT", "ROPE_LAYOUT"), Dims(1, 2, 2, 12, 12, 16),
              layout="interleaved", scale_base=16.0, causal=True),
        _case("decode_offset", "One query at position 24 over 25 cached keys, causal bottom-right, MQA 4:1, scale_base 32.",
              ("ROPE_POSITION_OFFSET", "XPOS_SCALE_DIRECTION", "SINGLE_TOKEN"), Dims(1, 4, 1, 1, 25, 16),
              layout="interleaved", scale_base=32.0, causal=True),
        _case("centred_positions", "15 tokens at positions -7..7 (torchscale's centring), scale_base 16, causal.",
              ("XPOS_CENTRED_POSITIONS",), Dims(1, 2, 2, 15, 15, 16), layout="interleaved",
              positions=cached_positions(Dims(1, 2, 2, 15, 15, 16), start=-7), scale_base=16.0, causal=True),
        _case("gqa_cross", "GQA 4:2, B=2, 6 queries at positions 4..9 over 10 keys, causal bottom-right, scale_base 32.",
              ("GQA_HEAD_MAP", "CAUSAL_ALIGNMENT", "ROPE_POSITION_OFFSET", "MULTI_BATCH"), Dims(2, 4, 2, 6, 10, 16),
              layout="interleaved", scale_base=32.0, causal=True),
        _case("combined", "GQA 4:2, B=2, D=20 with rotary_dim 12 in the half layout, Dv=7, 6 queries at positions "
              "8..13 over 14 keys, causal bottom-right, key padding, a broadcast bias, soft-cap 5, dropout 0.1.",
              ("XPOS_DECAY_RATES", "ROPE_PARTIAL", "ROPE_TRANSPOSED_GRADIENT", "GQA_HEAD_MAP", "BIAS"),
              Dims(2, 4, 2, 6, 14, 20, 7), std=1.5,
              bias=lambda rng, d: rng.standard_normal((1, d.hq, 1, d.nk)), mask=key_padding((14, 11)),
              keep=lambda rng, d: rng.random(d.scores) < 0.9,
              rotary_dim=12, layout="half", scale_base=20.0, causal=True, softcap=5.0, dropout_p=0.1),
    ]  # fmt: skip
