"""examples/reformer_pytorch_lsh.py: reformer-pytorch's LSHAttention, with the case's rotations injected,
passes the lucidrains preset's LSH cases (buckets and sort order exactly, gradients included) and
refuses the cases of other semantics with the reason. Skipped without reformer-pytorch."""

import numpy as np
import pytest

from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from tests.examples import load_example, statuses

pytest.importorskip("torch")
pytest.importorskip("reformer_pytorch")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def example():
    return load_example("reformer_pytorch_lsh.py", "reformer_pytorch_lsh_example")


@pytest.fixture(scope="module")
def suite():
    return load_suite(default_suite_folder(), "lsh")


def test_the_lucidrains_lsh_cases_pass_with_buckets_and_gradients(example, suite):
    ids = ["lsh/lucidrains_two_rounds", "lsh/lucidrains_padded_queries", "lsh/lucidrains_dup_correction"]
    report = verify(example.reformer_lsh, vjp=example.reformer_lsh_vjp, suite=suite.select(ids=ids), grad=True)
    assert set(statuses(report).values()) == {"pass"}, report.format()


def test_other_semantics_are_unsupported_with_the_reason(example, suite):
    report = verify(example.reformer_lsh, suite=suite.select(ids="lsh/hf_two_rounds"))
    (case,) = report.cases
    assert case.status == "unsupported" and "key_norm='l2'" in case.message


def test_rotations_reach_the_library_in_its_layout(example):
    import torch

    rotations = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)  # (H, R, D, P)
    layout = example._library_layout(rotations, batch=2)  # (B·H, D, R, P)
    assert layout.shape == (4, 4, 3, 5)
    # Written out: batch element 1, head 0, dim 2, round 1, projection 3 is rotations[0, 1, 2, 3].
    assert layout[2, 2, 1, 3] == rotations[0, 1, 2, 3]
    np.testing.assert_array_equal(layout[0].numpy(), layout[2].numpy())  # one set per head, shared by the batch
