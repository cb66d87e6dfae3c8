"""Hypothesis strategies of xPos problems: RoPE's problems with xPos's scale base and gamma, positions kept
within a few hundred of 0 (the decay ``zeta^(n / scale_base)`` makes logits huge far from 0)."""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, dense_problems
from ..rope.strategies import rotary_arguments


@st.composite
def _problems(draw) -> MechanismProblem:
    problem = draw(dense_problems(max_len=20).filter(lambda p: p.shape.head_dim >= 2))
    return problem.of(
        "xpos", **draw(rotary_arguments(problem, max_offset=200)),
        scale_base=draw(st.sampled_from([512.0, 128.0])), gamma=draw(st.sampled_from([0.4, 0.1])),
    )  # fmt: skip


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """xPos problems (no discrete decision: the precision changes nothing)."""
    return _problems()
