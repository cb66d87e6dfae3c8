"""Hypothesis strategies of ALiBi problems: dense problems with positions, a form and sometimes explicit slopes."""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, dense_problems, generators, positions
from .reference import FORMS


@st.composite
def _problems(draw) -> MechanismProblem:
    problem = draw(dense_problems(max_len=17))
    q_positions, k_positions = draw(positions(problem.shape.q_len, problem.shape.kv_len))
    arguments = dict(q_positions=q_positions, k_positions=k_positions, form=draw(st.sampled_from(FORMS)))
    if draw(st.booleans()):
        arguments["slopes"] = draw(generators()).uniform(0.0, 1.0, problem.shape.q_heads)
    return problem.of("alibi", **arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """ALiBi problems; positions are integers, so the precision changes nothing."""
    return _problems()
