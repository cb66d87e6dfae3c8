"""The trust anchor: refattn's code carries the SHA-256 of the manifest it publishes,
and every report says whether it ran the official suite or a custom one."""

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import refattn
from refattn import cli
from refattn.conformance import trust
from refattn.conformance.suite import SuiteError, load_suite
from refattn.conformance.verify import verify
from refattn.dense import dense_attention
from tests.test_conformance_loading import COMMITTED, copy_suite

CASES = ["dense/baseline", "dense/causal"]


def test_the_published_manifest_has_the_anchored_hash():
    digest = hashlib.sha256((COMMITTED / "manifest.json").read_bytes()).hexdigest()
    assert digest == trust.PUBLISHED_MANIFEST_SHA256, (
        f"conformance/manifest.json has SHA-256 {digest}, but refattn/conformance/trust.py anchors "
        f"{trust.PUBLISHED_MANIFEST_SHA256}. If the vectors were regenerated on purpose (refattn export, "
        f"then refattn export --check is current), publish them: set PUBLISHED_MANIFEST_SHA256 = \"{digest}\" "
        "in refattn/conformance/trust.py. Otherwise conformance/manifest.json was altered: restore it."
    )


def test_the_committed_suite_is_official():
    suite = load_suite(COMMITTED, mechanisms="dense")
    assert suite.origin.official
    assert suite.origin.describe() == f"official suite (refattn {refattn.__version__})"


@pytest.fixture
def custom(tmp_path) -> Path:
    """The committed dense cases, unaltered, under another manifest: a custom suite."""
    return copy_suite(tmp_path / "suite")


def test_a_copy_with_another_manifest_is_custom_on_the_first_line_of_every_report(custom, tmp_path):
    digest = hashlib.sha256((custom / "manifest.json").read_bytes()).hexdigest()
    report = verify(dense_attention, suite=custom, ids=CASES)
    assert report.ok
    assert report.format().splitlines()[0] == f"custom suite: manifest hash {digest[:16]}..., not the published one"
    assert json.loads(report.to_json())["suite_origin"] == {
        "official": False, "manifest_sha256": digest, "description": report.origin.describe(),
    }  # fmt: skip
    properties = ET.fromstring(report.to_junit()).find("testsuite/properties")
    assert {p.get("name"): p.get("value") for p in properties} == {
        "suite_origin": report.origin.describe(), "manifest_sha256": digest,
    }  # fmt: skip


def test_require_official_refuses_a_custom_suite(custom, capsys):
    with pytest.raises(SuiteError, match="custom suite: manifest hash .* refusing it"):
        verify(dense_attention, suite=custom, ids=CASES, require_official=True)
    args = ["verify", "--impl", "refattn.dense:dense_attention", "--case", *CASES, "--require-official"]
    assert cli.main([*args, "--suite", str(custom)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "custom suite" in err
    assert cli.main(args) == 0
    assert capsys.readouterr().out.startswith("official suite")


def test_the_default_suite_is_the_published_one_not_the_working_directory(custom, monkeypatch):
    monkeypatch.chdir(custom.parent)
    (custom.parent / "conformance").symlink_to(custom)
    assert verify(dense_attention, ids=CASES).origin.official
