"""Hypothesis strategies of T5 problems: dense problems with positions, bucket parameters and a bias table.

Buckets are computed from integer distances, exactly, so no draw is near a tie.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, dense_problems, generators, positions


@st.composite
def _problems(draw) -> MechanismProblem:
    problem = draw(dense_problems(max_len=17))
    shape = problem.shape
    q_positions, k_positions = draw(positions(shape.q_len, shape.kv_len, spread=20))
    bidirectional = draw(st.booleans())
    num_buckets = draw(st.integers(2, 16).map(lambda n: 2 * n) if bidirectional else st.integers(2, 32))
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    return problem.of(
        "t5", q_positions=q_positions, k_positions=k_positions, bidirectional=bidirectional,
        num_buckets=num_buckets, max_distance=draw(st.integers(max_exact + 1, 200)),
        table=draw(generators()).standard_normal((num_buckets, shape.q_heads)),
    )  # fmt: skip


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """T5 problems (the precision changes nothing: buckets are integer decisions)."""
    return _problems()
