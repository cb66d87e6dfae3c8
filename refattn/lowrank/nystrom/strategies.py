"""Hypothesis strategies of Nyströmformer problems, for every preset and option.

Self-attention q, k, v (B, H, N, D) with head dims 1, 3, 8, 17, N up to 24
and the value scales of :data:`refattn.strategies.VALUE_SCALES`. Drawn: the
number of landmarks m, a divisor of N, or, with front padding, any m <= N
(lengths that m does not divide); 1 to 8 iterations of the pseudo-inverse;
a depthwise convolution of odd width 1 to 7 or none; a key padding mask
(its first token real); a logit scale; the preset, and overrides of each of
its parameters (Z₀'s norms, padding, landmark eps, mask scope, the full-rank
shortcut, reached when m equals the padded length). No decision is discrete
in the forward (Z₀'s norms are maxima, continuous).
"""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, generators
from .presets import MASK_SCOPES, PADDINGS, PINV_INITS, PRESETS

MAX_LEN = 24
#: Preset parameters a problem may override, each with its values (the canonical first).
OVERRIDES = {
    "pinv_init": PINV_INITS,
    "padding": PADDINGS,
    "landmark_eps": (0.0, 1e-8, 1e-3),
    "mask_scope": MASK_SCOPES,
    "full_rank_shortcut": (False, True),
}


@st.composite
def landmarks(draw, length: int, padding: str) -> int:
    """A number of landmarks for ``length`` tokens: any m <= N with front padding, else a divisor of N."""
    if padding == "front":
        return draw(st.integers(1, length))
    return draw(st.sampled_from([m for m in range(1, length + 1) if length % m == 0]))


@st.composite
def _problems(draw) -> MechanismProblem:
    batch, heads, length = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, MAX_LEN))
    head_dim, value_dim = draw(st.sampled_from((1, 3, 8, 17))), draw(st.sampled_from((1, 3, 8)))
    std = draw(st.sampled_from(VALUE_SCALES))
    preset = draw(st.sampled_from(list(PRESETS)))
    params = {"preset": preset}
    params.update({name: draw(st.sampled_from(values)) for name, values in OVERRIDES.items() if draw(st.booleans())})
    padding = params.get("padding", PRESETS[preset]["padding"])
    params["num_landmarks"] = draw(landmarks(length, padding))
    if draw(st.booleans()):
        params["pinv_iterations"] = draw(st.integers(1, 8))
    if draw(st.booleans()):
        params["scale"] = draw(st.sampled_from([0.05, 1.0, 3.0]))
    rng = draw(generators())
    arguments = dict(q=std * rng.standard_normal((batch, heads, length, head_dim)),
                     k=std * rng.standard_normal((batch, heads, length, head_dim)),
                     v=rng.standard_normal((batch, heads, length, value_dim)))  # fmt: skip
    if draw(st.booleans()):
        width = draw(st.sampled_from((1, 3, 5, 7)))
        arguments["conv_kernel"] = rng.standard_normal((heads, width)) / width
    if draw(st.booleans()):
        real = rng.random((batch, length)) >= 0.3
        real[:, 0] = True
        arguments["key_padding_mask"] = real
    return MechanismProblem("nystrom", {**arguments, **params})


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Nyströmformer problems (no discrete decision: the precision changes nothing)."""
    return _problems()
