"""A check every mechanism's Hypothesis strategy passes, shared by the tests/test_strategies_*.py files."""

from __future__ import annotations

from typing import Callable

import numpy as np
from hypothesis import given

from refattn.core import registry
from refattn.strategies import problems


def draws_are_accepted(mechanism: str, precision: str, run_settings, also: Callable | None = None) -> None:
    """Every problem drawn for ``mechanism`` at ``precision`` (as many as ``run_settings`` says) is its own,
    is accepted by the mechanism's public function (a SpecError fails) and gives a finite output;
    ``also(problem)`` adds a family's own assertion about the draw."""
    forward = registry.get(mechanism).forward

    @run_settings
    @given(problems(mechanism, precision))
    def accepted(problem):
        assert problem.mechanism == mechanism
        if also is not None:
            also(problem)
        result = problem.call(forward)
        assert np.all(np.isfinite(result.out))

    accepted()
