"""The invariants of spec/dense.md under Hypothesis, for the reference and the numba backend.

Each property comes from refattn.dense.properties (the same functions users
run on their kernels); the strategies draw only the problems a property is
stated for, so none passes vacuously.
"""

from functools import partial

import pytest
from hypothesis import assume, given

from refattn import dense_attention
from refattn.dense import properties
from refattn.strategies import dense_problems

ALL_OPTIONS = ("mask", "bias", "causal", "window", "softcap", "scale", "dropout")
WITHOUT = {
    properties.weights_sum_to_one: ("dropout",),
    properties.key_permutation_invariance: ("causal", "window"),
    properties.identical_keys_give_mean: ("bias", "dropout"),
    properties.out_from_lse: ("dropout",),
}
BACKENDS = ["reference", "numba"]


def _options(prop):
    return tuple(o for o in ALL_OPTIONS if o not in WITHOUT.get(prop, ()))


def _run(prop, backend, problem):
    attend = partial(dense_attention, backend=backend)
    params = dict(problem.params)
    if prop is properties.causal_independence:
        params["causal"] = True
    if prop is properties.split_and_merge:
        assume(problem.k.shape[2] >= 2)
    prop(attend, problem.q, problem.k, problem.v, params)


def _property_test(prop):
    @pytest.mark.parametrize("backend", BACKENDS)
    @given(problem=dense_problems(options=_options(prop)))
    def test(backend, problem):
        _run(prop, backend, problem)

    test.__name__ = f"test_{prop.__name__}"
    test.__doc__ = prop.__doc__
    return test


for _prop in properties.ALL:
    globals()[f"test_{_prop.__name__}"] = _property_test(_prop)
