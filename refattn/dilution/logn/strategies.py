"""Hypothesis strategies of log-n scaling problems: dense problems with ``n`` absent (Nk), 1, small or large,
or Qwen's per-row ``training_length``."""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, dense_problems


@st.composite
def _problems(draw) -> MechanismProblem:
    problem = draw(dense_problems(max_len=17))
    rule = draw(st.sampled_from(["keys", "n", "training_length"]))
    if rule == "keys":
        return problem.of("logn")
    if rule == "n":
        return problem.of("logn", n=draw(st.sampled_from([1, 2, 7, 4096])))
    return problem.of("logn", training_length=draw(st.integers(2, 20)))


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """log-n problems (no discrete decision: the precision changes nothing)."""
    return _problems()
