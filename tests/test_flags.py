"""Every flagged bug class is caught: a wrong implementation of each flag fails its flagged cases.

For each flag of the dense cases, tests/wrong_impls.py has a small NumPy
attention that makes exactly that mistake. The verifier must
fail it on at least one case carrying the flag, while the correct version of
the same small implementation passes every one of those cases. A new flag
without a wrong implementation fails :func:`test_every_flag_has_a_wrong_implementation`
until one is written (or it is listed in ``NOT_TESTABLE`` with its reason).
"""

from pathlib import Path

import pytest

from refattn.conformance import flags as flag_catalogue
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from refattn.core import registry
from tests.wrong_impls import BUGS, CORRECT, WRONG

#: Where the wrong implementations of each other mechanism's flags live: every
#: flag its cases carry (and the dense cases do not) must be named there.
FLAG_TESTS = {
    "alibi": "tests/test_position_alibi.py",
    "t5": "tests/test_position_t5.py",
    "rope": "tests/test_position_rope_conformance.py",
    "xpos": "tests/test_position_rope_conformance.py",
    "shaw": "tests/test_position_shaw_flags.py",
    "transformer_xl": "tests/test_position_transformer_xl_conformance.py",
    "ssmax": "tests/test_dilution_ssmax.py",
    "logn": "tests/test_dilution_logn.py",
    "differential": "tests/test_dilution_differential.py",
    "lsh": "tests/test_lsh_flags.py",
    "routing": "tests/test_routing_flags.py",
    "routing_hybrid": "tests/test_routing_flags.py",
    "soft_routing": "tests/test_routing_flags.py",
    "centroid_ema": "tests/test_routing_flags.py",
    "lowrank": "tests/test_lowrank_flags.py",
    "linformer": "tests/test_lowrank_flags.py",
    "nystrom": "tests/test_lowrank_flags.py",
    "performer": "tests/test_lowrank_flags.py",
    "segmented": "tests/test_segmented_flags.py",
    "sliding_window": "tests/test_segmented_flags.py",
    "longformer": "tests/test_segmented_flags.py",
    "bigbird": "tests/test_segmented_flags.py",
    "local": "tests/test_segmented_flags.py",
    "xl_recurrence": "tests/test_memory_flags.py",
    "sinks": "tests/test_memory_flags.py",
    "infini": "tests/test_memory_flags.py",
    "memory_tokens": "tests/test_memory_flags.py",
    "compressive": "tests/test_memory_flags.py",
    "h1d": "tests/test_hierarchical_flags.py",
    "multilevel": "tests/test_hierarchical_flags.py",
}


def _carried(mechanism: str) -> set[str]:
    return {flag for case in registry.get(mechanism).cases() for flag in case.flags}


#: Mechanisms whose flags have no module of wrong implementations yet: a known gap, listed so that it stays
#: visible (issue 17 is not closed while it is here) and no other mechanism can join it silently.
WITHOUT_FLAG_TESTS = {}


#: Flags that no committed case carries, with the reason.
NOT_TESTABLE = {
    "LONG_SEQUENCE": "its cases are generated on demand (refattn export --large), not committed",
}


@pytest.fixture(scope="module")
def suite():
    return load_suite(default_suite_folder(), mechanisms="dense")


@pytest.fixture(scope="module")
def correct_statuses(suite):
    """Status of the correct small implementation on every case, gradients included."""
    return {case.id: case.status for case in verify(CORRECT, suite=suite, grad=True).cases}


def test_every_dense_flag_has_a_wrong_implementation():
    dense_flags = _carried("dense") | set(NOT_TESTABLE)
    missing = sorted(dense_flags - set(BUGS) - set(NOT_TESTABLE))
    assert not missing, f"add a wrong implementation to tests/wrong_impls.py for {missing}"
    assert not set(BUGS) - dense_flags, "a wrong implementation names a flag that is not a dense flag"


def test_not_testable_flags_have_no_committed_case(suite):
    carried = {flag for case in suite.cases for flag in case.flags}
    assert not carried & set(NOT_TESTABLE)


def test_the_correct_small_implementation_passes_every_case(correct_statuses):
    assert set(correct_statuses.values()) == {"pass"}


@pytest.mark.parametrize("flag", sorted(BUGS))
def test_wrong_implementation_fails_a_flagged_case(flag, suite, correct_statuses):
    flagged = suite.select(flags=flag)
    assert all(correct_statuses[case.id] == "pass" for case in flagged.cases)
    report = verify(WRONG[flag], suite=flagged, grad=True)
    failed = [case for case in report.cases if case.status == "fail"]
    assert failed, f"no {flag} case catches a kernel that {BUGS[flag]}:\n{report.format()}"


def test_every_other_flag_is_named_by_the_module_that_tests_it():
    assert set(FLAG_TESTS) == set(registry.names()) - {"dense"} - set(WITHOUT_FLAG_TESTS), "a mechanism without a flag test module"
    root = Path(__file__).resolve().parents[1]
    for mechanism, module in FLAG_TESTS.items():
        text = (root / module).read_text()
        unnamed = [flag for flag in sorted(_carried(mechanism) - _carried("dense")) if f'"{flag}"' not in text]
        assert unnamed == [], f"{module} has no wrong implementation for {unnamed}"


def test_every_flag_belongs_to_some_mechanism():
    described = flag_catalogue.catalogue()
    assert set(described) == set(NOT_TESTABLE) | {flag for name in registry.names() for flag in _carried(name)}


def test_the_catalogue_joins_the_shared_flags_and_every_mechanism_own():
    described = flag_catalogue.catalogue()
    assert set(flag_catalogue.FLAGS) <= set(described)
    for name in registry.names():
        assert registry.get(name).flags().items() <= described.items(), name


def test_a_flag_described_two_ways_is_refused(monkeypatch):
    """A mechanism may not describe a shared flag again, nor two mechanisms one flag differently."""
    name, text = next(iter(flag_catalogue.FLAGS.items()))
    dense, lsh = registry.get("dense"), registry.get("lsh")
    monkeypatch.setattr(type(dense), "flags", lambda self: {name: text} if self is dense else {})
    with pytest.raises(ValueError, match=f"flag {name} is described in refattn/conformance/flags.py and again"):
        flag_catalogue.catalogue()
    own = {"OWN_FLAG": "one description"}
    monkeypatch.setattr(type(dense), "flags", lambda self: own if self is dense else {"OWN_FLAG": "another"} if self is lsh else {})
    with pytest.raises(ValueError, match="flag OWN_FLAG is described differently"):
        flag_catalogue.catalogue()
