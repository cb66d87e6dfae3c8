"""Conformance cases for RoPE attention.

Each case is small (a few kilobytes) and built so that the wrong variant of
the behaviour its flags name gives different numbers: a ``ROPE_PARTIAL``
case has ``rotary_dim < D`` with ``D != 2 · rotary_dim``, a
``ROPE_POSITION_OFFSET`` case has queries whose positions do not start at 0,
a ``ROPE_BASE`` case uses Llama 3's base 500000, and so on. Positions are
explicit int64 arrays (``param.q_positions``, ``param.k_positions``).

Seeds are the CRC-32 of the case id (refattn.conformance.case), so adding,
removing or reordering cases never changes another case's data. The flags
only rotary encodings use are described in :data:`FLAGS`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...conformance.case import ArrayMaker, Case, Dims, draw, key_padding, make_case

#: ``positions(rng, dims) -> (q_positions, k_positions)``: the positions of one case.
PositionMaker = Callable[[np.random.Generator, Dims], tuple[np.ndarray, np.ndarray]]

FLAGS: dict[str, str] = {
    "ROPE_LAYOUT": (
        "Which dims form a rotated pair: layout='half' pairs dim t with t + r/2 (HF rotate_half, GPT-NeoX, HF "
        "Llama), layout='interleaved' pairs 2t with 2t + 1 (RoFormer, GPT-J rotate_every_two, Meta's Llama "
        "view_as_complex). Fails an implementation that uses the other layout: the two agree only after "
        "permuting the dims of q and k."
    ),
    "ROPE_PARTIAL": (
        "rotary_dim r < D (GPT-NeoX rotary_pct, GPT-J rotary_dim): only the first r dims are rotated and the rest "
        "pass through unchanged; in the half layout dim t pairs with t + r/2, not t + D/2. Fails an "
        "implementation that rotates all D dims, splits the halves of D, or rotates the last r dims."
    ),
    "ROPE_FREQUENCY_EXPONENT": (
        "Frequencies are base^(-2t/r), t = 0 .. r/2 - 1, with r the rotated dims. Fails an implementation that "
        "uses base^(-t/r), or divides by the head dim D instead of rotary_dim when r < D."
    ),
    "ROPE_BASE": (
        "The frequency base is a parameter (rope_theta): 500000 for Llama 3, 10000 by default. Fails an "
        "implementation that hard-codes 10000."
    ),
    "ROPE_POSITION_OFFSET": (
        "Queries at positions that do not start at 0 (decoding or chunked prefill with a KV cache: q_positions = "
        "Nk - Nq + arange(Nq)). Fails an implementation that rotates the new queries from position 0, or rotates "
        "them with the keys' first positions."
    ),
    "ROPE_POSITION_SCALING": (
        "Linear position scaling (position interpolation; HF rope_scaling {'type': 'linear', 'factor': s}): "
        "angles are (position / s) * base^(-2t/r). Fails an implementation that multiplies by s, scales the "
        "base instead (NTK), or ignores it."
    ),
    "ROPE_EXPLICIT_POSITIONS": (
        "Positions are given, not implied by the index: packed sequences restart at 0, and query and key "
        "positions differ. Fails an implementation that rotates by the index arange(N) instead of the given "
        "positions."
    ),
    "ROPE_LARGE_POSITIONS": (
        "Positions near 8000: the angles position * base^(-2t/r) must be formed in float32 or wider (HF forces "
        "float32, transformers PR 29285). Fails an implementation that forms the angles, or reads its cos/sin "
        "cache, in float16 or bfloat16, where a position in the thousands is off by several radians."
    ),
    "ROPE_TRANSPOSED_GRADIENT": (
        "The gradients of q and k are those of the rotated q and k rotated back by the transposed rotation "
        "R(theta)^T = R(-theta). Fails a backward that rotates them forward again, or not at all, or rotates "
        "the passed-through dims of a partial rotary."
    ),
}


def cached_positions(dims: Dims, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys at positions ``start .. start + Nk − 1`` and queries at the last Nq of them
    (a KV cache's newest tokens): ``start + Nk − Nq + arange(Nq)``."""
    k_positions = start + np.arange(dims.nk, dtype=np.int64)
    q_positions = start + dims.nk - dims.nq + np.arange(dims.nq, dtype=np.int64)
    return q_positions, k_positions


def spread_positions(span: int) -> PositionMaker:
    """Sorted distinct key positions in [0, span) and query positions among them (packed or sparse
    tokens): distances up to ``span``."""

    def make(rng, dims):
        keys = np.sort(rng.choice(span, size=dims.nk, replace=False))
        return np.sort(rng.choice(keys, size=dims.nq, replace=False)), keys

    return make


def draw_with_positions(dims: Dims, positions: PositionMaker, extra: dict[str, ArrayMaker] | None = None, *,
                        std: float = 1.0, first: dict[str, ArrayMaker] | None = None):  # fmt: skip
    """``arrays(rng)`` of a position-encoding case, drawn in this order: q and k of standard deviation
    ``std`` and v (:func:`refattn.conformance.case.draw`), the ``first`` arrays, the positions (int64),
    then the ``extra`` arrays."""
    before_positions = draw(dims, first, std=std)

    def arrays(rng: np.random.Generator) -> dict:
        out = before_positions(rng)
        q_positions, k_positions = positions(rng, dims)
        out["q_positions"] = np.asarray(q_positions, dtype=np.int64)
        out["k_positions"] = np.asarray(k_positions, dtype=np.int64)
        out.update((name, make(rng, dims)) for name, make in (extra or {}).items())
        return out

    return arrays


def rotary_case(mechanism: str, name: str, description: str, flags: tuple[str, ...], dims: Dims, *,
                positions: tuple[np.ndarray, np.ndarray] | None = None, std: float = 1.0,
                bias: ArrayMaker | None = None, mask: ArrayMaker | None = None, keep: ArrayMaker | None = None,
                **params) -> Case:  # fmt: skip
    """One case of a rotary mechanism (RoPE, xPos); ``positions`` default to :func:`cached_positions` and
    ``params`` are the JSON keyword arguments (rotary_dim, causal, ...)."""
    given = positions if positions is not None else cached_positions(dims)
    extra = {key: make for key, make in {"bias": bias, "mask": mask, "dropout_keep": keep}.items() if make is not None}
    return make_case(
        mechanism, name, description, flags, draw_with_positions(dims, lambda rng, _: given, extra, std=std),
        params=params, differentiable=("q", "k", "v", "bias") if bias is not None else ("q", "k", "v"),
    )  # fmt: skip


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, **kwargs) -> Case:
    return rotary_case("rope", name, description, flags, dims, **kwargs)


def _packed(lengths: tuple[int, ...]) -> np.ndarray:
    """Positions of documents packed into one sequence: each restarts at 0."""
    return np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])


def cases() -> list[Case]:
    """The RoPE conformance cases, in reading order."""
    return [
        # --- layouts ---------------------------------------------------------
        _case("half_layout", "Half layout (HF rotate_half), r = D = 16, 12 tokens at positions 0..11, not causal.",
              ("ROPE_LAYOUT", "ROPE_TRANSPOSED_GRADIENT"), Dims(1, 2, 2, 12, 12, 16), layout="half"),
        _case("interleaved_layout", "Interleaved layout (GPT-J, Meta), r = D = 16, 12 tokens, not causal.",
              ("ROPE_LAYOUT", "ROPE_TRANSPOSED_GRADIENT"), Dims(1, 2, 2, 12, 12, 16), layout="interleaved"),
        _case("causal", "Half layout, causal self-attention over 17 tokens, D = 32.",
              ("ROPE_LAYOUT", "CAUSAL_MASK"), Dims(1, 2, 2, 17, 17, 32), causal=True),
        # --- partial rotary and frequencies ----------------------------------
        _case("partial_half", "Half layout, rotary_dim 8 of D = 24 (GPT-NeoX rotary_pct 1/3): pairs (t, t + 4).",
              ("ROPE_PARTIAL", "ROPE_FREQUENCY_EXPONENT", "ROPE_TRANSPOSED_GRADIENT"), Dims(1, 2, 2, 11, 11, 24),
              rotary_dim=8, layout="half"),
        _case("partial_interleaved_causal", "Interleaved layout, rotary_dim 12 of D = 20 (GPT-J rotary_dim), causal.",
              ("ROPE_PARTIAL", "ROPE_LAYOUT", "CAUSAL_MASK"), Dims(1, 2, 2, 13, 13, 20),
              rotary_dim=12, layout="interleaved", causal=True),
        _case("odd_head_dim", "D = 59 with rotary_dim 58: the last dim passes through; scale 1/sqrt(59).",
              ("ROPE_PARTIAL", "AWKWARD_HEAD_DIM", "SCALE_DEFAULT"), Dims(1, 2, 2, 9, 9, 59), rotary_dim=58),
        _case("frequency_exponent", "rotary_dim 16 of D = 32, positions 0..9: frequencies 10000^(-2t/16).",
              ("ROPE_FREQUENCY_EXPONENT", "ROPE_PARTIAL"), Dims(1, 2, 2, 10, 10, 32), rotary_dim=16),
        _case("base_500000", "Base 500000 (Llama 3), D = 16, 14 tokens, causal.",
              ("ROPE_BASE",), Dims(1, 2, 2, 14, 14, 16), base=500000.0, causal=True),
        _case("linear_position_scaling", "Linear position scaling: positions 0..15 divided by 4 (HF rope_scaling linear).",
              ("ROPE_POSITION_SCALING",), Dims(1, 2, 2, 16, 16, 16), position_scale=4.0),
        # --- positions -------------------------------------------------------
        _case("decode_offset", "One query at position 30 over 31 cached keys, causal bottom-right, MQA 4:1.",
              ("ROPE_POSITION_OFFSET", "SINGLE_TOKEN", "MULTI_QUERY"), Dims(1, 4, 1, 1, 31, 16), causal=True),
        _case("chunked_prefill_gqa", "5 new queries at positions 8..12 over 13 keys, causal bottom-right, GQA 4:2, B=2.",
              ("ROPE_POSITION_OFFSET", "CAUSAL_ALIGNMENT", "GQA_HEAD_MAP", "MULTI_BATCH"), Dims(2, 4, 2, 5, 13, 16),
              causal=True, layout="interleaved"),
        _case("packed_positions", "Two documents of 7 and 6 tokens packed, positions restarting at 0, causal.",
              ("ROPE_EXPLICIT_POSITIONS",), Dims(1, 2, 2, 13, 13, 16),
              positions=(_packed((7, 6)), _packed((7, 6))), causal=True),
        _case("cross_positions", "6 queries at positions 3, 5, ..., 13 over 9 keys at positions 0, 2, ..., 16.",
              ("ROPE_EXPLICIT_POSITIONS", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 6, 9, 16),
              positions=(3 + 2 * np.arange(6), 2 * np.arange(9))),
        _case("large_positions", "16 tokens at positions 8000..8015, D = 32, causal: angles up to 8015 radians.",
              ("ROPE_LARGE_POSITIONS",), Dims(1, 2, 2, 16, 16, 32),
              positions=cached_positions(Dims(1, 2, 2, 16, 16, 32), start=8000), causal=True),
        # --- everything at once ----------------------------------------------
        _case("combined", "GQA 4:2, B=2, D=20 with rotary_dim 12 interleaved, Dv=7, 6 queries at positions "
              "8..13 over 14 keys, causal bottom-right, key padding, a broadcast bias, soft-cap 5, dropout 0.1.",
              ("ROPE_PARTIAL", "ROPE_POSITION_OFFSET", "ROPE_TRANSPOSED_GRADIENT", "GQA_HEAD_MAP", "BIAS"),
              Dims(2, 4, 2, 6, 14, 20, 7), std=1.5,
              bias=lambda rng, d: rng.standard_normal((1, d.hq, 1, d.nk)), mask=key_padding((14, 11)),
              keep=lambda rng, d: rng.random(d.scores) < 0.9,
              rotary_dim=12, layout="interleaved", causal=True, softcap=5.0, dropout_p=0.1),
    ]  # fmt: skip
