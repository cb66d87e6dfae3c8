"""benchmarks/gpu_check.py in its dry run: NumPy for CuPy, CPU SDPA, tiny N (the GPU run itself needs a device)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from refattn.core import xp as core_xp

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module; the dry run's stand-in for CuPy is undone after the test."""
    monkeypatch.setattr(core_xp, "cupy_namespace", core_xp.cupy_namespace)
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(gpu_check, tmp_path, *arguments) -> tuple[int, str, dict]:
    code = gpu_check.main(["--dry-run", "--sizes", "12,24", "--dtypes", "float64", "--repeats", "1",
                           "--out", str(tmp_path), *arguments])  # fmt: skip
    return code, (tmp_path / "gpu_check.md").read_text(), json.loads((tmp_path / "gpu_check.json").read_text())


def test_dry_run_verifies_times_and_writes_the_tables(gpu_check, tmp_path):
    pytest.importorskip("torch")
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "t5,dense,differential")
    assert code == 0
    # Every selected mechanism verified through its registered cupy backend, dense first.
    assert [row["mechanism"] for row in results["verify"]] == ["dense", "differential", "t5"]
    assert all(row["ok"] and row["counts"]["pass"] > 0 for row in results["verify"])
    assert "| t5 | float64 | ok |" in table
    # SDPA and each mechanism at every size, forward and backward, with their ratios in the table.
    assert [(row["dtype"], row["n"]) for row in results["sdpa"]] == [("float64", 12), ("float64", 24)]
    assert len(results["xp"]) == 3 * 2
    assert all(row["forward"] > 0 and row["backward"] > 0 for row in results["xp"] + results["sdpa"])
    line = next(line for line in table.splitlines() if line.startswith("| differential | float64 | 24 |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    ours = next(row for row in results["xp"] if row["mechanism"] == "differential" and row["n"] == 24)
    assert float(cells[3]) == pytest.approx(1e3 * ours["forward"], rel=1e-3)
    assert float(cells[4]) == pytest.approx(ours["forward"] / results["sdpa"][1]["forward"], rel=1e-2)
    # What is missing here is said: no CUDA device for CuPy.
    assert "cupy: MISSING" in table


def test_budget_and_host_aux_limits_skip_rows_and_say_why(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.HOST_AUX_MAX_N, "t5", 12)
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "t5", "--skip-verify", "--budget-s", "1e6")
    assert code == 0 and results["verify"] == []
    assert [row["note"] for row in results["xp"]] == ["", "skipped: its aux is (Nq, Nk) on the host"]
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "dense", "--skip-verify", "--budget-s", "0")
    assert {row["note"] for row in results["xp"] + results["sdpa"]} == {"skipped: time budget"}
    assert "skipped: time budget" in table


def test_numba_column_at_the_sizes_asked(gpu_check, tmp_path):
    pytest.importorskip("numba")
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "dense", "--skip-verify", "--numba-sizes", "24")
    assert [row.get("numba_forward") is not None for row in results["xp"]] == [False, True]
    line = next(line for line in table.splitlines() if line.startswith("| dense | float64 | 24 |"))
    row = results["xp"][1]
    assert float(line.strip("|").split("|")[8]) == pytest.approx(row["numba_forward"] / row["forward"], rel=1e-2)


def test_verification_past_its_budget_is_not_run_and_fails_the_check(gpu_check, tmp_path):
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "dense", "--verify-budget-s", "0", "--budget-s", "0")
    assert code == 1
    assert [row["ok"] for row in results["verify"]] == [False]
    assert "| dense | float64 | not run (time budget) |" in table


def test_arguments(gpu_check):
    args = gpu_check.parse([])
    assert args.sizes == [4096, 16384, 65536] and args.dtypes == ["float32", "float64"] and not args.dry_run
    assert gpu_check.parse(["--blocks", "256,512"]).blocks == (256, 512)
    with pytest.raises(SystemExit, match="no cupy backend: nonexistent"):
        gpu_check.gpu_mechanisms(["dense", "nonexistent"])


def test_without_cupy_only_the_dry_run_runs(gpu_check, tmp_path):
    if core_xp.cupy_or_none() is not None:
        pytest.skip("a CUDA device is visible")
    assert gpu_check.main(["--out", str(tmp_path), "--mechanisms", "dense"]) == 2
