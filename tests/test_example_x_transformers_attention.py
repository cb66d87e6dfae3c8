"""examples/x_transformers_attention.py: x-transformers' Attend passes the dense cases it can express and
fails, as its source says, the grouped-query cases (kv heads tiled) and the soft-cap-before-bias case.
Skipped without x-transformers."""


import pytest

from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from tests.examples import load_example, statuses

pytest.importorskip("torch")
pytest.importorskip("x_transformers")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def example():
    return load_example("x_transformers_attention.py", "x_transformers_example")


@pytest.fixture(scope="module")
def suite():
    return load_suite(default_suite_folder(), "dense")


def test_dense_cases_pass_with_gradients(example, suite):
    ids = ["dense/baseline", "dense/causal_bottom_right_short_queries", "dense/mqa_8_to_1", "dense/mask_2d",
           "dense/softcap_before_mask", "dense/bias_full"]  # fmt: skip
    report = verify(example.xt_attention, suite=suite.select(ids=ids), dtype="float32", grad=True)
    assert set(statuses(report).values()) == {"pass"}, report.format()


def test_tiled_kv_heads_and_late_softcap_fail_and_are_explained(example, suite):
    ids = ["dense/gqa_8_to_2", "dense/softcap_before_bias"]
    report = verify(example.xt_attention, suite=suite.select(ids=ids), dtype="float32")
    assert statuses(report) == dict.fromkeys(ids, "fail")
    assert {"GQA_HEAD_MAP", "SOFTCAP_BEFORE_BIAS"} <= set(example.EXPLANATIONS)


def test_windows_are_unsupported(example, suite):
    report = verify(example.xt_attention, suite=suite.select(ids="dense/sliding_window"))
    assert statuses(report) == {"dense/sliding_window": "unsupported"}
