"""Loading a suite is hostile-input safe: every corruption of a real copy of the
committed suite is refused with a SuiteError naming the case and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from refattn import dense_attention
from refattn.conformance import manifest as manifest_module
from refattn.conformance.suite import LoadedCase, SuiteError, load_suite
from refattn.conformance.tolerance import normwise_error

#: The committed suite, or the one REFATTN_SUITE names (a fresh export, to test a format change before committing it).
COMMITTED = Path(os.environ.get("REFATTN_SUITE") or Path(__file__).resolve().parents[1] / "conformance")
VICTIM = "dense/causal"  # the case each corruption targets


def copy_suite(folder: Path, mechanisms=("dense",)) -> Path:
    """A copy of the committed suite's cases of ``mechanisms`` in ``folder`` (a custom suite)."""
    manifest = _manifest(COMMITTED)
    manifest["cases"] = [case for case in manifest["cases"] if case["mechanism"] in mechanisms]
    used = {flag for case in manifest["cases"] for flag in case["flags"]}
    manifest["flags"] = {name: text for name, text in manifest["flags"].items() if name in used}
    for mechanism in mechanisms:
        shutil.copytree(COMMITTED / mechanism, folder / mechanism)
    _save_manifest(folder, manifest)
    return folder


@pytest.fixture
def suite_copy(tmp_path) -> Path:
    return copy_suite(tmp_path / "suite")


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _save_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(manifest_module.dumps(manifest))


def _entry(manifest: dict, case_id: str = VICTIM) -> dict:
    return next(case for case in manifest["cases"] if case["id"] == case_id)


def _victim_file(folder: Path) -> Path:
    return folder / _entry(_manifest(folder))["file"]


def _refused(folder: Path, *fragments: str) -> str:
    with pytest.raises(SuiteError) as info:
        load_suite(folder)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- the real suite loads -------------------------------------------------------


def test_committed_suite_loads_and_round_trips():
    suite = load_suite(COMMITTED)
    assert suite.origin.official
    assert len(suite.cases) == len(suite.manifest["cases"]) >= 25
    case = suite.select(ids=VICTIM).cases[0]
    assert isinstance(case, LoadedCase)
    # params spell out every keyword of dense_attention that is not an array: the case's causal=True and the defaults
    assert case.params == {"causal": True, "causal_alignment": "bottom_right", "window": None, "scale": None,
                           "softcap": 0.0, "dropout_p": 0.0, "mask": None, "bias": None, "dropout_keep": None}
    assert sorted(case.inputs) == ["k", "q", "v"] and case.array_params == {}
    assert sorted(case.cotangents) == ["dlse", "dout"]
    assert sorted(case.expected) == ["grad_dlse.k", "grad_dlse.q", "grad_dlse.v", "grad_dout.k", "grad_dout.q",
                                     "grad_dout.v", "lse", "out"]  # fmt: skip
    assert all(array.dtype == np.float64 and not array.flags.writeable for array in case.expected.values())
    result = dense_attention(**case.arguments())
    assert normwise_error(result.out, case.expected["out"]) <= case.tolerances["out"]["float64"]


def test_loaded_masks_are_bool_params():
    dense = load_suite(COMMITTED, mechanisms="dense")
    case = dense.select(ids="dense/padding_mask_keys").cases[0]
    assert case.array_params["mask"].dtype == np.bool_ and case.array_params["mask"].shape == (2, 1, 1, 13)
    assert np.isneginf(dense.select(ids="dense/fully_masked_everything").cases[0].expected["lse"]).all()


def test_select_filters_and_refuses_what_matches_nothing():
    suite = load_suite(COMMITTED, mechanisms=["dense", "alibi"])
    assert [c.id for c in suite.select(ids=["dense/causal_top_left*"]).cases] == [
        "dense/causal_top_left_short_queries",
        "dense/causal_top_left_long_queries",
    ]
    assert all("GQA_HEAD_MAP" in c.flags for c in suite.select(flags="GQA_HEAD_MAP").cases)
    dense = suite.select(mechanisms=["dense"]).cases
    assert dense and {c.mechanism for c in dense} == {"dense"}
    assert len(suite.select(mechanisms=["dense", "alibi"]).cases) == len(dense) + len(suite.select(mechanisms="alibi").cases)
    for kwargs in (dict(ids="dense/no_such_case"), dict(flags="NO_SUCH_FLAG"), dict(mechanisms="no_such")):
        with pytest.raises(SuiteError, match="no case"):
            suite.select(**kwargs)
    with pytest.raises(SuiteError, match="no case with mechanism 'no_such'"):
        load_suite(COMMITTED, mechanisms="no_such")


# --- corrupted files --------------------------------------------------------------


def test_missing_file(suite_copy):
    _victim_file(suite_copy).unlink()
    _refused(suite_copy, VICTIM, "missing")


def test_truncated_file(suite_copy):
    path = _victim_file(suite_copy)
    path.write_bytes(path.read_bytes()[:-100])
    _refused(suite_copy, VICTIM, "truncated")


def test_flipped_byte_fails_the_checksum(suite_copy):
    path = _victim_file(suite_copy)
    data = bytearray(path.read_bytes())
    data[20] ^= 0x20  # inside the JSON header: parsing it would fail too, but the checksum comes first
    path.write_bytes(bytes(data))
    _refused(suite_copy, VICTIM, "SHA-256", "altered")


def test_tensor_set_mismatch(suite_copy):
    """A re-signed file with an extra tensor: checksum fine, contents not what the manifest lists."""
    path = _victim_file(suite_copy)
    tensors = dict(safetensors.numpy.load(path.read_bytes()))
    tensors["expected.surprise"] = np.zeros(3)
    data = safetensors.numpy.save(tensors)
    path.write_bytes(data)
    manifest = _manifest(suite_copy)
    _entry(manifest).update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "unlisted tensors ['expected.surprise']")


def test_shape_mismatch(suite_copy):
    manifest = _manifest(suite_copy)
    _entry(manifest)["shapes"]["input.q"] = [1, 2, 17, 15]
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "input.q", "shape")


def test_not_a_safetensors_file(suite_copy):
    path = _victim_file(suite_copy)
    data = b"\xff" * 64
    path.write_bytes(data)
    manifest = _manifest(suite_copy)
    _entry(manifest).update(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "not a readable safetensors file")


# --- paths ------------------------------------------------------------------------


def test_dot_dot_path(suite_copy):
    shutil.copy(_victim_file(suite_copy), suite_copy.parent / "outside.safetensors")
    manifest = _manifest(suite_copy)
    _entry(manifest)["file"] = "../outside.safetensors"
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "'..'")


def test_absolute_path(suite_copy):
    outside = suite_copy.parent / "outside.safetensors"
    shutil.copy(_victim_file(suite_copy), outside)
    manifest = _manifest(suite_copy)
    _entry(manifest)["file"] = str(outside)
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "absolute")


def test_symlink_pointing_outside(suite_copy):
    path = _victim_file(suite_copy)
    outside = suite_copy.parent / "outside.safetensors"
    shutil.move(path, outside)
    path.symlink_to(outside)  # same bytes, same checksum: only the location is wrong
    _refused(suite_copy, VICTIM, "outside the suite folder")


def test_symlink_inside_is_fine(suite_copy):
    path = _victim_file(suite_copy)
    inside = suite_copy / "store" / "causal.safetensors"
    inside.parent.mkdir()
    shutil.move(path, inside)
    path.symlink_to(inside)
    assert load_suite(suite_copy).select(ids=VICTIM).cases


def test_windows_style_path(suite_copy):
    manifest = _manifest(suite_copy)
    _entry(manifest)["file"] = "dense\\causal.safetensors"
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "relative POSIX path")


# --- the manifest -----------------------------------------------------------------


def test_no_manifest(tmp_path):
    _refused(tmp_path, "no manifest.json")


def test_not_a_folder(tmp_path):
    _refused(tmp_path / "absent", "not a folder")


def test_non_json_manifest(suite_copy):
    (suite_copy / "manifest.json").write_text("format_version: 1\ncases: []\n")
    _refused(suite_copy, "not valid JSON")


def test_manifest_with_nan(suite_copy):
    text = (suite_copy / "manifest.json").read_text().replace('"float64": 1e-10', '"float64": NaN', 1)
    (suite_copy / "manifest.json").write_text(text)
    _refused(suite_copy, "NaN is not JSON")


def test_manifest_with_a_repeated_key(suite_copy):
    text = (suite_copy / "manifest.json").read_text()
    text = text.replace('"format_version": 2', '"format_version": 2, "format_version": 2')
    (suite_copy / "manifest.json").write_text(text)
    _refused(suite_copy, "appears twice")


def test_wrong_format_version(suite_copy):
    manifest = _manifest(suite_copy)
    manifest["format_version"] = 1
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, "format_version 1 is not supported", "reads format_version 2")


def test_extra_top_level_field(suite_copy):
    manifest = _manifest(suite_copy)
    manifest["comment"] = "hello"
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, "schema violation", "'comment' was unexpected")


def test_extra_case_field(suite_copy):
    manifest = _manifest(suite_copy)
    _entry(manifest)["pickle"] = "cposix\nsystem\n"
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, "schema violation", f"(case {VICTIM})", "'pickle' was unexpected")


def test_extra_precision_in_tolerances(suite_copy):
    manifest = _manifest(suite_copy)
    _entry(manifest)["tolerances"]["out"]["float8"] = 0.5
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, "schema violation", "tolerances.out", VICTIM)


def test_tolerances_missing_a_precision(suite_copy):
    manifest = _manifest(suite_copy)
    del _entry(manifest)["tolerances"]["grad_dout.q"]["float32"]
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "output grad_dout.q has no budget for float32")


def test_negative_budget(suite_copy):
    manifest = _manifest(suite_copy)
    _entry(manifest)["tolerances"]["out"]["float32"] = -1.0
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, "schema violation", "tolerances.out.float32")


def test_bad_checksum_text(suite_copy):
    manifest = _manifest(suite_copy)
    _entry(manifest)["sha256"] = "not-hex"
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, "schema violation", "sha256")


def test_undescribed_flag(suite_copy):
    manifest = _manifest(suite_copy)
    _entry(manifest)["flags"].append("MADE_UP")
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "MADE_UP", "not described")


def test_duplicate_case_id(suite_copy):
    manifest = _manifest(suite_copy)
    manifest["cases"].append(dict(_entry(manifest), file="dense/copy.safetensors"))
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "more than once")


def test_tolerances_for_missing_outputs(suite_copy):
    manifest = _manifest(suite_copy)
    del _entry(manifest)["tolerances"]["lse"]
    _save_manifest(suite_copy, manifest)
    _refused(suite_copy, VICTIM, "tolerances are given for")


def test_the_loader_never_unpickles():
    folder = Path(manifest_module.__file__).parent
    source = "".join((folder / name).read_text() for name in ("suite.py", "manifest.py", "export.py"))
    assert "allow_pickle" not in source and "np.load(" not in source and "import pickle" not in source
