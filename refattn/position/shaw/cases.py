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

Seeds are the CRC-32 of the case id, so adding, removing or reordering cases
never changes another case's data.
"""

from __future__ import annotations

import zlib
from typing import Callable, NamedTuple

import numpy as np

from ...conformance.case import Case


ArrayMaker = Callable[[np.random.Generator, "Dims"], np.ndarray]
PositionMaker = Callable[["Dims"], np.ndarray]


class Dims(NamedTuple):
    """Sizes of one case: q (b, hq, nq, d), k, v (b, hkv, nk, d or dv), tables (2k+1, ·); dv = d when None."""

    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    k: int
    dv: int | None = None

    @property
    def scores(self) -> tuple[int, int, int, int]:
        return (self.b, self.hq, self.nq, self.nk)

    @property
    def value_dim(self) -> int:
        return self.d if self.dv is None else self.dv


# --- positions: dims -> int64 array -------------------------------------------


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


# --- array makers: (rng, dims) -> array --------------------------------------


def _normal(shape_of: Callable[[Dims], tuple], std: float = 1.0) -> ArrayMaker:
    return lambda rng, dims: std * rng.standard_normal(shape_of(dims))


def _random_mask(shape_of: Callable[[Dims], tuple], keep: float) -> ArrayMaker:
    return lambda rng, dims: rng.random(shape_of(dims)) < keep


def FULL(dims: Dims) -> tuple[int, int, int, int]:
    """The full score shape (B, H, Nq, Nk)."""
    return dims.scores


def _draw(dims: Dims, std: float, table_std: float, positions: tuple[PositionMaker, PositionMaker], extra: dict):
    """``arrays(rng)``: q, k, v, the two tables, the positions, then the ``extra`` arrays in order."""
    q_positions, k_positions = positions

    def arrays(rng: np.random.Generator) -> dict:
        rows = 2 * dims.k + 1
        out = {
            "q": std * rng.standard_normal((dims.b, dims.hq, dims.nq, dims.d)),
            "k": std * rng.standard_normal((dims.b, dims.hkv, dims.nk, dims.d)),
            "v": rng.standard_normal((dims.b, dims.hkv, dims.nk, dims.value_dim)),
            "rel_k": table_std * rng.standard_normal((rows, dims.d)),
            "rel_v": table_std * rng.standard_normal((rows, dims.value_dim)),
            "q_positions": q_positions(dims),
            "k_positions": k_positions(dims),
        }
        for name, make in extra.items():
            out[name] = make(rng, dims)
        return out

    return arrays


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, std: float = 1.0,
          table_std: float = 1.0, q_positions: PositionMaker = _last_query_positions,
          k_positions: PositionMaker = _key_positions, bias: ArrayMaker | None = None,
          mask: ArrayMaker | None = None, keep: ArrayMaker | None = None, **params) -> Case:  # fmt: skip
    """One Shaw case; ``params`` are the JSON keyword arguments besides ``max_relative_position`` (= dims.k)."""
    extra = {key: make for key, make in {"bias": bias, "mask": mask, "dropout_keep": keep}.items() if make is not None}
    case_id = f"shaw/{name}"
    differentiable = ("q", "k", "v", "rel_k", "rel_v") + (("bias",) if bias is not None else ())
    return Case(
        id=case_id,
        mechanism="shaw",
        description=description,
        flags=flags,
        seed=zlib.crc32(case_id.encode()),
        arrays=_draw(dims, std, table_std, (q_positions, k_positions), extra),
        params={"max_relative_position": dims.k, **params},
        differentiable=differentiable,
    )


def cases() -> list[Case]:
    """The Shaw conformance cases, in reading order."""
    return [
        # --- the encoding itself ------------------------------------------------
        _case("baseline", "Self-attention over 12 tokens, K = 3, no options: both directions read, both clipped.",
              ("SHAW_CLIP", "SHAW_DIRECTION", "SHAW_VALUE_TERM"), Dims(1, 2, 2, 12, 12, 16, 3)),
        _case("clip_far", "K = 2 over 23 tokens: most pairs read the edge rows 0 and 4.",
              ("SHAW_CLIP", "ODD_LENGTH"), Dims(1, 2, 2, 23, 23, 8, 2)),
        _case("clip_zero", "K = 0: every pair reads row 0 (q·rel_k[0] per row, rel_v[0] added to every output).",
              ("SHAW_CLIP",), Dims(1, 2, 2, 9, 9, 8, 0)),
        _case("direction", "Non-causal, K = 6 over 10 tokens, tables twice as large as q and k: j - i, not i - j.",
              ("SHAW_DIRECTION",), Dims(1, 2, 2, 10, 10, 8, 6), std=0.5, table_std=2.0),
        _case("value_term", "Value table of standard deviation 3 against values of 1: out = sum P (v + rel_v).",
              ("SHAW_VALUE_TERM",), Dims(1, 2, 2, 11, 11, 8, 4), table_std=3.0),
        _case("value_term_dropout", "Dropout p = 0.25 with a keep-mask: both value terms use the dropped weights.",
              ("SHAW_VALUE_TERM", "DROPOUT_SCALING"), Dims(1, 2, 2, 12, 12, 8, 3), table_std=2.0,
              keep=_random_mask(FULL, 0.75), dropout_p=0.25),
        _case("scale_override", "Scale 2.5, q and k of standard deviation 0.4: the relative term is scaled too.",
              ("SHAW_SCALE", "SCALE_OVERRIDE"), Dims(1, 2, 2, 10, 10, 16, 3), std=0.4, table_std=1.5, scale=2.5),
        _case("softcap_bias", "Soft-cap 1.5 over scale * (q·k + q·rel_k), then a bias of standard deviation 2.",
              ("SHAW_SCALE", "SOFTCAP_BEFORE_BIAS", "BIAS"), Dims(1, 2, 2, 9, 9, 16, 3), std=1.5, table_std=1.5,
              bias=_normal(FULL, 2.0), softcap=1.5),
        _case("table_gradient", "B = 2, 3 heads, K = 2 over 14 tokens: table gradients sum batches, heads, far pairs.",
              ("SHAW_TABLE_GRADIENT", "SHAW_CLIP", "MULTI_BATCH"), Dims(2, 3, 3, 14, 14, 8, 2)),
        # --- positions -----------------------------------------------------------
        _case("decode_single_query", "One query at position 18 over 19 cached keys, causal, MQA 4:1.",
              ("SHAW_POSITIONS", "SINGLE_TOKEN", "MULTI_QUERY", "CAUSAL_ALIGNMENT"), Dims(1, 4, 1, 1, 19, 8, 4),
              causal=True),
        _case("chunked_prefill", "5 queries at positions 8..12 over 13 keys, causal bottom-right.",
              ("SHAW_POSITIONS", "CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 5, 13, 8, 3), causal=True),
        _case("cross_offset", "7 queries at positions 100..106 over 10 keys at 97..106, non-causal.",
              ("SHAW_POSITIONS", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 7, 10, 8, 4),
              q_positions=_shifted(lambda d: np.arange(d.nq, dtype=np.int64), 100),
              k_positions=_shifted(_key_positions, 97)),
        _case("positions_with_gaps", "Positions with gaps and repeats: keys at 0 1 2 5 6 9 9 10 15, queries at 3 6 9.",
              ("SHAW_POSITIONS", "SHAW_CLIP"), Dims(1, 2, 2, 3, 9, 8, 3),
              q_positions=_fixed([3, 6, 9]), k_positions=_fixed([0, 1, 2, 5, 6, 9, 9, 10, 15])),
        _case("negative_positions", "Positions -40..-29, causal, K = 5: only differences matter.",
              ("SHAW_POSITIONS",), Dims(1, 2, 2, 12, 12, 8, 5), causal=True,
              q_positions=_shifted(_last_query_positions, -40), k_positions=_shifted(_key_positions, -40)),
        # --- the dense pipeline around it ------------------------------------------
        _case("causal", "Causal self-attention over 17 tokens, K = 4.",
              ("CAUSAL_MASK", "SHAW_CLIP"), Dims(1, 2, 2, 17, 17, 16, 4), causal=True),
        _case("causal_long_queries", "9 queries over 5 keys, causal bottom-right: queries 0..3 see no key.",
              ("FULLY_MASKED_ROW", "CAUSAL_ALIGNMENT"), Dims(1, 2, 2, 9, 5, 8, 2), causal=True,
              q_positions=_shifted(lambda d: np.arange(d.nq, dtype=np.int64), -4)),
        _case("sliding_window", "Window (3, 1) over 15 tokens, K = 2: window and clipping are independent.",
              ("SLIDING_WINDOW", "SHAW_CLIP"), Dims(1, 2, 2, 15, 15, 8, 2), window=[3, 1]),
        _case("gqa_causal_cross", "GQA 4:2, B = 2, 6 queries over 10 keys, causal bottom-right, K = 3.",
              ("GQA_HEAD_MAP", "GQA_GRAD_REDUCTION", "SHAW_TABLE_GRADIENT", "MULTI_BATCH"),
              Dims(2, 4, 2, 6, 10, 8, 3), causal=True),
        _case("head_dim_59", "D = 59 for q, k and rel_k, 5 queries over 7 keys, K = 2.",
              ("AWKWARD_HEAD_DIM", "SCALE_DEFAULT"), Dims(1, 1, 1, 5, 7, 59, 2)),
        _case("value_dim_differs", "D = 20, Dv = 7: rel_k is (2K+1, 20), rel_v (2K+1, 7), scale 1/sqrt(20).",
              ("VALUE_DIM_DIFFERS", "SCALE_DEFAULT"), Dims(1, 2, 2, 10, 10, 20, 3, 7)),
        _case("odd_length_67", "Causal over 67 tokens, K = 8: tails past one 64-wide tile.",
              ("ODD_LENGTH",), Dims(1, 1, 1, 67, 67, 8, 8), causal=True),
        _case("padding_mask", "B = 2, key padding (B, 1, 1, Nk) with valid lengths 11 and 6, K = 3.",
              ("PADDING_MASK", "MASK_BROADCAST", "MULTI_BATCH"), Dims(2, 2, 2, 11, 11, 8, 3),
              mask=lambda rng, dims: (np.arange(dims.nk) < np.array([11, 6])[:, None])[:, None, None, :]),
    ]  # fmt: skip
