"""Conformance cases of Performer (ω drawn by ``orthogonal_features`` from the case's generator)."""

from __future__ import annotations

from ...conformance.case import Case, Dims, draw, make_case
from .presets import resolve
from .reference import orthogonal_features

FLAGS = {
    "PERFORMER_CAUSAL_KEY_MAX": "A key stabiliser over all keys with ε added after exp makes causal outputs "
    "depend on later keys (performer-pytorch, Google); canonical causal uses the prefix maximum.",
    "PERFORMER_STABILIZER": "Which maximum is subtracted inside exp (query row, key global, key prefix).",
    "PERFORMER_FEATURE_EPS": "ε added to every feature after exp (1e-4 lucidrains, 1e-6 Google, 0 canonical).",
    "PERFORMER_DENOMINATOR": "The denominator's extras: +δ per cumulative feature (lucidrains causal) "
    "or R + 2ε[|R| ≤ ε] (Google).",
}


def _omega(m):
    return lambda rng, dims: orthogonal_features(rng, m, dims.d)


#: Why a preset case's VJP is not the derivative of its forward (Case.not_a_derivative).
DETACHED_MAXIMUM = (
    "the preset reproduces its library's gradient, which holds the stabilising maximum fixed (performer-pytorch "
    "detaches it; the stored VJP does the same), while with ε > 0 the forward depends on that maximum"
)


def _case(name, description, flags, dims, m, preset=None, std=0.7, **params) -> Case:
    if preset:  # the preset's values written out in full
        params = {**resolve(preset, params.get("causal", False)), **params}
    return make_case("performer", name, description, flags, draw(dims, {"omega": _omega(m)}, std=std),
                     params=params, preset=preset, not_a_derivative=DETACHED_MAXIMUM if preset else None)  # fmt: skip


def cases() -> list[Case]:
    return [
        _case("bidirectional", "Non-causal, m=24 features, 9 queries over 14 keys.",
              ("BASELINE", "PERFORMER_STABILIZER", "UNEQUAL_LENGTHS"), Dims(1, 2, 2, 9, 14, 16), 24),
        _case("causal_prefix", "Causal, canonical prefix stabiliser, D=59, m=30 (not a multiple of D).",
              ("CAUSAL_MASK", "PERFORMER_STABILIZER", "AWKWARD_HEAD_DIM"), Dims(1, 2, 2, 13, 13, 59), 30, causal=True),
        _case("gqa", "GQA 4:2, non-causal, B=2.",
              ("GQA_HEAD_MAP", "GQA_GRAD_REDUCTION", "MULTI_BATCH"), Dims(2, 4, 2, 8, 8, 16), 16),
        _case("lucidrains_causal", "performer-pytorch causal: key max over all keys, ε 1e-4, +1e-6 per feature.",
              ("PERFORMER_CAUSAL_KEY_MAX", "PERFORMER_FEATURE_EPS", "PERFORMER_DENOMINATOR", "CAUSAL_MASK"),
              Dims(1, 2, 2, 12, 12, 16), 32, preset="lucidrains", causal=True),
        _case("lucidrains_bidirectional", "performer-pytorch non-causal: ε 1e-4 after exp.",
              ("PERFORMER_FEATURE_EPS",), Dims(1, 2, 2, 10, 10, 16), 32, preset="lucidrains"),
        _case("google_causal", "Google JAX causal: key max over all keys, ε 1e-6, guarded denominator.",
              ("PERFORMER_CAUSAL_KEY_MAX", "PERFORMER_FEATURE_EPS", "PERFORMER_DENOMINATOR", "CAUSAL_MASK"),
              Dims(1, 2, 2, 11, 11, 16), 32, preset="google", causal=True),
        _case("google_guarded_denominator", "Google non-causal, q and k of std 2.5: every feature underflows "
              "towards ε and every denominator is below 1e-6, so the guard R + 2ε[|R| ≤ ε] sets the output's scale.",
              ("PERFORMER_DENOMINATOR", "PERFORMER_FEATURE_EPS"), Dims(1, 1, 1, 8, 8, 16), 32, preset="google", std=2.5),
    ]
