"""Hypothesis strategies of Longformer problems: bands, global tokens, global projections and the hf preset.

Sizes shrink toward one batch element, one head, one token, a window of 0
and no global token. Windows are even (``w / 2`` per side), from 0 (2 for
``"hf"``) to wider than the sequence, and lengths are not multiples of the
window (the hf preset pads them). Global tokens are none, the first token,
or a random set differing per batch element; the global projections are
given or not. There is no discrete decision: the precision changes nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, generators, random_qkv, seeds, shapes
from .reference import PRESETS

HEAD_DIMS = (1, 3, 8, 17)
MAX_LEN = 24
GLOBAL_FORMS = ("none", "first", "random")


def global_tokens(rng, form: str, batch: int, n: int) -> np.ndarray | None:
    """(B, N) bool: no global token (None), the first token, or about a quarter of the tokens per batch element."""
    if form == "none":
        return None
    if form == "first":
        tokens = np.zeros((batch, n), dtype=bool)
        tokens[:, 0] = True
        return tokens
    return rng.random((batch, n)) < 0.25


@st.composite
def _problems(draw) -> MechanismProblem:
    n = draw(st.integers(1, MAX_LEN))
    shape = replace(draw(shapes(max_len=1, head_dims=HEAD_DIMS)), q_len=n, kv_len=n)
    value_scale = draw(st.sampled_from(VALUE_SCALES))
    q, k, v = random_qkv(shape, draw(seeds()), value_scale)
    preset = draw(st.sampled_from(PRESETS))
    half = draw(st.integers(0 if preset is None else 1, MAX_LEN // 2 + 1))
    arguments = dict(q=q, k=k, v=v, attention_window=2 * half, preset=preset)
    rng = draw(generators())
    tokens = global_tokens(rng, draw(st.sampled_from(GLOBAL_FORMS)), shape.batch, n)
    if tokens is not None:
        arguments["global_tokens"] = tokens
    if draw(st.booleans()):
        q_global, k_global, v_global = random_qkv(shape, draw(seeds()), value_scale)
        arguments.update(q_global=q_global, k_global=k_global, v_global=v_global)
    if draw(st.booleans()):
        arguments["scale"] = draw(st.sampled_from((0.3, 2.0)))
    return MechanismProblem("longformer", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Longformer problems (no discrete decision: the precision changes nothing)."""
    return _problems()
