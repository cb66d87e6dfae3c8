"""examples/onnx_attention.py: ONNX's reference Attention operator passes the dense cases it can express;
opset 24 cannot express a sliding window, opset 25 can, and a float64 scale override differs because an
ONNX float attribute is 32-bit (the explanation the gallery gives). Skipped without onnx."""

import numpy as np
import pytest

from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from tests.examples import load_example, statuses
from tests.naive_dense import naive_dense

pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def example():
    return load_example("onnx_attention.py", "onnx_attention_example")


@pytest.fixture(scope="module")
def suite():
    return load_suite(default_suite_folder(), "dense")


def test_causal_masked_and_gqa_cases_pass(example, suite):
    ids = ["dense/baseline", "dense/causal_bottom_right_short_queries", "dense/causal_top_left_long_queries",
           "dense/gqa_8_to_2", "dense/fully_masked_rows", "dense/softcap_before_mask", "dense/bias_broadcast_2d"]  # fmt: skip
    report = verify(example.onnx_attention, suite=suite.select(ids=ids), dtype="float32")
    assert set(statuses(report).values()) == {"pass"}, report.format()


def test_windows_need_opset_25(example, suite):
    windowed = suite.select(ids="dense/sliding_window*")
    assert set(statuses(verify(example.onnx_attention, suite=windowed, dtype="float64")).values()) == {"unsupported"}
    assert set(statuses(verify(example.onnx_attention_25, suite=windowed, dtype="float64")).values()) == {"pass"}


def test_dropout_is_unsupported(example, suite):
    report = verify(example.onnx_attention, suite=suite.select(ids="dense/dropout"))
    assert statuses(report) == {"dense/dropout": "unsupported"}


@pytest.mark.parametrize("case_id", ["dense/scale_override", "dense/large_logits"])
def test_float64_scale_override_differs_by_the_float32_square_root(example, suite, case_id):
    (case,) = suite.select(ids=case_id).cases
    report = verify(example.onnx_attention, suite=suite.select(ids=case_id), dtype="float64")
    assert report.cases[0].status == "fail" and "SCALE_OVERRIDE" in example.EXPLANATIONS
    # The explanation, derived independently: the loops of naive_dense with the scale the operator
    # uses, the square of the float32 square root of the float32 attribute, give its output.
    root = float(np.sqrt(np.float32(case.params["scale"])))
    q, k, v = (case.inputs[name] for name in "qkv")
    expected, _ = naive_dense(q, k, v, scale=root * root)
    got = example.onnx_attention(q, k, v, scale=case.params["scale"]).out
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_attention_logsumexp_of_a_fully_masked_row_is_minus_infinity(example):
    logits = np.array([[[[-np.inf, -np.inf], [0.0, np.log(3.0)]]]])  # (1, 1, 2, 2)
    np.testing.assert_allclose(example._logsumexp(logits), [[[-np.inf, np.log(4.0)]]])
