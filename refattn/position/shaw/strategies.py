"""Hypothesis strategies of Shaw problems: dense problems with positions, a clipping distance and relative
key and value embeddings."""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, dense_problems, generators, positions


@st.composite
def _problems(draw) -> MechanismProblem:
    problem = draw(dense_problems(max_len=17))
    shape = problem.shape
    q_positions, k_positions = draw(positions(shape.q_len, shape.kv_len))
    clip = draw(st.integers(0, 8))
    rng = draw(generators())
    return problem.of(
        "shaw", q_positions=q_positions, k_positions=k_positions, max_relative_position=clip,
        rel_k=rng.standard_normal((2 * clip + 1, shape.head_dim)), rel_v=rng.standard_normal((2 * clip + 1, shape.value_dim)),
    )  # fmt: skip


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Shaw problems (relative indices are integer decisions: the precision changes nothing)."""
    return _problems()
