"""examples/h_transformer_1d_lucidrains.py: lucidrains' h-transformer-1d passes the lucidrains preset's h1d cases
and fails the paper's cases flagged for coverage and normalisation, as does the preset itself.
Skipped when h-transformer-1d (and torch) are not installed."""


import pytest

from refattn.conformance import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import read_xfail, verify
from refattn.hierarchical import h1d_attention, h1d_attention_vjp
from tests.examples import EXAMPLES, load_example, statuses

pytest.importorskip("torch")
pytest.importorskip("h_transformer_1d")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def example():
    return load_example("h_transformer_1d_lucidrains.py", "h_transformer_1d_example")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("h1d_suite")
    export.export(folder, mechanisms=["h1d"])
    return load_suite(folder)


def test_the_library_passes_the_lucidrains_cases(example, suite):
    report = verify(example.h_transformer_1d, suite=suite.select(ids="h1d/lucidrains*"), dtype="float64", grad=True)
    assert report.ok, report.format()


def test_the_library_fails_the_coverage_and_normalisation_cases(example, suite):
    flagged = suite.select(ids=["h1d/baseline", "h1d/deep_hierarchy", "h1d/causal"])
    found = statuses(verify(example.h_transformer_1d, suite=flagged, dtype="float64", grad=True))
    assert found == {"h1d/baseline": "fail", "h1d/deep_hierarchy": "fail", "h1d/causal": "fail"}


def test_the_library_passes_with_its_known_failures_listed(example, suite):
    report = verify(example.h_transformer_1d, suite=suite, dtype="float32", grad=True,
                    xfail=read_xfail(EXAMPLES / "h_transformer_1d_lucidrains.xfail"))  # fmt: skip
    assert report.ok, report.format()


def test_the_preset_fails_the_flagged_cases_and_the_paper_passes(suite):
    flagged = suite.select(ids=["h1d/baseline", "h1d/deep_hierarchy"])

    def preset(q, k, v, **params):  # the case's own parameters, under the lucidrains preset
        return h1d_attention(q, k, v, **{**params, "preset": "lucidrains"})

    def preset_vjp(dout, q, k, v, **params):
        return h1d_attention_vjp(dout, q, k, v, **{**params, "preset": "lucidrains", "dlse": None})

    assert set(statuses(verify(preset, suite=flagged, grad=True, vjp=preset_vjp)).values()) == {"fail"}
    assert verify(h1d_attention, suite=flagged, grad=True, vjp=h1d_attention_vjp).ok
