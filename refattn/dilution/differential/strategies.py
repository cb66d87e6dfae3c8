"""Hypothesis strategies of differential attention problems: its conformance cases' structures (two maps
per output head, values of twice the head dim, λ re-parameterisation, depth or λ_init, GQA rules) with fresh
random arrays (:func:`refattn.strategies.case_problems`)."""

from ...strategies import case_strategy

problems = case_strategy("differential")
