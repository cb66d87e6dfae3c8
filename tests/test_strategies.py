"""Every registered mechanism has a Hypothesis strategy, and it draws valid, complete problems."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.core import registry
from refattn.lsh import bucket_margins
from refattn.strategies import MechanismProblem, problems, tie_margin


#: log-n with ``training_length`` takes the log of every row's position before discarding those of rows before
#: the sequence start (Nq > Nk): a harmless warning from refattn/dilution/logn/reference.py:factor_of.
MECHANISMS = [
    pytest.param(name, marks=pytest.mark.filterwarnings("ignore::RuntimeWarning")) if name == "logn"
    else name for name in registry.names()
]  # fmt: skip


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_every_mechanism_draws_valid_problems(mechanism):
    @settings(max_examples=5, derandomize=True, deadline=None)
    @given(problems(mechanism))
    def drawn_problem_runs(problem):
        assert isinstance(problem, MechanismProblem) and problem.mechanism == mechanism
        assert set(problem.positional) <= set(problem.arrays)
        result = problem.call(registry.get(mechanism).forward)
        assert np.all(np.isfinite(result.out))

    drawn_problem_runs()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_lsh_decisions_are_far_from_ties(precision, data):
    problem = data.draw(problems("lsh", precision))
    arrays = problem.arrays
    margins = bucket_margins(arrays["qk"], arrays["rotations"], problem.params["num_buckets"])
    assert margins.min() >= tie_margin(precision)


def test_tie_margin_grows_with_the_roundoff():
    assert tie_margin("float64") < tie_margin("float32") < tie_margin("float16") < tie_margin("bfloat16")
    with pytest.raises(refattn.SpecError, match="precision"):
        tie_margin("float8")


def test_unknown_mechanism_is_refused():
    with pytest.raises(refattn.SpecError, match="mechanism"):
        problems("no_such_mechanism")


def test_problems_shrink_toward_small_shapes():
    from hypothesis import find

    smallest = find(problems("dense"), lambda p: p.arrays["q"].shape[1] > p.arrays["k"].shape[1],
                    settings=settings(database=None, max_examples=200))  # fmt: skip
    assert smallest.arrays["q"].shape == (1, 4, 1, 1) and smallest.arrays["k"].shape == (1, 2, 1, 1)  # GQA 4:2 first
    assert smallest.params == {}


def test_describe_lists_arrays_then_parameters():
    problem = MechanismProblem("dense", {"q": np.zeros((1, 1, 2, 3)), "k": np.zeros((1, 1, 2, 3)),
                                         "v": np.zeros((1, 1, 2, 3)), "causal": True})  # fmt: skip
    assert problem.describe().splitlines() == ["q: float64[1, 1, 2, 3]", "k: float64[1, 1, 2, 3]",
                                               "v: float64[1, 1, 2, 3]", "causal = True"]  # fmt: skip
