"""Conformance cases for Scalable-Softmax (SSMax) attention.

Each case is small and built so that the mistake its flags name changes the
numbers: the masked-count cases have rows whose attended count ``n_i``
differs from ``Nk`` (causal, bottom-right and top-left alignment, windows,
key padding, per-head masks), the per-head cases have a distinct ``s_h`` for
every query head under GQA, the single-key cases have rows with ``n_i = 1``
(factor ``b_h``, since ``log 1 = 0``), the scope case has a soft-cap and a
bias large enough for the factor's place to matter, and the bias cases have
``b_h`` comparable to ``s_h log n_i``, negative in one of them.

``s`` and ``b`` are arrays of the case (``input.s``, ``input.b``, shape
(Hq,)) and get gradients, except in the baseline case, where ``s`` is a
JSON number (a constant shared by every head) and ``b`` is left at 0.

Seeds are the CRC-32 of the case id.
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


# --- array makers: (rng, dims) -> array -----------------------------------------


def _uniform(low: float, high: float) -> ArrayMaker:
    """One value per query head, uniform in [low, high): (Hq,)."""
    return lambda rng, dims: rng.uniform(low, high, dims.hq)


def _key_padding(lengths: tuple[int, ...]) -> ArrayMaker:
    """A (B, 1, 1, Nk) mask keeping the first ``lengths[b]`` keys of batch element ``b``."""
    return lambda rng, dims: (np.arange(dims.nk) < np.array(lengths)[:, None])[:, None, None, :]


def _per_head_mask(keep: float) -> ArrayMaker:
    """An (Hq, Nq, Nk) mask, each entry True with probability ``keep``."""
    return lambda rng, dims: rng.random((dims.hq, dims.nq, dims.nk)) < keep


#: Slopes and biases of most cases: a distinct s_h for every head, b_h comparable to s_h log n.
DEFAULT_S = _uniform(0.2, 1.2)
DEFAULT_B = _uniform(-0.5, 0.5)


def _draw(dims: Dims, std: float, extra: dict[str, ArrayMaker]):
    """``arrays(rng)``: q, k (standard deviation ``std``), v, then the ``extra`` arrays."""

    def arrays(rng: np.random.Generator) -> dict:
        out = {
            "q": std * rng.standard_normal((dims.b, dims.hq, dims.nq, dims.d)),
            "k": std * rng.standard_normal((dims.b, dims.hkv, dims.nk, dims.d)),
            "v": rng.standard_normal((dims.b, dims.hkv, dims.nk, dims.dv or dims.d)),
        }
        for name, make in extra.items():
            out[name] = make(rng, dims)
        return out

    return arrays


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, std: float = 1.0,
          s: ArrayMaker | float = DEFAULT_S, b: ArrayMaker | None = DEFAULT_B,
          bias: ArrayMaker | None = None, mask: ArrayMaker | None = None, dropout_keep: ArrayMaker | None = None,
          **params) -> Case:  # fmt: skip
    """One SSMax case; ``params`` are the JSON keyword arguments (causal, window, softcap, ...).
    A number ``s`` is one of them (a constant); an array maker ``s`` or ``b`` draws an input."""
    if isinstance(s, float):
        params, s = dict(params, s=s), None
    extra = {"s": s, "b": b, "bias": bias, "mask": mask, "dropout_keep": dropout_keep}
    extra = {key: make for key, make in extra.items() if make is not None}
    case_id = f"ssmax/{name}"
    return Case(
        id=case_id,
        mechanism="ssmax",
        description=description,
        flags=flags,
        seed=zlib.crc32(case_id.encode()),
        arrays=_draw(dims, std, extra),
        params=params,
        differentiable=tuple(n for n in ("q", "k", "v", "s", "b", "bias") if n in ("q", "k", "v") or n in extra),
    )


def cases() -> list[Case]:
    """The SSMax conformance cases, in reading order."""
    return [
        _case("baseline_shared_s", "No mask, s = 0.6 for every head as a number, b = 0, D = 59, Dv = 4: n = Nk = 6.",
              ("BASELINE", "AWKWARD_HEAD_DIM", "VALUE_DIM_DIFFERS"), Dims(1, 2, 1, 5, 6, 59, 4), s=0.6, b=None),
        # --- which n -------------------------------------------------------------
        _case("causal_self", "Causal, N = 12, GQA 4:2, s and b per query head: n_i = i + 1, row 0 has one key.",
              ("SSMAX_MASKED_N", "SSMAX_PER_HEAD_S", "SSMAX_SINGLE_KEY", "CAUSAL_MASK"), Dims(1, 4, 2, 12, 12, 8),
              causal=True),
        _case("key_padding", "Keys padded to 11, batch 1 has 6 real keys, not causal, Nq = 9: n = 11 and 6.",
              ("SSMAX_MASKED_N", "PADDING_MASK", "MULTI_BATCH"), Dims(2, 4, 2, 9, 11, 8), mask=_key_padding((11, 6))),
        _case("padding_causal_mqa", "Causal N = 10 with keys padded after 7 in batch 1, MQA 2:1: n_i = min(i + 1, 7).",
              ("SSMAX_MASKED_N", "PADDING_MASK", "MULTI_QUERY"), Dims(2, 2, 1, 10, 10, 8),
              mask=_key_padding((10, 7)), causal=True),
        _case("decode_bottom_right", "3 queries over 20 cached keys, causal bottom-right, MQA 4:1: n = 18, 19, 20.",
              ("SSMAX_MASKED_N", "CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS", "MULTI_QUERY"), Dims(1, 4, 1, 3, 20, 8),
              causal=True),
        _case("causal_top_left", "6 queries over 9 keys, causal top-left: n_i = i + 1, not i + 4, row 0 has one key.",
              ("SSMAX_MASKED_N", "CAUSAL_ALIGNMENT", "SSMAX_SINGLE_KEY"), Dims(1, 4, 2, 6, 9, 8),
              causal=True, causal_alignment="top_left"),
        _case("window_gqa", "Causal window (3, 0), N = 13, GQA 8:2, s per head: n_i = min(i + 1, 4).",
              ("SSMAX_MASKED_N", "SSMAX_PER_HEAD_S", "SLIDING_WINDOW", "GQA_HEAD_MAP", "GQA_GRAD_REDUCTION"),
              Dims(1, 8, 2, 13, 13, 8), causal=True, window=[3, 0]),
        _case("window_two_sided_cross", "Window (2, 1) bottom-right, 8 queries over 12 keys, not causal: n = 4 but 3 last.",
              ("SSMAX_MASKED_N", "SLIDING_WINDOW", "UNEQUAL_LENGTHS"), Dims(1, 4, 2, 8, 12, 8), window=[2, 1]),
        _case("per_head_mask_causal", "Random (Hq, Nq, Nk) mask AND causal, N = 10: n differs per head and row.",
              ("SSMAX_MASKED_N", "MASK_BROADCAST", "MASK_COMBINATION"), Dims(1, 4, 2, 10, 10, 8),
              mask=_per_head_mask(0.7), causal=True),
        _case("dropout_keeps_n", "Causal N = 8 with a dropout keep-mask (p = 0.25): n counts keys before dropout.",
              ("SSMAX_MASKED_N", "DROPOUT_SCALING"), Dims(1, 4, 2, 8, 8, 8), causal=True, dropout_p=0.25,
              dropout_keep=lambda rng, dims: rng.random((dims.b, dims.hq, dims.nq, dims.nk)) >= 0.25),
        _case("decode_single_query_padding", "One query over 33 keys, batch 1 padded to 20, MQA 4:1: n = 33 and 20.",
              ("SSMAX_MASKED_N", "SINGLE_TOKEN", "PADDING_MASK", "MULTI_QUERY"), Dims(2, 4, 1, 1, 33, 8),
              mask=_key_padding((33, 20))),
        # --- rows with no key or one key -----------------------------------------------
        _case("fully_masked_rows", "7 queries over 4 keys, causal bottom-right: rows 0-2 see no key, row 3 one key.",
              ("FULLY_MASKED_ROW", "SSMAX_MASKED_N", "SSMAX_SINGLE_KEY", "CAUSAL_ALIGNMENT"), Dims(1, 4, 2, 7, 4, 8),
              causal=True),
        _case("single_key_rows", "Window (0, 0), N = 9: every row attends to one key, so its factor is b and lse b·s.",
              ("SSMAX_SINGLE_KEY", "SSMAX_BIAS"), Dims(1, 4, 2, 9, 9, 8), std=1.5, b=_uniform(0.5, 1.5),
              window=[0, 0]),
        # --- the factor ------------------------------------------------------------------
        _case("scope_softcap_bias", "Soft-cap 2 and a (1, Hq, 1, Nk) bias: the factor scales q·k before both.",
              ("SSMAX_FACTOR_SCOPE", "SOFTCAP_BEFORE_BIAS", "BIAS_BROADCAST"), Dims(1, 4, 2, 10, 10, 8), std=1.5,
              bias=lambda rng, dims: 1.5 * rng.standard_normal((1, dims.hq, 1, dims.nk)), softcap=2.0),
        _case("bias_dominant", "Causal N = 9, s in [0.1, 0.3), b in [0.8, 1.6): b carries most of the factor.",
              ("SSMAX_BIAS", "SSMAX_SCALE_GRADIENT"), Dims(1, 4, 2, 9, 9, 8), s=_uniform(0.1, 0.3),
              b=_uniform(0.8, 1.6), causal=True),
        _case("negative_factor", "Causal N = 12, b in [-1.5, -1): s log n + b < 0 on early rows (attends to low scores).",
              ("SSMAX_BIAS", "SSMAX_SCALE_GRADIENT"), Dims(1, 4, 2, 12, 12, 8), s=_uniform(0.2, 0.4),
              b=_uniform(-1.5, -1.0), causal=True),
        _case("gradient_batch_padding_bias", "B = 2, keys padded to 8 and 5, causal, full bias: ds, db sum over b and i.",
              ("SSMAX_SCALE_GRADIENT", "SSMAX_MASKED_N", "MULTI_BATCH", "BIAS"), Dims(2, 4, 2, 8, 8, 8),
              mask=_key_padding((8, 5)), bias=lambda rng, dims: rng.standard_normal((dims.b, dims.hq, dims.nq, dims.nk)),
              causal=True),
    ]  # fmt: skip
