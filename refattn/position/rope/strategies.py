"""Hypothesis strategies of RoPE problems: dense problems (head dim >= 2) with positions up to thousands,
partial rotary dims, both layouts and a few bases."""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, Problem, dense_problems, positions

BASES = (10000.0, 500000.0, 7.0)


@st.composite
def rotary_arguments(draw, problem: Problem, max_offset: int = 5000) -> dict:
    """Positions, ``rotary_dim`` (even, or None for all of an even D) and ``layout``, shared with xPos."""
    head_dim = problem.shape.head_dim
    rotary = st.integers(1, head_dim // 2).map(lambda half: 2 * half)
    q_positions, k_positions = draw(positions(problem.shape.q_len, problem.shape.kv_len, max_offset=max_offset))
    return dict(
        q_positions=q_positions, k_positions=k_positions,
        rotary_dim=draw(rotary if head_dim % 2 else st.one_of(st.none(), rotary)),
        layout=draw(st.sampled_from(["half", "interleaved"])),
    )  # fmt: skip


@st.composite
def _problems(draw) -> MechanismProblem:
    problem = draw(dense_problems(max_len=20).filter(lambda p: p.shape.head_dim >= 2))
    return problem.of("rope", **draw(rotary_arguments(problem)), base=draw(st.sampled_from(BASES)))


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """RoPE problems (no discrete decision: the precision changes nothing)."""
    return _problems()
