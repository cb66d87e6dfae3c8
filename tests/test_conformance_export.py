"""Conformance export: determinism, drift checks, the tolerance policy, and the
design of the dense cases (every flag's mistake really fails its cases).
"""

from __future__ import annotations

import hashlib
import math
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from refattn import dense_attention, dense_attention_vjp
from refattn.conformance import export as export_module
from refattn.conformance import manifest as manifest_module
from refattn.conformance import tolerance
from refattn.conformance.case import Case
from refattn.conformance.export import check, export
from refattn.conformance.flags import catalogue
from refattn.conformance.suite import load_suite
from refattn.conformance.tolerance import normwise_error
from refattn.core import registry
from refattn.core.shapes import sum_to_shape
from refattn.dense import cases as dense_cases

COMMITTED = Path(__file__).resolve().parents[1] / "conformance"
DENSE = ["dense"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The dense cases, freshly exported (the export machinery is the same for every mechanism)."""
    folder = tmp_path_factory.mktemp("suite")
    export(folder, mechanisms=DENSE)
    return folder


@pytest.fixture(scope="module")
def suite(exported):
    return load_suite(exported)


def _files(folder: Path) -> dict[str, bytes]:
    paths = sorted(path for path in folder.rglob("*") if path.is_file())
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in paths}


def _copy(source: Path, folder: Path) -> Path:
    for name, data in _files(source).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def _rewrite_case(folder: Path, case_id: str, change) -> None:
    """Apply ``change(tensors)`` to a case file and re-sign it in the manifest (a consistent but different suite)."""
    manifest = manifest_module.loads((folder / "manifest.json").read_bytes())
    entry = next(case for case in manifest["cases"] if case["id"] == case_id)
    tensors = dict(safetensors.numpy.load((folder / entry["file"]).read_bytes()))
    change(tensors)
    data = safetensors.numpy.save(tensors)
    (folder / entry["file"]).write_bytes(data)
    entry["sha256"], entry["size_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / "manifest.json").write_text(manifest_module.dumps(manifest))


# --- determinism and drift ----------------------------------------------------


def test_export_twice_gives_identical_bytes(exported, tmp_path):
    export(tmp_path, mechanisms=DENSE)
    assert _files(tmp_path) == _files(exported)


def test_export_returns_the_manifest_it_writes(tmp_path):
    manifest = export(tmp_path, mechanisms=DENSE)
    assert (tmp_path / "manifest.json").read_text() == manifest_module.dumps(manifest)
    assert manifest["format_version"] == 2
    assert sorted(manifest["flags"]) == sorted({flag for case in manifest["cases"] for flag in case["flags"]})


def test_committed_suite_is_current():
    assert check(COMMITTED) == []


def test_check_is_empty_on_a_fresh_export(exported):
    assert check(exported, mechanisms=DENSE) == []


def test_check_reports_an_altered_file(exported, tmp_path):
    folder = _copy(exported, tmp_path / "suite")
    path = folder / "dense" / "causal.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    drift = check(folder, mechanisms=DENSE)
    assert len(drift) == 1 and "dense/causal" in drift[0] and "SHA-256" in drift[0]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda t: t.__setitem__("expected.out", t["expected.out"] * 1.001), "expected.out differs"),
        (lambda t: t.__setitem__("input.q", t["input.q"] + 1e-9), "input.q differs"),
        (lambda t: t.__setitem__("aux.extra", np.zeros(2, np.int64)), "tensors"),
    ],
    ids=["expected", "input", "tensor_set"],
)
def test_check_reports_a_consistent_but_outdated_case(exported, tmp_path, change, expected):
    folder = _copy(exported, tmp_path / "suite")
    if expected == "tensors":  # the manifest must agree with the file for the suite to load
        manifest = manifest_module.loads((folder / "manifest.json").read_bytes())
        entry = next(case for case in manifest["cases"] if case["id"] == "dense/causal")
        entry["tensors"] = sorted([*entry["tensors"], "aux.extra"])
        entry["shapes"]["aux.extra"] = [2]
        entry["tolerances"]["aux.extra"] = {p: 0.0 for p in entry["tolerances"]["out"]}
        (folder / "manifest.json").write_text(manifest_module.dumps(manifest))
    _rewrite_case(folder, "dense/causal", change)
    drift = check(folder, mechanisms=DENSE)
    assert any(expected in message and "dense/causal.safetensors" in message for message in drift), drift


def test_check_tolerates_last_bit_differences(exported, tmp_path):
    """A machine whose exp rounds differently in the last bit must not see drift."""
    folder = _copy(exported, tmp_path / "suite")
    last_bit = lambda t: t.__setitem__("expected.out", np.nextafter(t["expected.out"], np.inf))  # noqa: E731
    _rewrite_case(folder, "dense/causal", last_bit)
    assert check(folder, mechanisms=DENSE) == []


def test_check_reports_budgets_stale_and_missing_files(exported, tmp_path):
    folder = _copy(exported, tmp_path / "suite")
    manifest = manifest_module.loads((folder / "manifest.json").read_bytes())
    manifest["cases"][0]["tolerances"]["out"]["float16"] *= 8  # beyond the factor of 4 check tolerates
    (folder / "manifest.json").write_text(manifest_module.dumps(manifest))
    (folder / "dense" / "renamed_case.safetensors").write_bytes(b"")
    drift = check(folder, mechanisms=DENSE)
    assert any("budget out@float16" in message for message in drift), drift
    assert any("renamed_case.safetensors: not in a fresh export" in message for message in drift), drift


def test_export_removes_case_files_that_are_no_longer_cases(tmp_path):
    stale = tmp_path / "dense" / "old_name.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept")
    export(tmp_path, mechanisms=DENSE)
    assert not stale.exists() and unrelated.read_text() == "kept"


def test_export_subset_of_mechanisms(tmp_path):
    manifest = export(tmp_path, mechanisms=["dense"])
    assert {case["mechanism"] for case in manifest["cases"]} == {"dense"}
    with pytest.raises(ValueError, match="mechanism"):
        export(tmp_path, mechanisms=["no_such_mechanism"])


def test_progress_bar_is_drawn_only_when_asked(tmp_path, capsys, monkeypatch):
    first_two = dense_cases.cases()[:2]
    monkeypatch.setattr(dense_cases, "cases", lambda: first_two)
    export(tmp_path / "quiet", mechanisms=DENSE, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("refattn.conformance.progress.DELAY_SECONDS", 0.0)  # drawn at once, not after a second
    export(tmp_path / "loud", mechanisms=DENSE, progress=True)
    err = capsys.readouterr().err
    assert "export" in err and "2/2" in err and first_two[1].id in err


def test_suite_stays_small():
    total = sum(path.stat().st_size for path in COMMITTED.rglob("*") if path.is_file())
    assert total < 16 * 1024 * 1024  # every mechanism together; a clone stays small


def test_large_export_is_forward_only_with_the_numba_backend(tmp_path, monkeypatch):
    """Plumbing of --large, with a stand-in kernel and two tiny 'large' cases."""
    calls = []

    def fake_forward(x):  # the backend contract: forward(checked inputs) -> Result
        calls.append(x)
        return dense_attention(x.q, x.k, x.v, causal=x.causal, causal_alignment=x.causal_alignment, window=x.window,
                               scale=x.scale, softcap=x.softcap, mask=x.mask, bias=x.bias)  # fmt: skip

    fake = types.ModuleType("refattn.dense.numba")
    fake.forward = fake_forward
    monkeypatch.setitem(sys.modules, "refattn.dense.numba", fake)
    draw = lambda rng: {name: rng.standard_normal((1, 1, 5, 4)) for name in ("q", "k", "v")}  # noqa: E731
    tiny = [Case("dense/long_tiny", "dense", "stand-in", ("LONG_SEQUENCE",), seed=1, arrays=draw, grad=False)]
    monkeypatch.setattr(dense_cases, "large_cases", lambda: tiny)
    manifest = export(tmp_path, mechanisms=DENSE, large=True)
    entry = next(case for case in manifest["cases"] if case["id"] == "dense/long_tiny")
    assert calls and entry["tolerances"] == {"out": {"float64": 1e-10}, "lse": {"float64": 1e-10}}
    assert entry["tensors"] == ["expected.lse", "expected.out", "input.k", "input.q", "input.v"]
    loaded = load_suite(tmp_path).select(ids="dense/long_tiny").cases[0]
    reference = dense_attention(**loaded.arguments())
    assert normwise_error(loaded.expected["out"], reference.out) == 0.0


# --- the tolerance policy -----------------------------------------------------


def test_normwise_error_of_a_hand_made_pair():
    # max |x - ref| = 1 (last entry), max |ref| = 4.
    assert normwise_error([1.0, -2.0, 3.0], [1.0, -2.0, 4.0]) == 0.25
    assert normwise_error(np.float32([0.5]), [1.0]) == 0.5
    assert normwise_error([], np.zeros(0)) == 0.0


def test_normwise_error_of_a_zero_reference_uses_tiny():
    assert normwise_error([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert normwise_error([1e-300, 0.0], [0.0, 0.0]) == pytest.approx(1e-300 / np.finfo(np.float64).tiny)


def test_normwise_error_infinities_must_match_exactly():
    ref = np.array([-np.inf, 2.0, -np.inf])
    assert normwise_error([-np.inf, 2.0, -np.inf], ref) == 0.0  # equal -inf contributes 0
    assert normwise_error([-np.inf, 1.0, -np.inf], ref) == 0.5  # error over the finite entries only
    assert normwise_error([-1e30, 2.0, -np.inf], ref) == math.inf  # finite where -inf is expected
    assert normwise_error([np.inf, 2.0, -np.inf], ref) == math.inf  # the other infinity
    assert normwise_error([-np.inf, -np.inf, -np.inf], ref) == math.inf  # -inf where finite is expected
    assert normwise_error([-np.inf, np.nan, -np.inf], ref) == math.inf
    assert normwise_error([-np.inf, -np.inf], [-np.inf, -np.inf]) == 0.0


def test_normwise_error_integers_are_exact():
    assert normwise_error(np.array([3, 1, 2]), np.array([3, 1, 2])) == 0.0
    assert normwise_error(np.array([3, 1, 3]), np.array([3, 1, 2])) == math.inf
    assert normwise_error(np.array([True, False]), np.array([True, True])) == math.inf


def test_normwise_error_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        normwise_error(np.zeros((2, 3)), np.zeros((3, 2)))


def test_budget_formula():
    assert tolerance.FLOAT64_BUDGET == 1e-10
    assert tolerance.budget("out", "float64", 123.0) == 1e-10
    assert tolerance.budget("out", "float64", 123.0, sensitivity=1e3) == 1e-10
    assert tolerance.budget("out", "float64", 123.0, sensitivity=1e7) == pytest.approx(4 * 2.0**-53 * (1 + 1e7))
    assert tolerance.unit_roundoff("float32") == 2.0**-24
    assert tolerance.unit_roundoff("float16") == 2.0**-11
    assert tolerance.unit_roundoff("bfloat16") == 2.0**-8
    assert tolerance.budget("out", "float16", 1e-3) == pytest.approx(4 * 1e-3 + 4 * 2.0**-11)
    assert tolerance.budget("lse", "float32", 1e-7) == pytest.approx(4 * 1e-7 + 4 * 2.0**-24)
    assert tolerance.budget("grad.q", "bfloat16", 1e-2) == pytest.approx(4 * 1e-2 + 4 * 2.0**-8)
    # Plus 4 roundoffs of the compute precision (float32) per unit of recomputation sensitivity.
    assert tolerance.budget("grad.k", "float16", 1e-3, sensitivity=10.0) == pytest.approx(
        4 * 1e-3 + 4 * 2.0**-11 + 4 * 2.0**-24 * 10.0
    )


def test_recomputation_sensitivity_by_hand():
    grad = np.array([[2.0, -4.0]])
    lse = np.array([-np.inf, -3.0, 2.0])  # L = 3: the largest finite |lse|
    assert tolerance.logit_scale(lse) == 3.0
    assert tolerance.recomputation_sensitivity(grad, lse, np.array([[1.0, 0.5]])) == 2 * 3.0 + 1.0 / 4.0
    assert tolerance.recomputation_sensitivity(grad, np.array([-np.inf]), None) == 0.0
    # The largest error over the plain and jittered evaluations sets the budget.
    evaluations = [np.array([1.0, 2.0]), np.array([1.0, 2.2]), np.array([1.1, 2.0])]
    assert tolerance.budgets("out", np.array([1.0, 2.0]), {"float32": evaluations})["float32"] == pytest.approx(
        4 * 0.1 + 4 * 2.0**-24
    )
    # lse errors divide by at least 1: 0.01 off a reference of size 0.1 is 0.01, not 0.1.
    assert tolerance.error("lse", np.array([0.11]), np.array([0.1])) == pytest.approx(0.01)
    assert tolerance.error("out", np.array([0.11]), np.array([0.1])) == pytest.approx(0.1)
    exact = tolerance.budgets("aux.buckets", np.array([1, 2]), {"float32": np.array([1, 2])})
    assert exact == {"float64": 0.0, "float32": 0.0}
    with pytest.raises(ValueError, match="not finite"):
        tolerance.budget("out", "float16", math.inf)


def test_exported_budgets_are_positive_and_ordered(suite):
    for case in suite.cases:
        assert set(case.tolerances) == set(case.expected)
        for output, row in case.tolerances.items():
            assert row["float64"] == 1e-10
            floors = {p: 4 * tolerance.unit_roundoff(p) for p in tolerance.LOWER_PRECISIONS}
            assert all(row[p] >= floors[p] for p in floors), (case.id, output, row)
            assert row["float64"] < row["float32"] < min(row["float16"], row["bfloat16"]), (case.id, output, row)


def _permuted_evaluation(case, precision: str, seed: int) -> dict:
    """The reference with the head-dim sums in another order: a legitimate implementation."""
    rng = np.random.default_rng(seed)
    arguments = case.arguments()
    perm_d, perm_v = rng.permutation(arguments["q"].shape[-1]), rng.permutation(arguments["v"].shape[-1])
    arguments.update(q=arguments["q"][..., perm_d], k=arguments["k"][..., perm_d], v=arguments["v"][..., perm_v])
    result = dense_attention(**arguments, precision=precision)
    dout, dlse = case.cotangents["dout"][..., perm_v], case.cotangents["dlse"]
    grads = dense_attention_vjp(dout, **arguments, dlse=dlse, precision=precision)
    undo_d, undo_v = np.argsort(perm_d), np.argsort(perm_v)
    got = {"out": result.out[..., undo_v], "lse": result.lse, "grad.q": grads.q[..., undo_d],
           "grad.k": grads.k[..., undo_d], "grad.v": grads.v[..., undo_v]}  # fmt: skip
    if "bias" in grads:
        got["grad.bias"] = grads.bias
    return got


def ratio(case, output: str, value, precision: str) -> float:
    """error / budget of ``value`` for ``output`` as the verifier judges it: a gradient ``grad.<x>`` (for both
    cotangents) against the sum of the stored parts, within the sum of their budgets."""
    if not output.startswith("grad."):
        return tolerance.error(output, value, case.expected[output]) / case.tolerances[output][precision]
    name = output.split(".", 1)[1]
    parts = [f"grad_dout.{name}", f"grad_dlse.{name}"]
    scale = tolerance.gradient_scales({part: case.expected[part] for part in parts})[parts[0]]
    want = sum(case.expected[part] for part in parts)
    return tolerance.error(output, value, want, scale) / sum(case.tolerances[part][precision] for part in parts)


@pytest.mark.parametrize("precision", ["float64", "float32", "float16", "bfloat16"])
def test_budgets_admit_another_summation_order(suite, precision):
    for case in suite.cases:
        for seed in (1, 2):
            for output, value in _permuted_evaluation(case, precision, seed).items():
                assert ratio(case, output, value, precision) <= 1, (case.id, output)


# --- the dense cases ----------------------------------------------------------


def _all_dense_cases():
    return dense_cases.cases() + dense_cases.large_cases()


def test_every_flag_used_is_described_and_every_flag_described_is_used():
    mechanisms = [registry.get(name) for name in registry.names()]
    every_case = [case for m in mechanisms for case in m.cases() + export_module.large_cases(m)]
    used = {flag for case in every_case for flag in case.flags}
    described = set(catalogue())
    assert used <= described, sorted(used - described)
    assert described <= used, sorted(described - used)


def test_the_suite_readme_lists_every_flag():
    readme = (COMMITTED / "README.md").read_text()
    assert [flag for flag in catalogue() if f"| `{flag}` |" not in readme] == []


def test_case_ids_seeds_and_sizes():
    small = dense_cases.cases()
    assert 25 <= len(small) <= 40
    ids = [case.id for case in _all_dense_cases()]
    assert len(ids) == len(set(ids)) and all(i.startswith("dense/") for i in ids)
    assert all(case.flags for case in _all_dense_cases())
    assert len({case.seed for case in small}) == len(small)


def _shapes(case) -> dict:
    arrays = case.arrays(np.random.default_rng(case.seed))
    b, hq, nq, d = arrays["q"].shape
    _, hkv, nk, dv = arrays["v"].shape
    return dict(arrays=arrays, hq=hq, hkv=hkv, nq=nq, nk=nk, d=d, dv=dv, b=b)


def test_structural_flags_are_honest():
    """Flags whose bug lives in a kernel's structure: the case has the structure."""
    for case in dense_cases.cases():
        s, flags, params = _shapes(case), set(case.flags), case.params
        if "CAUSAL_ALIGNMENT" in flags:
            assert s["nq"] != s["nk"] and (params.get("causal") or params.get("window")), case.id
        if "GQA_HEAD_MAP" in flags:
            assert s["hq"] > s["hkv"] >= 2, case.id
            assert not np.allclose(s["arrays"]["k"][:, 0], s["arrays"]["k"][:, 1]), case.id
        if "MULTI_QUERY" in flags:
            assert s["hkv"] == 1 < s["hq"], case.id
        if "AWKWARD_HEAD_DIM" in flags:
            assert s["d"] == 59, case.id
        if "VALUE_DIM_DIFFERS" in flags:
            assert s["dv"] != s["d"], case.id
        if "UNEQUAL_LENGTHS" in flags:
            assert s["nq"] != s["nk"], case.id
        if "SINGLE_TOKEN" in flags:
            assert 1 in (s["nq"], s["nk"]), case.id
        if "MULTI_BATCH" in flags:
            assert s["b"] >= 2, case.id
        if "ODD_LENGTH" in flags:
            assert any(n % 2 == 1 for n in (s["nq"], s["nk"])), case.id
        if "MASK_BROADCAST" in flags:
            assert s["arrays"]["mask"].shape != (s["b"], s["hq"], s["nq"], s["nk"]), case.id
        if "LARGE_LOGITS" in flags:
            assert params["scale"] >= 1e3, case.id
        if "WINDOW_WIDER_THAN_SEQUENCE" in flags:
            assert min(w for w in params["window"] if w) > max(s["nq"], s["nk"]), case.id


# A second formulation of dense attention with one switchable mistake per bug
# class. With no mistake it must reproduce every expected value; with the
# mistake a flag names, it must fail every case carrying that flag, at every
# precision's budget.


def _allowed(a: dict, p: dict, bug: str | None) -> np.ndarray:
    b, hq, nq, _ = a["q"].shape
    nk = a["k"].shape[2]
    alignment = p.get("causal_alignment", "bottom_right")
    if bug == "swap_alignment":
        alignment = "top_left" if alignment == "bottom_right" else "bottom_right"
    pos = np.arange(nq)[:, None] + (nk - nq if alignment == "bottom_right" else 0)
    key = np.arange(nk)[None, :]
    allowed = np.ones((nq, nk), bool)
    if p.get("causal"):
        allowed &= key < pos if bug == "causal_excludes_diagonal" else key <= pos
    if p.get("window") is not None:
        left, right = p["window"]
        if left is not None:
            low = pos - left
            if bug == "unsigned_window_bounds":
                low = np.where(low < 0, low + 2**32, low)
            allowed &= key > low if bug == "window_exclusive" else key >= low
        if right is not None:
            allowed &= key < pos + right if bug == "window_exclusive" else key <= pos + right
    user = a.get("mask", np.ones((1, 1), bool))
    if bug == "mask_inverted":
        user = ~user
    if bug == "mask_replaces_position" and "mask" in a:
        allowed = np.ones_like(allowed)
    return np.broadcast_to(user & allowed, (b, hq, nq, nk))


def _mutant_forward(a: dict, p: dict, bug: str | None = None) -> dict:
    q, k, v = a["q"], a["k"], a["v"]
    _, hq, _, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    heads = np.arange(hq) % hkv if bug == "tile_heads" else np.arange(hq) // (hq // hkv)
    k, v = k[:, heads], v[:, heads]
    if bug == "batch_zero_kv":
        k, v = np.broadcast_to(k[:1], k.shape), np.broadcast_to(v[:1], v.shape)
    scale = 1 / math.sqrt(d) if p.get("scale") is None or bug == "scale_ignored" else p["scale"]
    if bug == "scale_default_wrong":
        scale = 1 / math.sqrt(dv) if dv != d else 1 / d
    s = scale * np.einsum("bhqd,bhkd->bhqk", q, k)
    bias = a.get("bias", np.zeros((1, 1))) * (scale if bug == "bias_scaled" else 1.0)
    c = p.get("softcap", 0.0)
    if c and bug == "cap_after_bias":
        logits = c * np.tanh((s + bias) / c)
    elif c:
        logits = (c * np.tanh(s) if bug == "cap_without_divide" else c * np.tanh(s / c)) + bias
    else:
        logits = s + bias
    allowed = _allowed(a, p, bug)
    unbiased = np.where(allowed, logits - bias, -np.inf)
    logits = np.where(allowed, logits, {"cap_after_mask": -c, "finite_mask": -1e9}.get(bug, -np.inf))
    with np.errstate(all="ignore"):
        top = logits.max(-1, keepdims=True) if bug != "no_max_subtraction" else np.zeros(logits.shape[:-1] + (1,))
        top = np.where(np.isfinite(top), top, 0.0)
        weights = np.exp(logits - top)
        total = weights.sum(-1, keepdims=True)
        weights = weights / np.where(total > 0, total, 1.0)
        lse = np.where(total[..., 0] > 0, top[..., 0] + np.log(total[..., 0]), -np.inf)
    if bug == "lse_base2":
        lse = lse / math.log(2)
    if bug == "lse_without_bias":
        lse = np.log(np.exp(unbiased).sum(-1))  # no case with this flag has large logits or empty rows
    if "dropout_keep" in a:
        rescale = 1.0 if bug == "dropout_not_rescaled" else 1.0 / (1.0 - p["dropout_p"])
        weights = np.where(a["dropout_keep"], weights * rescale, 0.0)
    return {"out": np.einsum("bhqk,bhke->bhqe", weights, v), "lse": lse}


def _mutant_grads(case, bug: str) -> dict:
    """Backward mistakes, built from the reference VJP on rearranged inputs."""
    a, p, cot = {**case.inputs, **case.array_params}, case.params, case.cotangents
    if bug == "dlse_ignored":
        grads = dense_attention_vjp(cot["dout"], **a, **p)
        return {"grad.q": grads.q, "grad.k": grads.k}
    if bug == "grad_mean_over_group":  # per-query-head gradients, averaged instead of summed
        hkv, group = a["k"].shape[1], a["q"].shape[1] // a["k"].shape[1]
        per_head = dict(a, k=np.repeat(a["k"], group, 1), v=np.repeat(a["v"], group, 1))
        grads = dense_attention_vjp(cot["dout"], **per_head, dlse=cot["dlse"], **p)
        mean = lambda x: x.reshape(x.shape[0], hkv, group, *x.shape[2:]).mean(2)  # noqa: E731
        return {"grad.k": mean(grads.k), "grad.v": mean(grads.v)}
    if bug == "bias_grad_mean":  # broadcast axes averaged instead of summed
        bias = a["bias"]
        full = np.broadcast_to(bias, a["q"].shape[:3] + a["k"].shape[2:3]).copy()
        grad = dense_attention_vjp(cot["dout"], **dict(a, bias=full), dlse=cot["dlse"], **p).bias
        grad = grad.mean(axis=tuple(range(grad.ndim - bias.ndim)))
        axes = tuple(i for i, n in enumerate(bias.shape) if n == 1 and grad.shape[i] != 1)
        return {"grad.bias": grad.mean(axis=axes, keepdims=True)}
    raise ValueError(bug)


MUTANTS = {
    "CAUSAL_MASK": ["causal_excludes_diagonal"],
    "CAUSAL_ALIGNMENT": ["swap_alignment"],
    "SLIDING_WINDOW": ["window_exclusive"],
    "WINDOW_WIDER_THAN_SEQUENCE": ["unsigned_window_bounds"],
    "MASK_LAYOUT": ["mask_inverted"],
    "PADDING_MASK": ["mask_inverted"],
    "MASK_COMBINATION": ["mask_replaces_position"],
    "FULLY_MASKED_ROW": ["finite_mask"],
    "GQA_HEAD_MAP": ["tile_heads"],
    "MULTI_BATCH": ["batch_zero_kv"],
    "SCALE_DEFAULT": ["scale_default_wrong"],
    "SCALE_OVERRIDE": ["scale_ignored"],
    "LARGE_LOGITS": ["no_max_subtraction"],
    "SOFTCAP": ["cap_without_divide"],
    "SOFTCAP_BEFORE_BIAS": ["cap_after_bias"],
    "SOFTCAP_BEFORE_MASK": ["cap_after_mask"],
    "BIAS": ["bias_scaled"],
    "DROPOUT_SCALING": ["dropout_not_rescaled"],
    "LSE_DEFINITION": ["lse_base2", "lse_without_bias"],
    "LSE_GRADIENT": ["dlse_ignored"],
    "GQA_GRAD_REDUCTION": ["grad_mean_over_group"],
    "MULTI_QUERY": ["grad_mean_over_group"],
    "BIAS_BROADCAST": ["bias_grad_mean"],
}
GRADIENT_MUTANTS = {"dlse_ignored", "grad_mean_over_group", "bias_grad_mean"}
#: Bugs of a kernel's structure (tiling, strides, index types), which no NumPy
#: formulation makes; ``test_structural_flags_are_honest`` checks these cases.
STRUCTURAL = {"BASELINE", "AWKWARD_HEAD_DIM", "ODD_LENGTH", "UNEQUAL_LENGTHS", "SINGLE_TOKEN",
              "VALUE_DIM_DIFFERS", "MASK_BROADCAST", "LONG_SEQUENCE"}  # fmt: skip


def test_every_dense_flag_has_a_mutant_or_is_structural():
    dense_flags = {flag for case in _all_dense_cases() for flag in case.flags}
    assert set(MUTANTS) | STRUCTURAL == dense_flags and not set(MUTANTS) & STRUCTURAL


def test_second_formulation_reproduces_every_expected_value(suite):
    for case in suite.cases:
        for output, value in _mutant_forward({**case.inputs, **case.array_params}, case.params).items():
            assert normwise_error(value, case.expected[output]) <= 1e-10, (case.id, output)


@pytest.mark.parametrize("flag", sorted(MUTANTS))
def test_the_mistake_a_flag_names_fails_its_cases(suite, flag):
    flagged = suite.select(flags=flag).cases
    assert flagged
    for case in flagged:
        for bug in MUTANTS[flag]:
            if bug in GRADIENT_MUTANTS:
                got = _mutant_grads(case, bug)
            else:
                got = _mutant_forward({**case.inputs, **case.array_params}, case.params, bug)
            for precision in ("float64", *tolerance.LOWER_PRECISIONS):
                worst = max(ratio(case, o, v, precision) for o, v in got.items())
                assert worst > 1, f"{case.id}: mistake {bug} passes at {precision}"


# A FlashAttention-style formulation (a legitimate implementation whose backward differs
# from the reference's): the lower-precision budgets must admit it.


def _flash_style(case, precision: str) -> dict:
    """A FlashAttention-style evaluation: inputs rounded to ``precision``, float32 compute and
    statistics, P recomputed from the stored lse in the backward, delta = rowsum(dout * out)."""
    storage = np.dtype(ml_dtypes.bfloat16) if precision == "bfloat16" else np.dtype(precision)
    f32 = lambda x: np.asarray(x).astype(storage).astype(np.float32)  # noqa: E731
    a, p = {**case.inputs, **case.array_params}, case.params
    group = a["q"].shape[1] // a["k"].shape[1]
    q, k, v = f32(a["q"]), np.repeat(f32(a["k"]), group, 1), np.repeat(f32(a["v"]), group, 1)
    scale = np.float32(1 / math.sqrt(q.shape[-1]) if p.get("scale") is None else p["scale"])
    cap = np.float32(p.get("softcap", 0.0))
    s = scale * q @ k.swapaxes(-1, -2)
    capped = cap * np.tanh(s / cap) if cap else s
    logits = np.where(_allowed(a, p, None), capped + f32(a.get("bias", 0.0)), np.float32(-np.inf))
    top = logits.max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, np.float32(0))
    unnormalised = np.exp(logits - top)
    total = unnormalised.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, top + np.log(total), np.float32(-np.inf))
    keep = np.broadcast_to(a.get("dropout_keep", True), logits.shape) / np.float32(1 - p.get("dropout_p", 0.0))
    out = f32(((unnormalised * keep) @ v) / np.where(total > 0, total, np.float32(1)))  # acc / l
    weights = np.exp(logits - np.where(np.isfinite(lse), lse, np.float32(np.inf)))  # the backward's exp(s - lse)
    dout, dlse = f32(case.cotangents["dout"]), f32(case.cotangents["dlse"])
    delta = np.sum(dout * out, axis=-1, keepdims=True)
    d_logits = weights * ((dout @ v.swapaxes(-1, -2)) * keep - delta + dlse[..., None])
    d_scores = d_logits * (1 - (capped / cap) ** 2) if cap else d_logits
    per_group = lambda x: x.reshape(x.shape[0], -1, group, *x.shape[2:]).sum(2)  # noqa: E731
    got = {"out": out, "lse": lse[..., 0], "grad.q": scale * d_scores @ k,
           "grad.k": per_group(scale * d_scores.swapaxes(-1, -2) @ q),
           "grad.v": per_group((weights * keep).swapaxes(-1, -2) @ dout)}  # fmt: skip
    if "bias" in a:
        got["grad.bias"] = sum_to_shape(d_logits, a["bias"].shape)
    return got


@pytest.mark.parametrize("precision", tolerance.LOWER_PRECISIONS)
def test_budgets_admit_a_flash_attention_style_implementation(suite, precision):
    for case in suite.cases:
        for output, value in _flash_style(case, precision).items():
            assert ratio(case, output, value, precision) <= 1, (case.id, output)


# --- tie cases: rounding trials that keep exact ties ---------------------------------------------


def test_tie_preserving_inputs_move_equal_values_alike_by_at_most_a_roundoff():
    x = np.random.default_rng(5).standard_normal((6, 8))
    x[3] = x[0]  # a duplicated token
    x[1, 2] = 0.0
    mask = np.ones(4, dtype=bool)
    u = 2.0**-11
    trials = [tolerance.tie_preserving_inputs({"x": x, "mask": mask}, "float16", trial) for trial in range(3)]
    for moved in trials:
        assert np.array_equal(moved["x"][3], moved["x"][0])
        assert moved["x"][1, 2] == 0.0 and moved["mask"] is mask
        assert np.all(np.abs(moved["x"] - x) <= u * np.abs(x))
        assert np.mean(np.abs(moved["x"] - x) > 0.25 * u * np.abs(x)) > 0.5  # most entries really move
    assert not np.array_equal(trials[0]["x"], trials[1]["x"])


def test_a_tie_cases_rounding_trials_keep_its_ties_where_jitter_breaks_them():
    """routing/canonical_ties: every tie-preserving trial reproduces the float64 membership; randomised rounding
    (the trials of a case without the flag) decides a tie otherwise in some trial, which is why the case needs them."""
    import dataclasses

    from refattn.conformance.case import EXACT_TIES

    mechanism = registry.get("routing")
    case = next(dataclasses.replace(c, grad=False) for c in mechanism.cases() if c.id == "routing/canonical_ties")
    arrays = case.arrays(np.random.default_rng(case.seed))
    expected = mechanism.forward(**arrays, **case.params).aux["membership"]
    kept = export_module._evaluations(mechanism, case, arrays, {}, "float32")
    assert len(kept) == 1 + tolerance.ROUNDING_TRIALS
    assert all(np.array_equal(evaluation["aux.membership"], expected) for evaluation in kept)
    untied = dataclasses.replace(case, flags=tuple(f for f in case.flags if f != EXACT_TIES))
    jittered = export_module._evaluations(mechanism, untied, arrays, {}, "float32")
    assert not all(np.array_equal(evaluation["aux.membership"], expected) for evaluation in jittered)


def test_float64_budget_grows_only_for_ill_conditioned_outputs():
    """An output that is mostly cancellation (float32 reference off by 3e5 relative) gets the float32 error scaled
    to float64's roundoff, 4 · 3e5 · 2⁻²⁹; a well-conditioned one keeps 1e-10."""
    expected = np.array([1e-13, -2e-13])
    cancelled = tolerance.budgets("grad_dout.wk", expected, {"float32": [expected + 3e-8]}, scale=2e-13)
    assert cancelled["float64"] == pytest.approx(4 * (3e-8 / 2e-13) * 2.0**-53 / 2.0**-24)
    ordinary = tolerance.budgets("grad_dout.wk", expected, {"float32": [expected * (1 + 2e-7)]}, scale=2e-13)
    assert ordinary["float64"] == tolerance.FLOAT64_BUDGET


def test_a_vanishing_gradient_is_measured_against_the_largest_one():
    """q's gradient is rounding noise (it vanishes by an invariance): its error is relative to the largest
    gradient of the problem, k's 2.0; v's, a thousandth of it, is a real gradient and keeps its own scale."""
    grads = {"grad_dout.q": np.array([1e-20]), "grad_dlse.q": np.array([0.0]), "grad_dout.k": np.array([2.0]),
             "grad_dlse.k": np.array([-1.0]), "grad_dout.v": np.array([2e-3]), "grad_dlse.v": np.array([0.0])}  # fmt: skip
    scales = tolerance.gradient_scales(grads)
    assert scales["grad_dout.q"] == scales["grad_dlse.q"] == 2.0
    assert scales["grad_dout.k"] == 2.0 and scales["grad_dout.v"] == scales["grad_dlse.v"] == 2e-3
