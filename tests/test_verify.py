"""The verifier: its Python API, report formats, the CLI, the adapters and the pytest plugin."""

import dataclasses
import importlib.metadata
import json
import os
import sys
import time
import xml.etree.ElementTree as ET

import ml_dtypes
import numpy as np
import pytest

import refattn
from refattn import cli
from refattn.conformance import export
from refattn.conformance.suite import SuiteError, load_suite
from refattn.conformance.verify import (
    IMPLIED_OUT,
    check_case,
    default_suite_folder,
    first_difference,
    load_callable,
    read_xfail,
    verify,
)
from refattn.core.errors import SpecError
from refattn.core.results import Result
from refattn.dense.reference import dense_attention, dense_attention_vjp
from tests.wrong_impls import CORRECT, WRONG

pytest_plugins = ["pytester"]

REFERENCE = ["--impl", "refattn.dense.reference:dense_attention", "--vjp", "refattn.dense.reference:dense_attention_vjp"]
NUMBA = ["--backend", "numba"]

# Implementations named by "tests.test_verify:<name>" in the CLI and plugin tests.
top_left = WRONG["CAUSAL_ALIGNMENT"]


def raising(q, k, v, **params):
    raise RuntimeError("kernel not built for this shape")


@pytest.fixture(scope="module")
def suite():
    """The committed dense cases (the implementations here are dense attention)."""
    return load_suite(default_suite_folder(), mechanisms="dense")


def case_of(suite, case_id):
    return suite.select(ids=[case_id]).cases[0]


# --- the bundled backends pass -------------------------------------------------


def test_reference_passes_every_case_with_gradients(suite):
    report = verify(dense_attention, suite=suite, vjp=dense_attention_vjp, grad=True)
    assert report.ok
    assert report.counts()["pass"] == len(suite.cases)
    assert all(check.status == "pass" for case in report.cases for check in case.checks)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reference_on_rounded_inputs_passes_lower_precisions(suite, dtype):
    report = verify(dense_attention, suite=suite, vjp=dense_attention_vjp, grad=True, dtype=dtype)
    assert report.ok, report.format()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numba_backend_verifies_from_the_command_line(suite, dtype, capsys):
    status = cli.main(["verify", *NUMBA, "--grad", "--dtype", dtype, "--suite", str(suite.folder), "--mechanism", "dense"])
    assert status == 0, capsys.readouterr().out


def test_independent_small_implementation_passes(suite):
    assert verify(CORRECT, suite=suite, grad=True).ok


def test_a_bundled_backend_is_verified_through_the_registry(suite):
    report = verify(suite=suite, mechanism="dense", backend="numba", grad=True, dtype="float32")
    assert report.ok and report.impl == "dense --backend numba", report.format()
    assert report.counts()["pass"] == len(suite.cases)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(dtype="float8"), "dtype"),
        (dict(layout="nbhd"), "layout"),
        (dict(timeout=0), "timeout"),
        (dict(timeout=float("inf")), "timeout"),
        (dict(backend="numba"), "impl"),  # an impl and a backend
        (dict(impl=None, backend="cuda", mechanism="dense"), "backend"),
        (dict(impl=None, backend="numba", mechanism=["dense", "alibi"]), "mechanism"),
        (dict(impl=None, backend="numba", mechanism="no_such"), "mechanism"),
        (dict(impl=None), "impl"),
        (dict(impl="not callable"), "impl"),
        (dict(grad=True), "vjp"),
    ],
)
def test_bad_arguments_raise_spec_error(suite, kwargs, argument):
    kwargs = {"impl": dense_attention, **kwargs}
    with pytest.raises(SpecError) as info:
        verify(suite=suite, **kwargs)
    assert info.value.argument == argument


# --- what an implementation receives and may return ---------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_arrays_are_cast_to_the_precision_and_params_passed_through(suite, dtype):
    seen = {}

    def spy(q, k, v, **params):
        seen.update(q=q, k=k, v=v, **params)
        return dense_attention(q, k, v, **params)

    verify(spy, suite=suite, ids=["dense/combined"], dtype=dtype)
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    assert {seen[name].dtype for name in ("q", "k", "v", "bias")} == {want}
    assert seen["mask"].dtype == bool and seen["dropout_keep"].dtype == bool
    assert seen["window"] == (6, None) and seen["causal"] is True and seen["scale"] == 0.2


def test_layout_bnhd_transposes_inputs_and_outputs(suite):
    def sequence_major(q, k, v, **params):  # takes and returns (B, N, H, D)
        t = lambda x: np.swapaxes(x, 1, 2)
        result = dense_attention(t(q), t(k), t(v), **params)
        return t(result.out), t(result.lse)

    def sequence_major_vjp(dout, q, k, v, *, dlse, **params):
        t = lambda x: np.swapaxes(x, 1, 2)
        grads = dense_attention_vjp(t(dout), t(q), t(k), t(v), dlse=t(dlse), **params)
        return {name: t(g) if name in "qkv" else g for name, g in grads.items()}

    ids = ["dense/gqa_causal_cross", "dense/bias_broadcast_heads", "dense/value_dim_differs"]
    bnhd = verify(sequence_major, suite=suite, ids=ids, layout="bnhd", grad=True, vjp=sequence_major_vjp)
    assert bnhd.ok, bnhd.format()
    assert not verify(sequence_major, suite=suite, ids=ids, layout="bhnd").ok


def test_out_only_reports_lse_as_not_provided(suite):
    report = verify(lambda q, k, v, **p: dense_attention(q, k, v, **p).out, suite=suite, ids=["dense/baseline"])
    checks = {c.name: c.status for c in report.cases[0].checks}
    assert report.ok and checks == {"out": "pass", "lse": "not provided"}


def test_a_pair_and_a_result_are_both_read(suite):
    as_pair = verify(lambda q, k, v, **p: tuple(CORRECT(q, k, v, **p)), suite=suite, ids=["dense/baseline"])
    as_result = verify(lambda q, k, v, **p: Result(*CORRECT(q, k, v, **p)), suite=suite, ids=["dense/baseline"])
    assert as_pair.ok and as_result.ok


def test_a_wrong_shape_fails_with_the_shapes(suite):
    report = verify(lambda q, k, v, **p: dense_attention(q, k, v, **p).out[..., :-1], suite=suite, ids=["dense/baseline"])
    check = report.cases[0].checks[0]
    assert check.status == "fail" and "expected (1, 2, 16, 16)" in check.detail


def test_a_missing_gradient_fails(suite):
    def no_bias_grad(dout, q, k, v, **params):
        grads = dense_attention_vjp(dout, q, k, v, **params)
        del grads["bias"]
        return grads

    case = verify(dense_attention, suite=suite, ids=["dense/bias_full"], grad=True, vjp=no_bias_grad).cases[0]
    assert case.status == "fail" and case.first_stage == "grad.bias"
    assert "no gradient returned for `bias`" in case.format()


def test_grad_without_a_vjp_is_refused(suite):
    with pytest.raises(SpecError, match="a callable when grad=True"):
        verify(dense_attention, suite=suite, grad=True)


def test_an_exception_in_the_implementation_is_an_error_not_a_crash(suite):
    report = verify(raising, suite=suite, ids=["dense/baseline", "dense/causal"])
    assert [c.status for c in report.cases] == ["error", "error"] and not report.ok
    assert "RuntimeError: kernel not built for this shape" in report.cases[0].message
    assert "kernel not built" in report.format()


# --- the implementation under test is contained ---------------------------------


def exits(q, k, v, **params):
    sys.exit(0)


def hangs(q, k, v, **params):
    if q.shape[2] == 16:  # dense/baseline; the other cases answer
        time.sleep(600)
    return CORRECT(q, k, v, **params)


def test_sys_exit_is_an_error_of_its_case_not_the_end_of_the_run(suite, capsys):
    report = verify(exits, suite=suite, ids=["dense/baseline", "dense/causal"])
    assert [c.status for c in report.cases] == ["error", "error"] and not report.ok
    assert report.cases[0].message.startswith("SystemExit: 0")
    assert cli.main(["verify", "--impl", "tests.test_verify:exits", "--suite", str(suite.folder), "--mechanism", "dense"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"{len(suite.cases)} errors  (FAILED)"


def test_a_complex_result_fails_with_the_reason(suite):
    report = verify(lambda q, k, v, **p: dense_attention(q, k, v, **p).out + 0j, suite=suite, ids=["dense/baseline"])
    check = report.cases[0].checks[0]
    assert report.cases[0].status == "fail" and check.name == "out"
    assert check.detail == "dtype complex128 (complex, not real); expected a real float array"


def test_an_integer_result_fails_with_the_reason(suite):
    report = verify(lambda q, k, v, **p: np.zeros(q.shape, np.int64), suite=suite, ids=["dense/baseline"])
    assert "dtype int64 (not floating point)" in report.cases[0].checks[0].detail


def test_writing_into_an_input_is_reported(suite):
    def scribbles(q, k, v, **params):
        result = dense_attention(q, k, v, **params)
        q *= 2.0  # after computing: the result is right, the caller's q is not
        return result

    case = verify(scribbles, suite=suite, ids=["dense/baseline"]).cases[0]
    assert case.status == "fail" and case.first_stage == "input.q"
    assert [c.name for c in case.failed_checks] == ["input.q"]
    assert "wrote into this input" in case.format()


def test_parameters_cannot_be_edited_for_later_cases(suite):
    seen = []

    def edits_window(q, k, v, *, window=None, **params):
        seen.append(window)
        if isinstance(window, list):
            window.append(99)
        return dense_attention(q, k, v, window=window, **params)

    ids = ["dense/sliding_window"]
    first = verify(edits_window, suite=suite, ids=ids)
    second = verify(edits_window, suite=suite, ids=ids)
    assert first.ok and second.ok and seen[0] == seen[1] and isinstance(seen[0], tuple)
    assert isinstance(case_of(suite, ids[0]).params["window"], list)  # the loaded suite is as the manifest says


def test_a_hang_is_a_timeout_and_the_run_goes_on(suite):
    start = time.perf_counter()
    report = verify(hangs, suite=suite, ids=["dense/baseline", "dense/causal"], timeout=3)
    assert time.perf_counter() - start < 60
    assert [c.status for c in report.cases] == ["timeout", "pass"] and not report.ok
    assert "no result within 3 s" in report.cases[0].message
    assert report.summary() == "1 passed, 1 timed out" and "TIMEOUT" in report.format()
    assert json.loads(report.to_json())["counts"]["timeout"] == 1


def test_timeout_from_the_command_line(suite, capsys):
    args = ["verify", "--impl", "tests.test_verify:hangs", "--suite", str(suite.folder), "--case", "dense/baseline", "dense/causal"]
    assert cli.main([*args, "--timeout", "2"]) == 1
    assert "1 passed, 1 timed out  (FAILED)" in capsys.readouterr().out


def test_a_worker_that_dies_is_an_error(suite):
    def crashes(q, k, v, **params):
        os._exit(3)

    case = verify(crashes, suite=suite, ids=["dense/baseline"], timeout=30).cases[0]
    assert case.status == "error" and "died (exit code 3)" in case.message


def test_control_characters_from_an_implementation_are_escaped(suite):
    def shouts(q, k, v, **params):
        raise ValueError("\x1b[2J\x1b[32mall passed\rOK")

    text = verify(shouts, suite=suite, ids=["dense/baseline"]).format()
    assert "\x1b" not in text and "\r" not in text and "\\x1b[2J" in text


# --- failures: the first differing element and stage --------------------------


def test_first_difference_is_the_first_index_over_budget():
    want = np.array([[1.0, 2.0, -np.inf], [4.0, 5.0, 6.0]])
    got = np.array([[1.0, 2.0, -np.inf], [4.0, 5.5, 9.0]])
    assert first_difference(got, want, budget=0.05).index == (1, 1)  # |0.5| > 0.05 * 6
    assert first_difference(got, want, budget=0.6) is None
    got[0, 2] = 0.0  # a finite value where -inf is expected
    assert first_difference(got, want, budget=0.6).index == (0, 2)
    assert first_difference(np.full(2, np.nan), np.zeros(2), budget=1.0).index == (0,)


def test_a_failure_names_its_first_stage_element_and_flags(suite):
    case = verify(top_left, suite=suite, ids=["dense/causal_bottom_right_short_queries"]).cases[0]
    assert case.status == "fail" and case.first_stage == "out"
    out = case.checks[0]
    assert out.ratio > 1 and out.difference.index == (0, 0, 0, 0)
    assert out.difference.expected == case_of(suite, case.id).expected["out"][0, 0, 0, 0]
    text = verify(top_left, suite=suite, ids=[case.id]).format()
    assert "first differing stage: out" in text and "first difference at index (0, 0, 0, 0)" in text
    assert "CAUSAL_ALIGNMENT: Causal (or windowed) attention" in text


def test_intermediates_must_match_exactly_and_come_first(suite):
    base = case_of(suite, "dense/baseline")
    buckets = np.arange(6, dtype=np.int64).reshape(2, 3)
    case = dataclasses.replace(base, aux={"buckets": buckets}, tolerances={**base.tolerances, "aux.buckets": {"float64": 0.0}})

    def with_buckets(value):
        return lambda q, k, v, **p: Result(*CORRECT(q, k, v, **p), aux={"buckets": value})

    assert check_case(with_buckets(buckets), case).status == "pass"
    wrong = buckets.copy()
    wrong[1, 2] = 0
    report = check_case(with_buckets(wrong), case)
    assert report.status == "fail" and report.first_stage == "aux.buckets"
    assert report.checks[0].difference.index == (1, 2)
    assert check_case(CORRECT, case).checks[0].status == "not provided"


# --- xfail lists ---------------------------------------------------------------


def test_xfail_file_ids_with_their_reasons(tmp_path):
    path = tmp_path / "known.xfail"
    path.write_text("# header, ended by a blank line\n\ndense/causal   # needs work\n# aligned top-left\n  dense/baseline\n"
                    "dense/softcap\n# another reason\ndense/mask_layout\n")  # fmt: skip
    assert read_xfail(path) == {"dense/causal": "needs work", "dense/baseline": "aligned top-left",
                                "dense/softcap": "aligned top-left", "dense/mask_layout": "another reason"}  # fmt: skip


def test_an_xfail_entry_without_a_reason_is_refused(tmp_path):
    path = tmp_path / "known.xfail"
    path.write_text("# header\n\ndense/causal\n")
    with pytest.raises(ValueError, match="known.xfail:3: case dense/causal has no reason"):
        read_xfail(path)


def test_xfail_turns_failures_into_xfail_and_passes_into_xpass(suite):
    ids = ["dense/causal_bottom_right_short_queries", "dense/baseline"]
    report = verify(top_left, suite=suite, ids=ids, xfail={ids[0]: "aligned top-left", ids[1]: "stale entry"})
    assert {c.id: c.status for c in report.cases} == dict(zip(ids, ["xfail", "xpass"]))
    assert report.ok  # not strict: an xpass is reported, not a failure
    assert "xpassed" in report.summary() and "known bug: aligned top-left" in report.format()


def test_an_xfail_list_naming_a_case_not_in_the_suite_is_an_error(suite):
    with pytest.raises(SuiteError, match="not in the suite: dense/no_such_case"):
        verify(top_left, suite=suite, ids=["dense/baseline"], xfail={"dense/no_such_case": "typo"})


# --- report formats ------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_report(suite):
    """One pass, one fail (with an infinite error), one error, one xfail."""

    def impl(q, k, v, **params):
        if q.shape[2] == 16:  # dense/baseline
            raise ValueError("no")
        return WRONG["FULLY_MASKED_ROW"](q, k, v, **params)

    ids = ["dense/baseline", "dense/causal", "dense/fully_masked_everything", "dense/fully_masked_rows"]
    return verify(impl, suite=suite, ids=ids, xfail=["dense/fully_masked_rows"], name="mixed")


def test_json_report_is_strict_json_with_counts(mixed_report):
    document = json.loads(mixed_report.to_json())
    assert document["ok"] is False and document["impl"] == "mixed"
    assert document["counts"] == {"pass": 1, "partial": 0, "unsupported": 0, "xfail": 1, "xpass": 0, "fail": 1, "error": 1,
                                  "timeout": 0}  # fmt: skip
    by_id = {c["id"]: c for c in document["cases"]}
    lse = next(c for c in by_id["dense/fully_masked_everything"]["checks"] if c["name"] == "lse")
    assert lse["error"] == "inf" and lse["first_difference"]["expected"] == "-inf"
    assert by_id["dense/baseline"]["status"] == "error" and "ValueError: no" in by_id["dense/baseline"]["message"]


def test_junit_report_parses_with_the_right_counts(mixed_report):
    root = ET.fromstring(mixed_report.to_junit())
    testsuite = root.find("testsuite")
    assert (testsuite.get("tests"), testsuite.get("failures"), testsuite.get("errors"), testsuite.get("skipped")) == ("4", "1", "1", "1")
    cases = {c.get("name"): c for c in testsuite.iter("testcase")}
    assert len(cases) == 4 and list(cases["dense/causal"]) == []
    failure = cases["dense/fully_masked_everything"].find("failure")
    assert "first differing stage: out" in failure.text and "FULLY_MASKED_ROW" in failure.text
    assert cases["dense/baseline"].find("error") is not None
    assert cases["dense/fully_masked_rows"].find("skipped") is not None


def test_text_report_has_a_table_and_details(mixed_report):
    text = mixed_report.format()
    lines = text.splitlines()
    assert lines[0] == f"official suite (refattn {refattn.__version__})"
    assert lines[1].startswith("refattn verify: mixed  dtype=float64  layout=bhnd")
    row = next(line for line in lines if line.startswith("dense/fully_masked_everything "))
    assert row.split()[1:3] == ["FAIL", "inf"]
    assert "Details" in text and lines[-1] == "1 passed, 1 xfailed, 1 failed, 1 error  (FAILED)"


# --- the command line ------------------------------------------------------------


def test_cli_exit_0_and_reports_written(suite, tmp_path, capsys):
    args = ["verify", *REFERENCE, "--grad", "--suite", str(suite.folder), "--mechanism", "dense"]
    status = cli.main([*args, "--json", str(tmp_path / "r.json"), "--junit", str(tmp_path / "r.xml")])
    assert status == 0
    assert f"{len(suite.cases)} passed  (OK)" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    assert ET.parse(tmp_path / "r.xml").getroot().find("testsuite").get("failures") == "0"


def test_cli_exit_1_on_a_failure_and_0_once_it_is_xfailed(suite, tmp_path, capsys):
    args = ["verify", "--impl", "tests.test_verify:top_left", "--suite", str(suite.folder), "--case", "dense/causal_bottom_right*"]
    assert cli.main(args) == 1
    assert "CAUSAL_ALIGNMENT" in capsys.readouterr().out
    xfail = tmp_path / "xfail.txt"
    xfail.write_text("# aligned top-left\ndense/causal_bottom_right_short_queries\ndense/causal_bottom_right_long_queries\n")
    assert cli.main([*args, "--xfail", str(xfail)]) == 0


def test_cli_layout_dtype_and_case_patterns(suite, capsys):
    args = ["verify", *REFERENCE, "--suite", str(suite.folder), "--case", "dense/gqa*", "--dtype", "bfloat16"]  # one mechanism
    assert cli.main(args) == 0
    assert "dtype=bfloat16" in capsys.readouterr().out
    assert cli.main([*args, "--layout", "bnhd"]) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--impl", "no_such_module:f"], "cannot load --impl no_such_module:f"),
        (["--impl", "refattn.dense.reference"], "expected 'package.module:function'"),
        (["--impl", "refattn.dense.reference:nothing"], "has no attribute 'nothing'"),
        (["--impl", "refattn.dense.reference:dense_attention", "--grad"], "--grad needs --vjp"),
        (["--impl", "tests.test_verify:raising", "--suite", "/no/such/folder"], "not a folder"),
        (["--impl", "tests.test_verify:raising", "--mechanism", "nope"], "no case with mechanism 'nope'"),
        (["--impl", "tests.test_verify:raising", "--case", "dense/nope"], "no case id matches 'dense/nope'"),
    ],
)
def test_cli_exit_2_on_usage_and_suite_errors(args, message, capsys):
    assert cli.main(["verify", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_exit_2_from_argparse(capsys):
    assert cli.main(["verify", "--impl", "m:f", "--dtype", "float8"]) == 2
    assert cli.main([]) == 2
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_cli_without_a_suite_says_pass_suite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REFATTN_SUITE", raising=False)
    monkeypatch.setattr("refattn.conformance.verify.PACKAGED_SUITE", tmp_path / "installed")
    monkeypatch.setattr("refattn.conformance.verify.SOURCE_SUITE", tmp_path / "checkout")
    assert cli.main(["verify", "--mechanism", "dense", "--impl", "tests.test_verify:raising"]) == 2
    assert "--suite DIR" in capsys.readouterr().err


def test_cli_export_check_reports_drift(monkeypatch, capsys):
    drift = []
    monkeypatch.setattr(export, "check", lambda folder, mechanisms=None, large=False, progress=False: drift)
    assert cli.main(["export", "--check", "--out", "somewhere"]) == 0
    drift.append("dense/causal: file differs")
    assert cli.main(["export", "--check", "--out", "somewhere"]) == 1
    assert "dense/causal: file differs" in capsys.readouterr().out


def test_cli_mechanisms_shows_the_contract(capsys):
    assert cli.main(["mechanisms"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["mechanism", "backends", "vjp", "cases", "spec"]
    dense = next(line for line in lines if line.startswith("dense "))
    cupy = ["cupy"] if "cupy" in refattn.get_mechanism("dense").available_backends() else ["cupy", "(no", "device)"]
    cases = str(len(refattn.get_mechanism("dense").cases()))
    assert dense.split() == ["dense", "reference,", "numba,", *cupy, "yes", cases, "spec/dense.md"]
    assert len(lines) == 1 + len(refattn.mechanisms())


def test_cli_mechanisms_names_and_backends_for_scripts(capsys):
    assert cli.main(["mechanisms", "--names"]) == 0
    assert capsys.readouterr().out.split("\n")[:-1] == refattn.mechanisms()
    assert cli.main(["mechanisms", "--backends", "dense"]) == 0
    assert capsys.readouterr().out == "reference\nnumba\n"
    assert cli.main(["mechanisms", "--backends", "nope"]) == 2
    assert "argument `mechanism`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "numba"], "--backend needs --mechanism with one mechanism name"),
        (["--backend", "numba", "--mechanism", "dense", "alibi"], "--backend needs --mechanism with one"),
        (["--backend", "cuda", "--mechanism", "dense"], "argument `backend`: expected one of ['reference', 'numba', 'cupy']"),
        (["--backend", "numba", "--mechanism", "dense", "--vjp", "m:f"], "--vjp goes with --impl"),
    ],
)
def test_cli_backend_usage_errors(args, message, capsys):
    assert cli.main(["verify", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_load_callable_reads_module_colon_attribute():
    assert load_callable("refattn.dense.reference:dense_attention") is dense_attention
    with pytest.raises(ValueError, match="not callable"):
        load_callable("refattn:__version__")


# --- adapters --------------------------------------------------------------------


def test_torch_adapter_dtypes_and_gradients(suite):
    torch = pytest.importorskip("torch")
    from refattn.conformance.adapters import from_torch

    seen = {}

    def attend(q, k, v, *, bias, scale=None, **unused):
        seen.update(q=q.dtype, bias=bias.dtype, bias_grad=bias.requires_grad)
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
        logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias
        return torch.softmax(logits, -1) @ v, torch.logsumexp(logits, -1)

    impl = from_torch(attend)
    assert verify(impl, suite=suite, ids=["dense/bias_*"], grad=True).ok
    assert seen == {"q": torch.float64, "bias": torch.float64, "bias_grad": True}
    report = verify(impl, suite=suite, ids=["dense/bias_full"], dtype="bfloat16", grad=True)
    assert seen["q"] == torch.bfloat16 and report.ok, report.format()
    assert report.impl == "tests.test_verify:from_torch(test_torch_adapter_dtypes_and_gradients.<locals>.attend)"


def test_shared_qk_cases_pass_qk_and_v_positionally_through_the_torch_adapter():
    """LSH cases have inputs ``qk`` and ``v``: verify calls ``impl(qk, v, ...)`` and reads ``grad.qk``."""
    torch = pytest.importorskip("torch")
    from refattn.conformance.adapters import from_torch
    from refattn.lsh import lsh_attention

    calls = []

    def attend(qk, v, **params):  # the reference itself, behind torch tensors (forward only)
        calls.append((qk.shape, v.shape))
        arrays = {n: x.numpy() if isinstance(x, torch.Tensor) else x for n, x in params.items()}
        result = lsh_attention(qk.numpy(), v.numpy(), **arrays)
        return torch.from_numpy(result.out), torch.from_numpy(result.lse)

    whole = load_suite(default_suite_folder())
    report = verify(from_torch(attend, inputs=("qk", "v")), suite=whole, mechanism="lsh")
    assert report.ok and calls and len(report.cases) == len(whole.select(mechanisms="lsh").cases), report.format()
    with pytest.raises(TypeError, match="expected 2 positional arrays"):
        from_torch(attend, inputs=("qk", "v"))(np.zeros(1), np.zeros(1), np.zeros(1))


def test_wrong_decisions_are_told_apart_from_wrong_attention():
    """When an implementation's buckets differ, its output is also checked against what its own buckets imply."""
    from refattn.lsh import lsh_attention

    def other_hash(qk, v, *, rotations, **params):  # other buckets, attention right for them
        return lsh_attention(qk, v, rotations=-rotations, **params)

    def other_hash_and_off(qk, v, **params):  # and attention that is wrong for them too
        result = other_hash(qk, v, **params)
        return Result(out=result.out * 1.01, lse=result.lse, aux=result.aux)

    whole = load_suite(default_suite_folder())
    for impl, verdict in ((other_hash, "pass"), (other_hash_and_off, "fail")):
        case = verify(impl, suite=whole, ids=["lsh/hf_two_rounds"]).cases[0]
        assert case.status == "fail" and case.first_stage == "aux.buckets"
        assert [c.status for c in case.checks if c.name == IMPLIED_OUT] == [verdict], case.format()
    # Buckets that match: no implied check at all.
    assert all(c.name != IMPLIED_OUT for c in verify(lsh_attention, suite=whole, ids=["lsh/hf_two_rounds"]).cases[0].checks)


def test_adapters_say_what_to_install(monkeypatch):
    from refattn.conformance.adapters import from_jax, from_torch

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "jax", None)
    q = np.zeros((1, 1, 1, 1))
    with pytest.raises(ImportError, match="needs PyTorch: pip install torch"):
        from_torch(lambda q, k, v: q)(q, q, q)
    with pytest.raises(ImportError, match="needs JAX: pip install jax"):
        from_jax(lambda q, k, v: q)(q, q, q)


def refuse(options: dict, **defaults) -> None:
    """Raise NotImplementedError for a parameter in ``options`` that is not at its default (as an adapter does)."""
    for name, value in options.items():
        if name not in defaults or value != defaults[name]:
            raise NotImplementedError(f"{name}={value!r}")


DENSE_DEFAULTS = dict(causal=False, causal_alignment="bottom_right", window=None, softcap=0.0, dropout_keep=None, dropout_p=0.0)


def jax_attention(q, k, v, *, mask=None, bias=None, scale=None, **options):
    """Dense attention in JAX on (B, N, H, D), returning (out, lse)."""
    import jax
    import jax.numpy as jnp

    refuse(options, **DENSE_DEFAULTS)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = scale * jnp.einsum("bqhd,bkhd->bhqk", q, k) + (0.0 if bias is None else bias)
    logits = logits if mask is None else jnp.where(mask, logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(logits - lse[..., None]), v)
    return out, jnp.swapaxes(lse, 1, 2)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_jax_adapter_with_gradients_in_the_bnhd_layout(suite, dtype):
    jax = pytest.importorskip("jax")
    from refattn.conformance.adapters import from_jax

    ids = ["dense/baseline", "dense/gqa_8_to_2", "dense/bias_broadcast_2d", "dense/mask_layout", "dense/scale_override"]
    report = verify(from_jax(jax.jit(jax_attention, static_argnames=tuple(DENSE_DEFAULTS))), suite=suite, ids=ids, layout="bnhd", dtype=dtype, grad=True)
    assert report.ok, report.format()


def test_jax_dot_product_attention_forward(suite):
    jax = pytest.importorskip("jax")
    from refattn.conformance.adapters import from_jax

    def attend(q, k, v, *, mask=None, bias=None, scale=None, causal=False, **options):
        refuse(options, **{**DENSE_DEFAULTS, "causal_alignment": options.get("causal_alignment")})
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal)

    ids = ["dense/baseline", "dense/gqa_8_to_2", "dense/mqa_8_to_1", "dense/mask_layout", "dense/bias_full", "dense/causal"]
    report = verify(from_jax(attend), suite=suite, ids=ids, layout="bnhd", dtype="float32")
    assert report.ok and {c.status for c in report.cases} == {"partial"}, report.format()  # no lse returned


# --- the pytest plugin -----------------------------------------------------------


def plugin_args(suite, *args):
    installed = any(ep.value == "refattn.pytest_plugin" for ep in importlib.metadata.entry_points(group="pytest11"))
    return [*([] if installed else ["-p", "refattn.pytest_plugin"]), f"--refattn-suite={suite.folder.resolve()}",
            "--refattn-mechanism=dense", *args]  # fmt: skip


def test_plugin_makes_one_passing_test_per_case(pytester, suite):
    result = pytester.runpytest(
        *plugin_args(
            suite,
            "--refattn-impl=refattn.dense.reference:dense_attention",
            "--refattn-vjp=refattn.dense.reference:dense_attention_vjp",
            "--refattn-dtype=float32",
        )
    )
    result.assert_outcomes(passed=len(suite.cases))


def test_plugin_failure_shows_the_case_report_and_honours_xfail(pytester, suite):
    xfail = pytester.makefile(".xfail", known="dense/decode_single_query  # aligned top-left\n")
    result = pytester.runpytest(
        *plugin_args(suite, "--refattn-impl=tests.test_verify:top_left", f"--refattn-xfail={xfail}", "-k", "CAUSAL_ALIGNMENT")
    )
    statuses = [c.status for c in verify(top_left, suite=suite.select(flags="CAUSAL_ALIGNMENT")).cases]
    assert statuses.count("fail") >= 3
    result.assert_outcomes(failed=statuses.count("fail") - 1, passed=statuses.count("pass"), xfailed=1)
    result.stdout.fnmatch_lines(["*dense/gqa_causal_cross [[]fail[]]*", "*first differing stage: out*", "*first difference at index*"])


def test_a_selection_of_several_mechanisms_must_be_named(suite, pytester, capsys):
    whole = load_suite(suite.folder, mechanisms=["dense", "alibi"])
    assert len({case.mechanism for case in whole.cases}) > 1
    with pytest.raises(SuiteError, match="mechanisms .*name it with mechanism="):
        verify(dense_attention, suite=whole)
    assert cli.main(["verify", *REFERENCE, "--suite", str(suite.folder), "--case", "dense/*", "alibi/*"]) == 2
    assert "--mechanism" in capsys.readouterr().err
    result = pytester.runpytest(*[a for a in plugin_args(suite) if a != "--refattn-mechanism=dense"],
                                "--refattn-impl=refattn.dense.reference:dense_attention")  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    with pytest.raises(SpecError, match="for case alibi/"):  # dense's function cannot take alibi's arguments
        verify(dense_attention, suite=whole, mechanism=["dense", "alibi"], ids=["dense/baseline", "alibi/*"])
    two = verify(lambda q, k, v, **p: dense_attention(q, k, v), suite=whole, mechanism=["dense", "alibi"],
                 ids=["dense/baseline", "alibi/*"])  # fmt: skip
    assert {case.mechanism for case in two.cases} == {"dense", "alibi"}


def test_plugin_usage_error_for_a_bad_impl(pytester, suite):
    result = pytester.runpytest(*plugin_args(suite, "--refattn-impl=no_such_module:f"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*refattn: No module named 'no_such_module'*"])


def test_plugin_verifies_a_bundled_backend(pytester, suite):
    result = pytester.runpytest(*plugin_args(suite, "--refattn-backend=numba"))
    result.assert_outcomes(passed=len(suite.cases))
    result.stdout.fnmatch_lines(["refattn: official suite (refattn *)*"])


def test_plugin_does_nothing_without_its_option(pytester, suite):
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest(*plugin_args(suite))
    result.assert_outcomes(passed=1)
