"""What users outside this repository meet: statuses that say what happened, gradients by linearity,
explicit parameters, implementations given by file path, and one-line errors for bad input."""

import json

import numpy as np
import pytest

from refattn import cli
from refattn.conformance import export, manifest
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import check_case, load_callable, verify
from refattn.core.errors import SpecError
from refattn.core.results import Result
from refattn.dense.reference import dense_attention, dense_attention_vjp

IDS = ["dense/baseline", "dense/single_key", "dense/softcap_extreme", "dense/causal_top_left_short_queries"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A suite of the dense and LSH cases, exported for these tests (never the committed one)."""
    out = tmp_path_factory.mktemp("suite")
    export.export(out, mechanisms=["dense", "lsh"], progress=False)
    return out


@pytest.fixture(scope="module")
def suite(folder):
    return load_suite(folder, "dense")


def no_softcap(q, k, v, *, softcap=0.0, **params):
    """The reference, refusing a soft-cap as a library without one does."""
    if softcap:
        raise NotImplementedError("no logit soft-cap")
    return dense_attention(q, k, v, **params)


def out_only(q, k, v, **params):
    return dense_attention(q, k, v, **params).out


def out_only_vjp(dout, q, k, v, *, dlse=None, **params):
    """The gradients of ``out`` alone: an implementation that has no lse ignores ``dlse``."""
    return dense_attention_vjp(dout, q, k, v, **params)


out_only.vjp = out_only_vjp


def test_not_implemented_is_unsupported_with_its_message_and_fails_only_when_strict(suite):
    report = verify(no_softcap, suite=suite, ids=IDS)
    statuses = {c.id: c.status for c in report.cases}
    assert statuses["dense/softcap_extreme"] == "unsupported" and report.ok
    assert {s for i, s in statuses.items() if i != "dense/softcap_extreme"} == {"pass"}
    assert "Unsupported" in report.format() and "dense/softcap_extreme: no logit soft-cap" in report.format()
    assert not verify(no_softcap, suite=suite, ids=IDS, strict=True).ok


def test_outputs_not_returned_make_a_partial_pass_that_names_them(suite):
    report = verify(out_only, suite=suite, ids=["dense/baseline"])
    case = report.cases[0]
    assert case.status == "partial" and case.missing == ("lse",) and report.ok
    assert "not returned: lse" in report.format()
    assert not verify(out_only, suite=suite, ids=["dense/baseline"], require_aux=True).ok


def test_without_an_lse_the_gradients_are_checked_for_dout_alone(suite):
    report = verify(out_only, suite=suite, ids=IDS[:2], grad=True)
    for case in report.cases:
        assert case.status == "partial" and case.gradient_cotangents == ("dout",), case.format()
        assert {c.name for c in case.checks if c.name.startswith("grad")} == {"grad_dout.q", "grad_dout.k", "grad_dout.v"}
    assert "gradients checked for dout alone" in report.cases[0].format()


def test_with_an_lse_the_gradients_are_checked_against_the_sum_of_the_parts(suite):
    report = verify(dense_attention, vjp=dense_attention_vjp, suite=suite, ids=IDS[:2], grad=True)
    assert report.ok and all(c.gradient_cotangents == ("dout", "dlse") for c in report.cases), report.format()
    single_key = report.cases[1]
    assert {c.name for c in single_key.checks if c.name.startswith("grad")} == {"grad.q", "grad.k", "grad.v"}
    # Ignoring dlse is caught there: with one key dout alone moves neither q nor k (LSE_GRADIENT).
    ignoring = verify(dense_attention, vjp=out_only_vjp, suite=suite, ids=["dense/single_key"], grad=True)
    assert ignoring.cases[0].status == "fail" and ignoring.cases[0].first_stage == "grad.q"


def test_each_case_stores_the_two_gradient_parts_which_add_up_to_the_vjp(suite):
    case = next(c for c in suite.cases if c.id == "dense/single_key")
    arguments = {**case.inputs, **case.array_params, **case.params}
    both = dense_attention_vjp(case.cotangents["dout"], **arguments, dlse=case.cotangents["dlse"])
    for name in ("q", "k", "v"):
        parts = case.expected[f"grad_dout.{name}"] + case.expected[f"grad_dlse.{name}"]
        np.testing.assert_allclose(parts, both[name], rtol=1e-12, atol=1e-14)
        assert set(case.tolerances[f"grad_dout.{name}"]) == set(case.tolerances[f"grad_dlse.{name}"]) == set(case.precisions)
    assert not case.expected["grad_dout.q"].any()  # one key: dout alone moves neither q nor k


def test_params_spell_out_defaults_and_preset_values(folder):
    document = json.loads((folder / manifest.MANIFEST_NAME).read_text())
    assert document["format_version"] == 2
    cases = {c["id"]: c for c in document["cases"]}
    baseline = cases["dense/baseline"]["params"]
    assert baseline == {"bias": None, "causal": False, "causal_alignment": "bottom_right", "dropout_keep": None,
                        "dropout_p": 0.0, "mask": None, "scale": None, "softcap": 0.0, "window": None}  # fmt: skip
    for case in (c for c in cases.values() if c["mechanism"] == "lsh" and c["preset"] is not None):
        assert case["params"]["preset"] in (None, case["preset"])  # the label is the entry's own "preset"
        assert "FROM_PRESET" not in json.dumps(case["params"])
        assert {"num_chunks_before", "key_norm", "self_mask_value", "dup_correction"} <= set(case["params"])


def test_an_adapter_file_outside_any_package_is_verified_by_path(tmp_path, folder, capsys, monkeypatch):
    adapter = tmp_path / "elsewhere" / "my_attention.py"
    adapter.parent.mkdir()
    adapter.write_text(
        "from refattn.dense.reference import dense_attention\n\n"
        "def attend(q, k, v, **params):\n    return dense_attention(q, k, v, **params)\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_callable("elsewhere/my_attention.py:attend").__name__ == "attend"
    args = ["verify", "--mechanism", "dense", "--impl", f"{adapter}:attend", "--suite", str(folder), "--case", "dense/baseline"]
    assert cli.main(args) == 0, capsys.readouterr()
    assert "1 passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "impl, xfail, cases, message",
    [
        ("no/such/file.py:attend", None, "dense/baseline", "cannot load --impl no/such/file.py:attend"),
        ("refattn.no_such_module:attend", None, "dense/baseline", "No module named 'refattn.no_such_module'"),
        ("tests.test_verify_statuses:two_arguments", None, "dense/baseline", "argument `impl`: expected a callable taking (q, k, v"),
        ("refattn.dense.reference:dense_attention", "# why\ndense/nope\n", "dense/baseline", "not in the suite: dense/nope"),
        ("refattn.dense.reference:dense_attention", None, "dense/nothing*", "no case id matches 'dense/nothing*'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(impl, xfail, cases, message, folder, tmp_path, capsys):
    args = ["verify", "--mechanism", "dense", "--impl", impl, "--suite", str(folder), "--case", cases]
    if xfail:
        (tmp_path / "known.xfail").write_text(xfail)
        args += ["--xfail", str(tmp_path / "known.xfail")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def two_arguments(q, k):
    return q


def test_the_signature_is_checked_before_any_case_runs(suite):
    with pytest.raises(SpecError, match="for case dense/baseline; add \\*\\*kwargs"):
        verify(lambda q, k, v, *, scale=None: q, suite=suite, ids=["dense/baseline"])


def test_show_and_suite_commands(folder, capsys):
    assert cli.main(["show", "dense/single_key", "--suite", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "LSE_GRADIENT:" in out and "causal_alignment = \"bottom_right\"" in out
    assert "expected.grad_dlse.q" in out and "grad_dout.q" in out
    assert cli.main(["suite", "--suite", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "format_version: 2" in out and "custom suite" in out and "manifest_sha256: " in out


def test_float_intermediates_are_compared_within_their_budget(suite):
    case = next(c for c in suite.cases if c.id == "dense/baseline")
    slot = np.linspace(-1.0, 1.0, 4)
    with_float_aux = type(case)(**{**case.__dict__, "aux": {"slot_lse": slot},
                                   "tolerances": {**case.tolerances, "aux.slot_lse": {"float64": 1e-10}}})  # fmt: skip

    def returning(value):
        def impl(q, k, v, **params):
            result = dense_attention(q, k, v, **params)
            return Result(out=result.out, lse=result.lse, aux={"slot_lse": value})

        return impl

    assert check_case(returning(slot + 1e-12), with_float_aux).status == "pass"
    failed = check_case(returning(slot + 1e-6), with_float_aux)
    assert failed.status == "fail" and failed.first_stage == "aux.slot_lse"
