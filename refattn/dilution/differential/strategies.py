"""Hypothesis strategies of differential attention problems: its conformance cases' structures (two maps
per output head, values of twice the head dim, λ re-parameterisation, depth or λ_init, GQA rules) with fresh
random arrays (:func:`refattn.strategies.case_problems`)."""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import MechanismProblem, case_problems


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Differential attention problems (no discrete decision: the precision changes nothing)."""
    return case_problems("differential")
