"""Conformance cases of Nyströmformer (conv kernels drawn like a small depthwise init)."""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, draw, make_case
from .presets import PRESETS

FLAGS = {
    "NYSTROM_PINV_ITERATIONS": "Z⁺ is the given number of iterations from Z₀, not an exact pseudo-inverse.",
    "NYSTROM_BATCH_COUPLED_INIT": "Z₀'s norms per matrix (canonical) or maxima over batch × heads (lucidrains, HF).",
    "NYSTROM_FRONT_PADDING": "Zero tokens prepended to a multiple of m enter landmarks and keys (lucidrains).",
    "NYSTROM_MASK_SCOPE": "A key padding mask acts on landmarks, kernel 3 and the convolution, or on kernel 3 only (HF).",
    "NYSTROM_CONV": "The depthwise convolution over V is added to the output (kernel centred, zeros outside).",
    "NYSTROM_FULL_RANK_SHORTCUT": "HF computes exact softmax attention when m equals N.",
}


def _conv(width):
    return lambda rng, dims: rng.standard_normal((dims.hq, width)) / width


def _padding(lengths):
    return lambda rng, dims: np.arange(dims.nk)[None, :] < np.array(lengths)[:, None]


def _case(name, description, flags, dims, extra=None, preset=None, **params) -> Case:
    extra = extra or {}
    params = {**PRESETS[preset], **params} if preset else params  # the preset's values written out in full
    grads = ("q", "k", "v") + (("conv_kernel",) if "conv_kernel" in extra else ())
    return make_case("nystrom", name, description, flags, draw(dims, extra), params=params, preset=preset,
                     differentiable=grads)  # fmt: skip


def cases() -> list[Case]:
    return [
        _case("canonical", "m=4 landmarks over 12 tokens, 6 iterations, conv width 3.",
              ("BASELINE", "NYSTROM_PINV_ITERATIONS", "NYSTROM_CONV"), Dims(1, 2, 2, 12, 12, 16),
              {"conv_kernel": _conv(3)}, num_landmarks=4),
        _case("two_iterations", "Two iterations, m=3, D=59, B=2: far from the pseudo-inverse.",
              ("NYSTROM_PINV_ITERATIONS", "AWKWARD_HEAD_DIM", "MULTI_BATCH"), Dims(2, 2, 2, 9, 9, 59),
              num_landmarks=3, pinv_iterations=2),
        _case("key_padding", "B=2, lengths 12 and 5, m=4: one landmark has no real token.",
              ("NYSTROM_MASK_SCOPE", "PADDING_MASK", "MULTI_BATCH", "NYSTROM_CONV"), Dims(2, 2, 2, 12, 12, 8),
              {"conv_kernel": _conv(5), "key_padding_mask": _padding((12, 5))}, num_landmarks=4),
        _case("lucidrains_front_padding", "N=10, m=4: two zero tokens prepended, no mask; B=2 couples Z₀.",
              ("NYSTROM_FRONT_PADDING", "NYSTROM_BATCH_COUPLED_INIT", "ODD_LENGTH"), Dims(2, 2, 2, 10, 10, 16),
              {"conv_kernel": _conv(3)}, preset="lucidrains", num_landmarks=4),
        _case("lucidrains_masked", "lucidrains with a mask (lengths 12, 9): masked means with eps 1e-8.",
              ("NYSTROM_BATCH_COUPLED_INIT", "NYSTROM_MASK_SCOPE", "PADDING_MASK"), Dims(2, 1, 1, 12, 12, 8),
              {"key_padding_mask": _padding((12, 9))}, preset="lucidrains", num_landmarks=3),
        _case("hf_kernel3_mask", "HF: the mask acts on kernel 3 only; B=2 couples Z₀.",
              ("NYSTROM_MASK_SCOPE", "NYSTROM_BATCH_COUPLED_INIT", "NYSTROM_CONV"), Dims(2, 2, 2, 8, 8, 16),
              {"conv_kernel": _conv(3), "key_padding_mask": _padding((8, 5))}, preset="hf", num_landmarks=4),
        _case("hf_full_rank_shortcut", "HF with m = N = 6: exact softmax attention plus the conv.",
              ("NYSTROM_FULL_RANK_SHORTCUT", "NYSTROM_CONV"), Dims(1, 2, 2, 6, 6, 8),
              {"conv_kernel": _conv(3)}, preset="hf", num_landmarks=6),
    ]
