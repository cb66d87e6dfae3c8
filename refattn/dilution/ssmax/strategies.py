"""Hypothesis strategies of SSMax problems: dense problems with ``s`` (per head or one number) and sometimes
``s_bias``, under both rules for ``n``."""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, dense_problems, generators
from .reference import N_RULES


@st.composite
def _problems(draw) -> MechanismProblem:
    problem = draw(dense_problems(max_len=17))
    heads = problem.shape.q_heads
    rng = draw(generators())
    arguments = {"s": rng.uniform(0.05, 1.5, heads) if draw(st.booleans()) else float(rng.uniform(0.05, 1.5))}
    bias_form = draw(st.sampled_from(["absent", "number", "array"]))
    if bias_form != "absent":
        arguments["s_bias"] = float(rng.uniform(-1.0, 1.0)) if bias_form == "number" else rng.uniform(-1.0, 1.0, heads)
    arguments["n_rule"] = draw(st.sampled_from(N_RULES))
    return problem.of("ssmax", **arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """SSMax problems (no discrete decision: the precision changes nothing)."""
    return _problems()
