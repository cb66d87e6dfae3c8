"""Hypothesis strategies of Performer (FAVOR+) problems, for every preset and option.

q, k, v are :func:`refattn.strategies.shapes`' (GQA and MQA heads, ``Nq != Nk``
unless causal, head dims 1, 3, 8, 17, the value scales of
:data:`refattn.strategies.VALUE_SCALES`). Drawn: ω (m, D) with m from 1 to
above D, orthogonal blocks (:func:`orthogonal_features`, χ or √D row norms)
or i.i.d. Gaussian rows; causal or not; the preset, and overrides of its
stabilisers and epsilons.

Two things are kept out. Denominators that underflow: with large logits and
no ε every feature of a query can round to 0 (0 / 0), so a draw whose
smallest denominator is below :data:`MIN_DENOMINATOR` of the precision under
test is rejected. And the guard's decision ``|D| <= g``: a draw with a
denominator within :func:`refattn.strategies.tie_margin` (relative) of ``g``
is rejected, so an implementation in that precision takes every branch the
reference takes. The stabilising maxima are held fixed by the VJP, so their
argmax is no decision.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
from hypothesis import reject
from hypothesis import strategies as st

from ...core.precision import FLOAT64, STORAGE_DTYPES
from ...core.presets import FROM_PRESET
from ...strategies import VALUE_SCALES, MechanismProblem, generators, random_qkv, seeds, shapes, tie_margin
from . import reference
from .presets import PRESETS

MAX_FEATURES = 24
#: Preset parameters a problem may override, each with its values (the canonical first).
OVERRIDES = {
    "query_stabilizer": ("row", "none"),
    "key_stabilizer": ("global", "none", "prefix"),
    "feature_eps": (0.0, 1e-6, 1e-4),
    "denominator_feature_eps": (0.0, 1e-6),
    "denominator_guard": (0.0, 1e-6, 1e-2),
}


def min_denominator(precision: str) -> float:
    """The smallest |denominator| drawn at ``precision``: the square root of its smallest normal number,
    far from underflow in that precision (and below any denominator of ordinary logits)."""
    return float(np.sqrt(ml_dtypes.finfo(STORAGE_DTYPES[precision]).tiny))


def denominators(arguments: dict) -> tuple[np.ndarray, float]:
    """The reference's denominators D (B, Hq, Nq) before the guard, in float64, and the guard g."""
    params = {name: arguments.get(name, FROM_PRESET) for name in OVERRIDES}
    x = reference.check_inputs(arguments["q"], arguments["k"], arguments["v"], omega=arguments["omega"],
                               causal=arguments.get("causal", False), preset=arguments.get("preset"),
                               **params)  # fmt: skip
    s = reference.features(x, FLOAT64)
    implied, _, _ = reference._implied(x, s, FLOAT64)
    return implied.sum(axis=-1) + x.denominator_feature_eps * s["phi_q"].sum(axis=-1), x.denominator_guard


@st.composite
def features(draw, head_dim: int) -> np.ndarray:
    """ω (m, D): orthogonal blocks with χ or √D row norms, or i.i.d. standard normal rows."""
    count = draw(st.integers(1, MAX_FEATURES))
    rng = draw(generators())
    form = draw(st.sampled_from(["chi", "sqrt_d", "iid"]))
    if form == "iid":
        return rng.standard_normal((count, head_dim))
    return reference.orthogonal_features(rng, count, head_dim, form)


@st.composite
def _problems(draw, precision: str) -> MechanismProblem:
    causal = draw(st.booleans())
    shape = draw(shapes(max_len=17, head_dims=(1, 3, 8, 17)))
    if causal:
        shape = dataclasses.replace(shape, kv_len=shape.q_len)
    q, k, v = random_qkv(shape, draw(seeds()), draw(st.sampled_from(VALUE_SCALES)))
    arguments = dict(q=q, k=k, v=v, omega=draw(features(shape.head_dim)), preset=draw(st.sampled_from(list(PRESETS))))
    if causal:
        arguments["causal"] = True
    for name, values in OVERRIDES.items():
        if draw(st.booleans()):
            arguments[name] = draw(st.sampled_from([value for value in values if causal or value != "prefix"]))
    denominator, guard = denominators(arguments)
    size = np.abs(denominator)
    near_guard = np.abs(size - guard) < tie_margin(precision) * np.maximum(size, guard)
    if np.any(size < min_denominator(precision)) or np.any(near_guard):
        reject()
    return MechanismProblem("performer", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Performer problems whose denominators are far from underflow and from the guard's threshold at ``precision``."""
    return _problems(precision)
