"""examples/routing_transformer_kmeans.py: routing-transformer's KmeansAttention, with the case's centroids
injected, passes the lucidrains preset's routing cases (memberships exactly, gradients included) and refuses
the cases of other semantics with the reason. Skipped without routing-transformer."""


import pytest

from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from tests.examples import load_example

pytest.importorskip("torch")
pytest.importorskip("routing_transformer")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def example():
    return load_example("routing_transformer_kmeans.py", "routing_kmeans_example")


@pytest.fixture(scope="module")
def suite():
    return load_suite(default_suite_folder(), "routing")


def test_the_lucidrains_cases_pass_with_memberships_and_gradients(example, suite):
    ids = ["routing/lucidrains_basic", "routing/lucidrains_causal_memory", "routing/lucidrains_shared_padding"]
    report = verify(example.routing_kmeans, vjp=example.routing_kmeans_vjp, suite=suite.select(ids=ids), grad=True)
    assert report.ok, report.format()
    for case in report.cases:
        # passed on what it returns; the per-slot log-sum-exps and counts are not the library's outputs
        assert case.status == "partial" and "aux.membership" not in case.missing and "aux.slot_lse" in case.missing


def test_other_semantics_are_unsupported_with_the_reason(example, suite):
    report = verify(example.routing_kmeans, suite=suite.select(ids="routing/google_basic"))
    (case,) = report.cases
    assert case.status == "unsupported" and "attend_on='raw'" in case.message
