"""Hostile suites: each tampering of a copy of the committed dense cases, with every
checksum recomputed so that only the loader's own rules can catch it, is refused
with exit status 2 and one line, and an implementation returning zeros never passes."""

import hashlib
import json

import numpy as np
import pytest
import safetensors.numpy

from refattn import cli
from refattn.conformance import manifest as manifest_module
from refattn.conformance.suite import SuiteError, load_suite
from refattn.conformance.verify import verify
from tests.test_conformance_loading import copy_suite

VICTIM = "dense/padding_mask_keys"  # has a mask, gradients and a log-sum-exp


def zeros(q, k, v, **params):
    """Returns zeros of the output's shape: wrong for every case that has a nonzero output."""
    return np.zeros(q.shape[:3] + v.shape[3:])


def zeros_vjp(dout, q, k, v, **params):
    return {"q": np.zeros_like(q), "k": np.zeros_like(k), "v": np.zeros_like(v), **(
        {"bias": np.zeros_like(params["bias"])} if params.get("bias") is not None else {})}


# --- tampering, re-signed ------------------------------------------------------------


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _entry(manifest, case_id=VICTIM):
    return next(case for case in manifest["cases"] if case["id"] == case_id)


def _save(folder, manifest):
    (folder / "manifest.json").write_text(manifest_module.dumps(manifest))


def _resign(folder, edit, case_id=VICTIM):
    """Apply ``edit(tensors, entry)`` to one case's tensors and manifest entry; recompute its sum and size."""
    manifest = _manifest(folder)
    entry = _entry(manifest, case_id)
    path = folder / entry["file"]
    tensors = dict(safetensors.numpy.load(path.read_bytes()))
    edit(tensors, entry)
    data = safetensors.numpy.save(tensors)
    path.write_bytes(data)
    entry.update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), tensors=sorted(tensors),
                 shapes={name: list(x.shape) for name, x in tensors.items()})  # fmt: skip
    entry["tolerances"] = {o: row for o, row in entry["tolerances"].items() if o in manifest_module.output_names(tensors)}
    _save(folder, manifest)


def every_budget(value):
    def edit(folder):
        manifest = _manifest(folder)
        for case in manifest["cases"]:
            case["tolerances"] = {output: {p: value for p in row} for output, row in case["tolerances"].items()}
        _save(folder, manifest)
    return edit


def text_budget(literal):
    def edit(folder):
        text = (folder / "manifest.json").read_text()
        (folder / "manifest.json").write_text(text.replace('"float64": 1e-10', f'"float64": {literal}'))
    return edit


def drop(*names):
    def edit(folder):
        for case in _manifest(folder)["cases"]:
            _resign(folder, lambda t, e: [t.pop(n, None) for n in names], case["id"])
    return edit


def set_value(name, value, index=(0, 0, 0, 0)):
    def edit(folder):
        def change(tensors, entry):
            tensors[name] = tensors[name].copy()
            tensors[name][index] = value
        _resign(folder, change)
    return edit


def mask_as_uint8(folder):
    _resign(folder, lambda t, e: t.update({"param.mask": t["param.mask"].astype(np.uint8)}))


def float32_budget_missing(folder):
    manifest = _manifest(folder)
    del _entry(manifest)["tolerances"]["out"]["float32"]
    _save(folder, manifest)


def empty_suite(folder):
    manifest = _manifest(folder)
    manifest["cases"], manifest["flags"] = [], {}
    _save(folder, manifest)


def deeply_nested(folder):
    text = (folder / "manifest.json").read_text()
    nested = "[" * 100_000 + "]" * 100_000
    (folder / "manifest.json").write_text(text.replace('"causal": true', f'"causal": {nested}', 1))


def huge_declared_size(folder):
    manifest = _manifest(folder)
    _entry(manifest)["size_bytes"] = 3 * 2**30
    _save(folder, manifest)


def bad_parameter(folder):
    manifest = _manifest(folder)
    _entry(manifest)["params"]["causal_alignment"] = "sideways"
    _save(folder, manifest)


def gradient_removed(folder):
    _resign(folder, lambda t, e: t.pop("expected.grad_dout.k"))


def unknown_mechanism(folder):
    manifest = _manifest(folder)
    for case in manifest["cases"]:
        case["mechanism"], case["id"] = "made_up", case["id"].replace("dense/", "made_up/")
    _save(folder, manifest)


HOSTILE = {
    "budgets 1e300": (every_budget(1e300), "above"),
    "budget 1e999": (text_budget("1e999"), "beyond the float64 range"),
    "budget 10**400": (text_budget(str(10**400)), "does not fit in 64 bits"),
    "expected tensors removed": (drop("expected.out", "expected.lse", *(f"expected.grad_{c}.{x}" for c in ("dout", "dlse")
                                                                        for x in ("q", "k", "v", "bias"))), "no expected.out"),  # fmt: skip
    "lse removed": (drop("expected.lse", "cotangent.dlse", *(f"expected.grad_dlse.{x}" for x in ("q", "k", "v", "bias"))),
                    "has no expected.lse; dense defines it"),  # fmt: skip
    "empty suite": (empty_suite, "lists no cases"),
    "NaN expected": (set_value("expected.out", np.nan), "nan at index (0, 0, 0, 0)"),
    "inf input": (set_value("input.q", np.inf), "input values must be finite"),
    "-inf outside lse": (set_value("expected.grad_dout.q", -np.inf), "-inf only in a log-sum-exp"),
    "uint8 mask": (mask_as_uint8, "masks are stored as bool"),
    "float32 budget missing": (float32_budget_missing, "output out has no budget for float32"),
    "deep JSON": (deeply_nested, "nested deeper than 32 levels"),
    "3 GiB declared": (huge_declared_size, "1073741824"),
    "a parameter the mechanism refuses": (bad_parameter, "not valid dense arguments: argument `causal_alignment`"),
    "a gradient removed": (gradient_removed, "has input.k but no expected.grad_dout.k"),
    "unknown mechanism": (unknown_mechanism, "not one this refattn knows"),
}


@pytest.fixture
def hostile(tmp_path, request):
    tamper, _ = HOSTILE[request.param]
    folder = copy_suite(tmp_path / "suite")
    tamper(folder)
    return folder


@pytest.mark.parametrize("hostile", sorted(HOSTILE), indirect=True)
def test_a_hostile_suite_is_refused_in_one_line_with_exit_2(hostile, request, capsys):
    fragment = HOSTILE[request.node.callspec.params["hostile"]][1]
    with pytest.raises(SuiteError) as info:
        load_suite(hostile)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    args = ["verify", "--impl", "tests.test_hostile_suite:zeros", "--vjp", "tests.test_hostile_suite:zeros_vjp"]
    mechanism = "made_up" if "made_up" in (hostile / "manifest.json").read_text() else "dense"
    for extra in ([], ["--grad"], ["--dtype", "float32"]):
        assert cli.main([*args, *extra, "--suite", str(hostile), "--mechanism", mechanism]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and fragment in captured.err


def test_the_zero_implementation_fails_the_untampered_copy(tmp_path):
    report = verify(zeros, suite=copy_suite(tmp_path / "suite"), grad=True, vjp=zeros_vjp)
    assert not report.ok and report.counts()["fail"] >= len(report.cases) - 2


def test_budgets_at_the_policy_ceiling_still_fail_the_zero_implementation(tmp_path):
    """The largest budgets the loader accepts are not large enough for zeros to pass in float64 or float32."""
    from refattn.conformance import tolerance

    folder = copy_suite(tmp_path / "suite")
    manifest = _manifest(folder)
    for case in manifest["cases"]:
        lse = safetensors.numpy.load((folder / case["file"]).read_bytes()).get("expected.lse")
        scale = tolerance.logit_scale(lse) if lse is not None else 0.0
        case["tolerances"] = {o: {p: tolerance.ceiling(o, p, scale) for p in row} for o, row in case["tolerances"].items()}
    _save(folder, manifest)
    for dtype in ("float64", "float32"):
        report = verify(zeros, suite=folder, dtype=dtype, grad=True, vjp=zeros_vjp)
        nonzero = [c for c in load_suite(folder).cases if np.any(c.expected["out"])]
        passed = {c.id for c in report.cases if c.status == "pass"}
        assert not passed & {c.id for c in nonzero}, dtype


def test_flag_descriptions_with_control_characters_are_printed_escaped(tmp_path, capsys):
    folder = copy_suite(tmp_path / "suite")
    manifest = _manifest(folder)
    manifest["flags"]["MASK_LAYOUT"] = "\x1b[2J\x1b[1;32mall 40 passed (OK)\x07\r"
    _save(folder, manifest)
    args = ["verify", "--impl", "tests.test_hostile_suite:zeros", "--suite", str(folder), "--case", "dense/mask_layout"]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "MASK_LAYOUT: \\x1b[2J\\x1b[1;32mall 40 passed (OK)\\x07\\x0d" in out
