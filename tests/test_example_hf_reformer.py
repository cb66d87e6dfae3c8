"""examples/hf_reformer.py: HF's LSHSelfAttention passes every LSH case it can express
(every "hf" preset case, and the canonical cases whose behaviours HF shares), buckets
exactly, outputs and gradients within budget, in float64 and float32.

The suite is exported to a temporary folder. verify() calls ``impl(q, k, v, ...)``;
LSH cases have one shared ``qk`` input, so :func:`shared_qk` presents each case with
``q = k = qk`` and the implementations drop ``k``.
"""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import refattn.lsh  # noqa: F401  (registers "lsh")
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import read_xfail, verify

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
XFAIL = EXAMPLES / "hf_reformer.xfail"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("hf_reformer", EXAMPLES / "hf_reformer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lsh_suite")
    export(folder, mechanisms=["lsh"])
    return shared_qk(load_suite(folder))


def shared_qk(suite):
    """The suite with each case's ``qk`` also given as ``q`` and ``k`` (verify's positional inputs)."""
    cases = [dataclasses.replace(c, inputs={"q": c.inputs["qk"], "k": c.inputs["qk"], "v": c.inputs["v"]}) for c in suite.cases]
    return dataclasses.replace(suite, cases=cases)


class OnQKV:
    """``fn(qk, v, **params)`` (with ``fn.vjp``) called as ``impl(q, k, v, **params)``."""

    def __init__(self, fn, vjp):
        self.fn, self._vjp = fn, vjp

    def __call__(self, q, k, v, **params):
        return self.fn(q, v, **params)

    def vjp(self, dout, q, k, v, *, dlse=None, **params):
        return self._vjp(dout, q, v, dlse=dlse, **params)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hf_passes_every_case_it_can_express(example, suite, dtype):
    xfail = read_xfail(XFAIL)
    report = verify(OnQKV(example.hf_lsh, example.hf_lsh_vjp), suite=suite, dtype=dtype, grad=True, xfail=xfail)
    assert report.ok, report.format()
    counts = report.counts()
    assert counts["pass"] == len(suite.cases) - len(xfail) and counts["xpass"] == 0, report.format()
    hf_cases = {c.id for c in suite.cases if c.preset == "hf"}
    assert hf_cases and not hf_cases & xfail
    # HF's own buckets, from its own hashing of the case's rotations, match exactly wherever it hashes.
    bucket_checks = [check for case in report.cases for check in case.checks if check.name == "aux.buckets"]
    assert len(bucket_checks) >= 8 and all(check.status == "pass" for check in bucket_checks)


def test_wrong_rotations_fail_at_the_buckets_first(example, suite):
    def negated(qk, v, *, rotations, **params):
        return example.hf_lsh(qk, v, rotations=-rotations, **params)

    report = verify(OnQKV(negated, None), suite=suite.select(ids="lsh/hf_two_rounds"))
    assert report.cases[0].status == "fail" and report.cases[0].first_stage == "aux.buckets"


def test_rotation_layout_is_hf_s(example):
    """HF asks torch.randn for (H, D, R, n_buckets / 2); the adapter hands it the case's (H, R, D, P) transposed."""
    rotations = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)  # (H, R, D, P)
    randn = example._fixed_randn(example.torch.from_numpy(rotations.transpose(0, 2, 1, 3).copy()))
    drawn = randn((2, 4, 3, 5), dtype=example.torch.float64)
    assert drawn[1, 2, 0, 3] == rotations[1, 0, 2, 3]
    with pytest.raises(AssertionError, match="shape"):
        randn((2, 3, 4, 5))
