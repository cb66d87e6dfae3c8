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
    # Flex beside dense and t5 (it does not express differential), checked against refattn, then timed.
    assert results["flex"]["flex_matches"] == {"dense": True, "t5": True}
    assert "differential" in results["flex"]["not_expressed"]
    assert "| t5 | score_mod | True |" in table
    flex = {(row["mechanism"], row["n"]): row for row in results["flex"]["timings"]}
    assert sorted(flex) == [("dense", 12), ("dense", 24), ("t5", 12), ("t5", 24)]
    assert all(row["forward"] > 0 and "no backward" in row["note"] for row in flex.values())  # eager CPU Flex
    assert all(row["xp_difference"] < 1e-12 for row in flex.values())  # the same function as the xp algorithm
    line = next(line for line in table.splitlines() if line.startswith("| t5 | float64 | 24 |"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    ours = next(row for row in results["xp"] if row["mechanism"] == "t5" and row["n"] == 24)
    assert float(cells[5]) == pytest.approx(1e3 * flex["t5", 24]["forward"], rel=1e-3)
    assert float(cells[6]) == pytest.approx(ours["forward"] / flex["t5", 24]["forward"], rel=1e-2)
    line = next(line for line in table.splitlines() if line.startswith("| differential | float64 | 24 |"))
    assert [cell.strip() for cell in line.strip("|").split("|")][5:7] == ["", ""]
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
    assert float(line.strip("|").split("|")[12]) == pytest.approx(row["numba_forward"] / row["forward"], rel=1e-2)


def test_every_flex_expression_computes_its_mechanism(gpu_check):
    """Each Flex expression, eager on the CPU, against refattn's reference (the expected values) in float64."""
    torch = pytest.importorskip("torch")
    rows = gpu_check.flex_check(list(gpu_check.FLEX), torch)
    assert {row["mechanism"] for row in rows} == set(gpu_check.FLEX)
    float64 = [row for row in rows if row["dtype"] == "float64"]
    assert len(float64) == 2 * len(gpu_check.FLEX)
    assert all(row["matches"] and row["error"] < 1e-12 for row in float64), float64
    # Every benchmark problem is either stated for Flex or says why not.
    assert set(gpu_check.FLEX) | set(gpu_check.FLEX_NOT_EXPRESSED) == set(gpu_check.PROBLEMS)
    assert not set(gpu_check.FLEX) & set(gpu_check.FLEX_NOT_EXPRESSED)


def test_block_masks_keep_every_block_their_mask_keeps(gpu_check):
    """At a benchmark size (the problems' own windows and blocks), no key a mask_mod keeps lies in a block the
    BlockMask skips (compiled Flex on the GPU skips those blocks; the eager check does not)."""
    torch = pytest.importorskip("torch")
    from torch.nn.attention.flex_attention import create_mask

    n = 2048
    for name, builder in gpu_check.FLEX.items():
        problem = builder(gpu_check.checked(name, "float64", n), torch, "cpu")
        if problem.mask_mod is None:
            continue
        block_mask = gpu_check.block_mask_of(torch, problem, n, "cpu")
        rows, columns = block_mask.BLOCK_SIZE
        blocks = block_mask.to_dense().bool()  # (B, H, N / rows, N / columns)
        kept_blocks = blocks.repeat_interleave(rows, dim=2).repeat_interleave(columns, dim=3)[..., :n, :n]
        kept = create_mask(problem.mask_mod, *problem.q.shape[:2], n, n, device="cpu")  # (B, H, N, N)
        assert kept.any() and not (kept & ~kept_blocks).any(), name


def test_the_check_catches_a_wrong_flex_expression_and_it_is_not_timed(gpu_check, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")

    def alibi_with_the_wrong_sign(x, torch, device):
        right = gpu_check.flex_alibi(x, torch, device)

        def score_mod(score, b, h, q_idx, kv_idx):  # score − m_h (p_j − p_i)
            return 2 * score - right.score_mod(score, b, h, q_idx, kv_idx)

        return right._replace(score_mod=score_mod)

    monkeypatch.setitem(gpu_check.FLEX, "alibi", alibi_with_the_wrong_sign)
    assert not any(row["matches"] for row in gpu_check.flex_check(["alibi"], torch))
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "alibi", "--skip-verify")
    assert results["flex"]["flex_matches"] == {"alibi": False}
    notes = {row["note"] for row in results["flex"]["timings"]}
    assert notes == {"not timed: its Flex expression does not match refattn"}
    assert all(row["forward"] is None for row in results["flex"]["timings"])
    assert "| alibi | score_mod | False |" in table


def test_flex_rows_respect_the_budget_and_the_sizes_asked(gpu_check, tmp_path):
    pytest.importorskip("torch")
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "dense", "--skip-verify", "--budget-s", "0")
    assert {row["note"] for row in results["flex"]["timings"]} == {"skipped: time budget"}
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "dense", "--skip-verify", "--flex-sizes", "24")
    assert [row["n"] for row in results["flex"]["timings"]] == [24]


def test_a_flex_call_that_raises_is_noted_and_not_tried_again(gpu_check, tmp_path, monkeypatch):
    pytest.importorskip("torch")

    def refusing_flex(*args, **kwargs):
        raise NotImplementedError("float64 is not supported\nsecond line")

    monkeypatch.setattr(gpu_check, "compiled_flex", lambda torch, device: refusing_flex)
    code, table, results = _run(gpu_check, tmp_path, "--mechanisms", "dense", "--skip-verify")
    notes = [row["note"] for row in results["flex"]["timings"]]
    assert notes == ["NotImplementedError: float64 is not supported", "not timed: Flex raised at N = 12"]
    assert "Flex: NotImplementedError: float64 is not supported" in table


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
