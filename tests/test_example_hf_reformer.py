"""examples/hf_reformer.py: HF's LSHSelfAttention passes every LSH case it can express
(every "hf" preset case, and the canonical cases whose behaviours HF shares), buckets
exactly, outputs and gradients within budget, in float64 and float32.

The LSH cases (a fresh export, which ``refattn export --check`` holds the committed
suite to) have one shared ``qk`` input, so verify() calls ``hf_lsh(qk, v, ...)`` and
``hf_lsh_vjp(dout, qk, v, ...)`` directly.
"""

import numpy as np
import pytest

from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import IMPLIED_OUT, read_xfail, verify
from tests.examples import EXAMPLES, load_example

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

XFAIL = EXAMPLES / "hf_reformer.xfail"


@pytest.fixture(scope="module")
def example():
    return load_example("hf_reformer.py", "hf_reformer")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lsh_suite")
    export(folder, mechanisms=["lsh"])
    return load_suite(folder)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hf_passes_every_case_it_can_express(example, suite, dtype):
    xfail = read_xfail(XFAIL)
    report = verify(example.hf_lsh, vjp=example.hf_lsh_vjp, suite=suite, dtype=dtype, grad=True, xfail=xfail)
    assert report.ok, report.format()
    counts = report.counts()
    assert counts["pass"] + counts["partial"] + counts["unsupported"] == len(suite.cases) and counts["xpass"] == 0, report.format()
    hf_cases = {c.id for c in suite.cases if c.preset == "hf"}
    assert hf_cases and not hf_cases & set(xfail)
    # HF's own buckets, from its own hashing of the case's rotations, match exactly wherever it hashes.
    bucket_checks = [check for case in report.cases for check in case.checks if check.name == "aux.buckets"]
    assert len(bucket_checks) >= 8 and all(check.status == "pass" for check in bucket_checks)


def test_wrong_rotations_fail_at_the_buckets_first(example, suite):
    def negated(qk, v, *, rotations, **params):
        return example.hf_lsh(qk, v, rotations=-rotations, **params)

    report = verify(negated, suite=suite.select(ids="lsh/hf_two_rounds"))
    assert report.cases[0].status == "fail" and report.cases[0].first_stage == "aux.buckets"
    # HF's attention is still right for the buckets it computed: only the hashing differs.
    implied = [check for check in report.cases[0].checks if check.name == IMPLIED_OUT]
    assert [check.status for check in implied] == ["pass"], report.format()
    assert "consistent with the output its own buckets, permutation imply" in report.format()


def test_rotation_layout_is_hf_s(example):
    """HF asks torch.randn for (H, D, R, num_buckets / 2); the adapter hands it the case's (H, R, D, P) transposed."""
    rotations = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)  # (H, R, D, P)
    randn = example.fixed_randn(example.torch.from_numpy(rotations.transpose(0, 2, 1, 3).copy()), "HF")
    drawn = randn((2, 4, 3, 5), dtype=example.torch.float64)
    assert drawn[1, 2, 0, 3] == rotations[1, 0, 2, 3]
    with pytest.raises(AssertionError, match="shape"):
        randn((2, 3, 4, 5))
