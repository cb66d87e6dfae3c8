"""Conformance cases for differential attention.

Each case is small and built so that the mistake its flags name changes the
numbers: head-pairing cases have H >= 2 output heads (with one, pairs (2h,
2h + 1) and (h, h + H) coincide) and often a bias or mask that differs per
query head; GQA cases have a group size G >= 2, where the paired and the
repeat_kv key rules differ; λ-vectors have a standard deviation of 0.4 or
more (the authors initialise with 0.1), so that exp(λ_q·λ_k) is far from
1 + λ_q·λ_k; and the ε case has values small enough that RMSNorm's ε is
comparable to the mean square it is added to.

Arrays: ``q`` (B, 2H, Nq, D), ``k`` (B, 2Hkv, Nk, D), ``v`` (B, Hkv, Nk, 2D),
the four λ vectors (D,), and, where the case has them, ``norm_weight``
(2D,), ``bias`` and ``mask`` (per query head, broadcastable to
(B, 2H, Nq, Nk)). λ_init comes from ``depth`` or is given as
``lambda_init`` (JSON parameters).

Seeds are the CRC-32 of the case id (refattn/conformance/case.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...conformance.case import ArrayMaker, Case, make_case

LAMBDA_NAMES = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


class Dims(NamedTuple):
    """Sizes of one case: q (b, 2h, nq, d), k (b, 2hkv, nk, d), v (b, hkv, nk, 2d).

    Not the shared :class:`refattn.conformance.case.Dims`: ``h`` counts output heads, and v has half
    of k's heads and twice its width.
    """

    b: int
    h: int
    hkv: int
    nq: int
    nk: int
    d: int


#: The flags only these cases use (the shared ones are in refattn/conformance/flags.py).
FLAGS: dict[str, str] = {
    "DIFF_LAMBDA_REPARAM": (
        "lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init: one scalar per layer, shared "
        "by every head. Cases draw the lambda vectors with standard deviation 0.4 or more, so exp(lambda_q . "
        "lambda_k) is far from 1 + lambda_q . lambda_k. Fails implementations that drop the exponentials, cross the "
        "pairs (lambda_q1 . lambda_k2), leave lambda_init out, or keep one lambda per head."
    ),
    "DIFF_LAMBDA_INIT": (
        "lambda_init = 0.8 - 0.6 exp(-0.3 depth) with depth the 0-based layer index (the authors' "
        "lambda_init_fn(depth); the paper writes l - 1 for a 1-based l), and the same lambda_init in the factor "
        "1 - lambda_init after the norm. Fails the paper's l - 1 applied to a 0-based index (exp(-0.3 (depth - 1))) "
        "and a depth counted from 1."
    ),
    "DIFF_HEAD_PAIRING": (
        "Query heads 2h and 2h + 1 (adjacent) are the two maps of output head h, as the authors' "
        "attn_weights.view(B, H, 2, N, N) and q.reshape(B, N, H, 2, D) make them; the maps' log-sum-exps "
        "aux.map_lse (B, 2H, Nq) and a per-query-head bias or mask follow the same order. Fails implementations that pair heads h and h + H (torch.chunk over the "
        "heads, as Hugging Face's DiffLlama does)."
    ),
    "DIFF_GQA_KEYS": (
        "With G = H / Hkv >= 2, map c of output head h reads key head 2 (h // G) + c under gqa_keys='paired' (the "
        "authors' flash variants: kv head j holds the keys 2j and 2j + 1) and key head (2h + c) // G under "
        "'repeat_kv' (multihead_diffattn.py's repeat_kv over all 2 Hkv key heads); both maps read value head h // G. "
        "Fails an implementation that uses the other rule than the case's gqa_keys (they differ whenever G >= 2), "
        "and a dk not summed into the key head each map read."
    ),
    "DIFF_SUBLN_SCALE": (
        "After the per-head RMSNorm the output is multiplied by the fixed factor 1 - lambda_init. Fails "
        "implementations that leave it out, use the learned 1 - lambda, or apply it before the norm, which cancels it."
    ),
    "DIFF_SUBLN_GROUP": (
        "The RMSNorm (the authors' subln) normalises each output head's 2D features together: one statistic per "
        "(batch, head, query). Fails implementations that normalise each D-half separately (as a flash kernel that "
        "splits v in two halves might), all heads together, or subtract the mean (LayerNorm)."
    ),
    "DIFF_NORM_EPS": (
        "The RMSNorm's eps (norm_eps, 1e-5 in the authors' subln) is added to the mean square inside the square "
        "root. The case's values are small enough that eps is comparable to the mean square. Fails eps left out or "
        "added outside the root, and another default such as 1e-6 (that of the authors' rms_norm.py, which subln "
        "overrides)."
    ),
}


def _draw(dims: Dims, std: float, v_std: float, lambda_std: float, extra: dict[str, ArrayMaker]):
    """``arrays(rng)``: q, k (standard deviation ``std``), v (``v_std``), the λ vectors, then the ``extra`` arrays."""

    def arrays(rng: np.random.Generator) -> dict:
        b, h, hkv, nq, nk, d = dims
        out = {
            "q": std * rng.standard_normal((b, 2 * h, nq, d)),
            "k": std * rng.standard_normal((b, 2 * hkv, nk, d)),
            "v": v_std * rng.standard_normal((b, hkv, nk, 2 * d)),
        }
        out.update({name: lambda_std * rng.standard_normal(d) for name in LAMBDA_NAMES})
        out.update({name: make(rng, dims) for name, make in extra.items()})
        return out

    return arrays


def _weight(rng, dims):
    return rng.uniform(0.5, 1.5, 2 * dims.d)


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, std: float = 1.0, v_std: float = 1.0,
          lambda_std: float = 0.4, norm_weight: bool = False, bias: ArrayMaker | None = None,
          mask: ArrayMaker | None = None, **params) -> Case:  # fmt: skip
    """One differential-attention case; ``params`` are the JSON keyword arguments (depth, causal, ...)."""
    extra = {key: make for key, make in {"norm_weight": _weight if norm_weight else None, "bias": bias, "mask": mask}.items()
             if make is not None}  # fmt: skip
    differentiable = ("q", "k", "v", *LAMBDA_NAMES) + tuple(name for name in ("norm_weight", "bias") if name in extra)
    return make_case("differential", name, description, flags, _draw(dims, std, v_std, lambda_std, extra),
                     params=params, differentiable=differentiable)  # fmt: skip


def cases() -> list[Case]:
    """The differential-attention conformance cases, in reading order."""
    return [
        # --- λ, the pairing and the norm -------------------------------------
        _case("causal_depth_3", "Causal self-attention, H=2 output heads (4 query heads), MHA, depth 3, N=12.",
              ("DIFF_LAMBDA_REPARAM", "DIFF_LAMBDA_INIT", "DIFF_HEAD_PAIRING", "DIFF_SUBLN_SCALE", "DIFF_SUBLN_GROUP",
               "CAUSAL_MASK", "SCALE_DEFAULT"), Dims(1, 2, 2, 12, 12, 8), depth=3, causal=True),
        _case("depth_0_norm_weight", "Depth 0 (lambda_init = 0.2), 3 output heads, norm weight, not causal, N=9.",
              ("DIFF_LAMBDA_INIT", "DIFF_SUBLN_SCALE", "DIFF_HEAD_PAIRING"), Dims(1, 3, 3, 9, 9, 8),
              norm_weight=True, depth=0),
        _case("explicit_lambda_init_cross", "lambda_init = 0.5 given, 5 queries over 13 keys, GQA 2:1, norm weight.",
              ("DIFF_LAMBDA_REPARAM", "DIFF_SUBLN_GROUP", "DIFF_GQA_KEYS", "UNEQUAL_LENGTHS"), Dims(1, 2, 1, 5, 13, 8),
              norm_weight=True, lambda_init=0.5),
        _case("no_norm", "apply_norm=False: the difference o_0 - lambda o_1 itself; lambda vectors of std 0.8.",
              ("DIFF_LAMBDA_REPARAM", "DIFF_HEAD_PAIRING"), Dims(1, 2, 2, 10, 10, 8), lambda_std=0.8,
              apply_norm=False, depth=7, causal=True),
        _case("norm_eps_small_values", "v of std 3e-3: RMSNorm's eps = 1e-5 is comparable to the mean square.",
              ("DIFF_NORM_EPS",), Dims(1, 2, 2, 11, 11, 8), v_std=3e-3, depth=2, causal=True),
        # --- grouped-query heads -------------------------------------------------
        _case("gqa_paired_4_to_2", "4 output heads over 2 kv heads (G=2), paired keys: map c reads key 2(h//G)+c.",
              ("DIFF_GQA_KEYS", "DIFF_HEAD_PAIRING", "GQA_GRAD_REDUCTION"), Dims(1, 4, 2, 10, 10, 8),
              depth=1, causal=True),
        _case("gqa_repeat_kv_4_to_2", "The same sizes with gqa_keys='repeat_kv': map c reads key (2h+c)//G.",
              ("DIFF_GQA_KEYS", "GQA_GRAD_REDUCTION"), Dims(1, 4, 2, 10, 10, 8), gqa_keys="repeat_kv",
              depth=1, causal=True),
        _case("mqa_3_to_1", "3 output heads over 1 kv head (G=3), paired keys, causal, B=2, N=8.",
              ("DIFF_GQA_KEYS", "MULTI_QUERY", "MULTI_BATCH"), Dims(2, 3, 1, 8, 8, 8), norm_weight=True,
              depth=4, causal=True),
        # --- lengths and masks ---------------------------------------------------
        _case("decode_single_query", "One query over 17 cached keys, causal bottom-right, GQA 2:1, depth 5.",
              ("SINGLE_TOKEN", "CAUSAL_ALIGNMENT", "DIFF_GQA_KEYS"), Dims(1, 2, 1, 1, 17, 8), depth=5, causal=True),
        _case("fully_masked_rows", "7 queries over 4 keys, causal bottom-right: queries 0-2 see no key (out 0).",
              ("FULLY_MASKED_ROW", "CAUSAL_ALIGNMENT"), Dims(1, 2, 2, 7, 4, 8), norm_weight=True, depth=2,
              causal=True),
        _case("bias_per_query_head", "Bias (1, 2H, 1, Nk) per query head after soft-cap 2, causal window (4, 0).",
              ("DIFF_HEAD_PAIRING", "BIAS_BROADCAST", "SOFTCAP_BEFORE_BIAS", "SLIDING_WINDOW"),
              Dims(1, 2, 2, 12, 12, 8), std=1.5, bias=lambda rng, dims: 2.0 * rng.standard_normal((1, 2 * dims.h, 1, dims.nk)),
              depth=6, causal=True, window=[4, 0], softcap=2.0),
        _case("mask_per_query_head", "Random mask (B, 2H, Nq, Nk) per query head, B=2, GQA 2:1, top-left causal, Nq=6, Nk=9.",
              ("DIFF_HEAD_PAIRING", "DIFF_GQA_KEYS", "MASK_LAYOUT", "MULTI_BATCH"), Dims(2, 2, 1, 6, 9, 8),
              mask=lambda rng, dims: rng.random((dims.b, 2 * dims.h, dims.nq, dims.nk)) < 0.7, depth=3, causal=True,
              causal_alignment="top_left"),
    ]  # fmt: skip
