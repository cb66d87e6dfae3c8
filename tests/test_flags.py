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

from refattn.conformance.flags import FLAGS
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from tests.wrong_impls import BUGS, CORRECT, WRONG

#: Where the wrong implementations of each position encoding's flags live.
POSITION_FLAG_TESTS = {
    "ALIBI_": "tests/test_position_alibi.py",
    "T5_": "tests/test_position_t5.py",
    "ROPE_": "tests/test_position_rope_conformance.py",
    "XPOS_": "tests/test_position_rope_conformance.py",
    "SHAW_": "tests/test_position_shaw_flags.py",
    "XL_": "tests/test_position_transformer_xl_conformance.py",
}

#: Flags that no committed case carries, with the reason.
NOT_TESTABLE = {
    "LONG_SEQUENCE": "its cases are generated on demand (refattn export --large), not committed",
}


@pytest.fixture(scope="module")
def suite():
    return load_suite(default_suite_folder()).select(mechanisms="dense")


@pytest.fixture(scope="module")
def correct_statuses(suite):
    """Status of the correct small implementation on every case, gradients included."""
    return {case.id: case.status for case in verify(CORRECT, suite=suite, grad=True).cases}


def test_every_flag_has_a_wrong_implementation():
    dense_flags = {flag for flag in FLAGS if not flag.startswith(tuple(POSITION_FLAG_TESTS))}
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


def test_every_position_flag_is_named_by_the_module_that_tests_it():
    root = Path(__file__).resolve().parents[1]
    for prefix, module in POSITION_FLAG_TESTS.items():
        text = (root / module).read_text()
        assert [flag for flag in FLAGS if flag.startswith(prefix) and f'"{flag}"' not in text] == [], module
