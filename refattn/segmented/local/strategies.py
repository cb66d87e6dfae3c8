"""Hypothesis strategies of local-attention problems: look-around, causal and exact windows, shared-QK self
scores, rotary positions, autopadding, the lucidrains preset and each of its defects on its own.

Sizes shrink toward one batch element, one head, one token, windows of one
token, no look-around options and the canonical preset. Without ``autopad``
the length is a multiple of the window; with it, any length (the last
window padded). ``look_forward`` is left to its default or given (0 when
causal); rotary problems have an even head dim. There is no discrete
decision: the precision changes nothing.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, random_qkv, seeds, shapes
from .reference import PRESETS

HEAD_DIMS = (1, 3, 8, 17)
#: Rotary rotates pairs of dims: even head dims only.
ROTARY_HEAD_DIMS = (2, 8, 18)
MAX_LEN = 24
MAX_WINDOW = 6
#: The package's self score first, then scores that weigh against the other keys.
SELF_SCORES = (-5e4, -20.0, 0.5)
PRESET_FLAGS = ("attend_padding", "rotary_query_shift")


@st.composite
def _problems(draw) -> MechanismProblem:
    window_size = draw(st.integers(1, MAX_WINDOW))
    autopad = draw(st.booleans())
    n = draw(st.integers(1, MAX_LEN)) if autopad else window_size * draw(st.integers(1, MAX_LEN // window_size))
    rotary = draw(st.booleans())
    shape = draw(shapes(max_len=1, head_dims=ROTARY_HEAD_DIMS if rotary else HEAD_DIMS))
    shape = replace(shape, q_len=n, kv_len=n)
    q, k, v = random_qkv(shape, draw(seeds()), draw(st.sampled_from(VALUE_SCALES)))
    causal = draw(st.booleans())
    arguments = dict(q=q, k=k, v=v, window_size=window_size, causal=causal, look_backward=draw(st.integers(0, 2)),
                     exact_windowsize=draw(st.booleans()), rotary=rotary, autopad=autopad,
                     preset=draw(st.sampled_from(tuple(PRESETS))))  # fmt: skip
    if draw(st.booleans()):  # given rather than the default (0 causal, 1 otherwise)
        arguments["look_forward"] = 0 if causal else draw(st.integers(0, 2))
    if draw(st.booleans()):
        arguments.update(shared_qk=True, self_score=draw(st.sampled_from(SELF_SCORES)))
    if draw(st.booleans()):  # each preset parameter given on its own, overriding the preset's
        arguments.update({name: draw(st.booleans()) for name in PRESET_FLAGS})
    if draw(st.booleans()):
        arguments["scale"] = draw(st.sampled_from((0.3, 2.0)))
    return MechanismProblem("local", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Local-attention problems (no discrete decision: the precision changes nothing)."""
    return _problems()
