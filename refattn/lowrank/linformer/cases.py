"""Conformance cases of Linformer. E and F are drawn like lucidrains' init (uniform ±1/√P)."""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, draw, make_case

FLAGS = {
    "LINFORMER_SHARING": "Headwise E (one per kv head), one E shared by every head, or key-value sharing F = E.",
    "LINFORMER_PROJECTION_SLICING": "Inputs shorter than the projections use their leading Nk columns (lucidrains).",
    "LINFORMER_PADDING_BEFORE_PROJECTION": "Padded keys and values are zeroed before E and F mix them "
    "(lucidrains takes no mask; fairseq accepts one and never applies it).",
}


def _projection(shape_of):
    def make(rng, dims):
        shape = shape_of(dims)
        return rng.uniform(-1.0, 1.0, shape) / shape[-2] ** 0.5

    return make


def _case(name, description, flags, dims, extra, grad_extra=("e",), **params) -> Case:
    return make_case("linformer", name, description, flags, draw(dims, extra), params=params,
                     differentiable=("q", "k", "v") + grad_extra)  # fmt: skip


def _padding(lengths):
    return lambda rng, dims: np.arange(dims.nk)[None, :] < np.array(lengths)[:, None]


def cases() -> list[Case]:
    shared = lambda p, n=None: _projection(lambda d: (p, n or d.nk))  # noqa: E731
    headwise = lambda p: _projection(lambda d: (d.hkv, p, d.nk))  # noqa: E731
    return [
        _case("shared_projection", "One E and one F for both heads, P=5, 9 queries over 13 keys.",
              ("BASELINE", "LINFORMER_SHARING", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 9, 13, 16),
              {"e": shared(5), "f": shared(5)}, grad_extra=("e", "f")),
        _case("headwise", "Headwise E and F (2, 4, 12), D=59.",
              ("LINFORMER_SHARING", "AWKWARD_HEAD_DIM"), Dims(1, 2, 2, 12, 12, 59),
              {"e": headwise(4), "f": headwise(4)}, grad_extra=("e", "f")),
        _case("key_value_sharing", "F = E (f omitted): E's gradient collects both uses, GQA 4:2.",
              ("LINFORMER_SHARING", "GQA_HEAD_MAP", "GQA_GRAD_REDUCTION"), Dims(1, 4, 2, 10, 10, 8), {"e": shared(3)}),
        _case("sliced_projection", "Projections for 20 positions on 13 keys: leading 13 columns; B=2.",
              ("LINFORMER_PROJECTION_SLICING", "MULTI_BATCH", "ODD_LENGTH"), Dims(2, 2, 2, 13, 13, 16),
              {"e": shared(6, 20), "f": shared(6, 20)}, grad_extra=("e", "f"), slice_projections=True),
        _case("key_padding", "B=2, lengths 11 and 6: padded keys and values zeroed before projecting.",
              ("LINFORMER_PADDING_BEFORE_PROJECTION", "PADDING_MASK", "MULTI_BATCH"), Dims(2, 2, 2, 11, 11, 16),
              {"e": shared(4), "f": shared(4), "key_padding_mask": _padding((11, 6))}, grad_extra=("e", "f")),
    ]
