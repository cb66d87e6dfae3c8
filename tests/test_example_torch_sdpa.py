"""examples/torch_sdpa.py: PyTorch's SDPA passes the dense cases it can express;
its deliberately wrong variants fail exactly the flagged cases, with a readable report."""


import pytest

from refattn import cli
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from tests.examples import EXAMPLES, load_example

pytest.importorskip("torch")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def example():
    return load_example("torch_sdpa.py", "torch_sdpa")


@pytest.fixture(scope="module")
def suite():
    return load_suite(default_suite_folder(), "dense")


#: Dense cases SDPA cannot express: it has no logit soft-cap and draws its own dropout mask.
UNSUPPORTED = {"dense/softcap_extreme", "dense/softcap_before_bias", "dense/softcap_before_mask", "dense/dropout",
               "dense/combined"}  # fmt: skip


def run(impl, suite):
    return verify(impl, suite=suite, dtype="float32", grad=True)


def test_sdpa_passes_every_case_it_supports(example, suite):
    report = run(example.sdpa, suite)
    assert report.ok, report.format()
    assert {case.id for case in report.cases if case.status == "unsupported"} == UNSUPPORTED
    assert report.counts()["pass"] == len(suite.cases) - len(UNSUPPORTED)
    assert not verify(example.sdpa, suite=suite, dtype="float32", strict=True).ok


def test_sdpa_from_the_command_line(monkeypatch, suite, capsys):
    monkeypatch.chdir(EXAMPLES.parent)
    args = ["verify", "--impl", "examples/torch_sdpa.py:sdpa", "--mechanism", "dense", "--dtype", "float32", "--grad"]
    assert cli.main([*args, "--suite", str(suite.folder.resolve())]) == 0
    out = capsys.readouterr().out
    assert "(OK)" in out and "dense/dropout: SDPA draws its own dropout mask" in out


def failing(report) -> set:
    return {case.id for case in report.cases if case.status == "fail"}


def flagged(suite, flag) -> set:
    return {case.id for case in suite.cases if flag in case.flags} - UNSUPPORTED


def test_top_left_causal_fails_the_causal_alignment_cases(example, suite):
    report = run(example.sdpa_top_left, suite)
    assert failing(report) and failing(report) <= flagged(suite, "CAUSAL_ALIGNMENT")
    text = report.format()
    assert "dense/causal_bottom_right_short_queries [fail]  flags: CAUSAL_ALIGNMENT" in text
    assert "first differing stage: out" in text and "first difference at index" in text


def test_tiled_gqa_fails_every_gqa_head_map_case(example, suite):
    report = run(example.sdpa_tiled_gqa, suite)
    assert flagged(suite, "GQA_HEAD_MAP") <= failing(report)
    assert "GQA_HEAD_MAP: Hq > Hkv >= 2 with distinct kv heads" in report.format()
