"""Conformance cases for RoPE attention.

Each case is small (a few kilobytes) and built so that the wrong variant of
the behaviour its flags name gives different numbers: a ``ROPE_PARTIAL``
case has ``rotary_dim < D`` with ``D != 2 · rotary_dim``, a
``ROPE_POSITION_OFFSET`` case has queries whose positions do not start at 0,
a ``ROPE_BASE`` case uses Llama 3's base 500000, and so on. Positions are
explicit int64 arrays (``param.q_positions``, ``param.k_positions``).

Seeds are the CRC-32 of the case id, so adding, removing or reordering cases
never changes another case's data.
"""

from __future__ import annotations

import zlib
from typing import Callable, NamedTuple

import numpy as np

from ...conformance.case import Case


ArrayMaker = Callable[[np.random.Generator, "Dims"], np.ndarray]


class Dims(NamedTuple):
    """Sizes of one case: q (b, hq, nq, d), k (b, hkv, nk, d), v (b, hkv, nk, dv); dv = d when None."""

    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int | None = None

    @property
    def scores(self) -> tuple[int, int, int, int]:
        return (self.b, self.hq, self.nq, self.nk)


def cached_positions(dims: Dims, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Keys at positions ``start .. start + Nk − 1`` and queries at the last Nq of them
    (a KV cache's newest tokens): ``start + Nk − Nq + arange(Nq)``."""
    k_positions = start + np.arange(dims.nk, dtype=np.int64)
    q_positions = start + dims.nk - dims.nq + np.arange(dims.nq, dtype=np.int64)
    return q_positions, k_positions


def draw(dims: Dims, positions: tuple[np.ndarray, np.ndarray], std: float, extra: dict[str, ArrayMaker]):
    """``arrays(rng)``: q, k of standard deviation ``std``, v, the positions, then the ``extra`` arrays."""

    def arrays(rng: np.random.Generator) -> dict:
        out = {
            "q": std * rng.standard_normal((dims.b, dims.hq, dims.nq, dims.d)),
            "k": std * rng.standard_normal((dims.b, dims.hkv, dims.nk, dims.d)),
            "v": rng.standard_normal((dims.b, dims.hkv, dims.nk, dims.dv or dims.d)),
            "q_positions": np.asarray(positions[0], dtype=np.int64),
            "k_positions": np.asarray(positions[1], dtype=np.int64),
        }
        for name, make in extra.items():
            out[name] = make(rng, dims)
        return out

    return arrays


def make_case(mechanism: str, name: str, description: str, flags: tuple[str, ...], dims: Dims, *,
              positions: tuple[np.ndarray, np.ndarray] | None = None, std: float = 1.0,
              bias: ArrayMaker | None = None, mask: ArrayMaker | None = None, keep: ArrayMaker | None = None,
              **params) -> Case:  # fmt: skip
    """One case of a rotary mechanism; ``positions`` default to :func:`cached_positions` and
    ``params`` are the JSON keyword arguments (rotary_dim, causal, ...)."""
    extra = {key: make for key, make in {"bias": bias, "mask": mask, "dropout_keep": keep}.items() if make is not None}
    case_id = f"{mechanism}/{name}"
    return Case(
        id=case_id,
        mechanism=mechanism,
        description=description,
        flags=flags,
        seed=zlib.crc32(case_id.encode()),
        arrays=draw(dims, positions if positions is not None else cached_positions(dims), std, extra),
        params=params,
        differentiable=("q", "k", "v", "bias") if bias is not None else ("q", "k", "v"),
    )


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, **kwargs) -> Case:
    return make_case("rope", name, description, flags, dims, **kwargs)


def _packed(lengths: tuple[int, ...]) -> np.ndarray:
    """Positions of documents packed into one sequence: each restarts at 0."""
    return np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])


def _key_padding(lengths: tuple[int, ...]) -> ArrayMaker:
    """(B, 1, 1, Nk) mask: batch element b attends to its first ``lengths[b]`` keys."""
    return lambda rng, dims: (np.arange(dims.nk) < np.array(lengths)[:, None])[:, None, None, :]


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
              bias=lambda rng, d: rng.standard_normal((1, d.hq, 1, d.nk)), mask=_key_padding((14, 11)),
              keep=lambda rng, d: rng.random(d.scores) < 0.9,
              rotary_dim=12, layout="interleaved", causal=True, softcap=5.0, dropout_p=0.1),
    ]  # fmt: skip
