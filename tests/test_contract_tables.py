"""The contract tables (issue 12, part 6): written once, from the docstrings and the manifest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from refattn.cli import main
from refattn.conformance import contract

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "conformance"


def _rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| role")]  # fmt: skip


def test_readme_carries_the_current_tables():
    readme = (SUITE / "README.md").read_text(encoding="utf-8")
    assert contract.BEGIN in readme and contract.END in readme
    assert contract.readme_with_tables(readme, SUITE) == readme, (
        "conformance/README.md's contract tables are stale: run python -m refattn.conformance.contract"
    )


def test_dense_table_lists_inputs_in_order_and_compares_floats_by_budget():
    rows = _rows(contract.contract_table("dense", SUITE))
    inputs = [row[1] for row in rows if row[0] == "input (positional)"]
    assert inputs == ["q", "k", "v"]
    assert ["input (positional)", "k", "ndarray (B, Hkv, Nk, D)"] == rows[1][:3]
    outputs = {row[1]: row for row in rows if row[0] == "output"}
    assert set(outputs) == {"out", "lse"}
    assert outputs["lse"][2] == "(B, Hq, Nq)"
    assert all(row[5] == contract.COMPARED_FLOAT for row in outputs.values())
    mask = next(row for row in rows if row[1] == "mask")
    assert mask[0] == "array parameter" and mask[3] == "bool"


def test_discrete_aux_is_compared_exactly_and_routing_has_no_lse():
    lsh = {row[1]: row for row in _rows(contract.contract_table("lsh", SUITE)) if row[0] == "aux"}
    assert set(lsh) == {"buckets", "permutation"}
    assert all(row[3] == "int64" and row[5] == contract.COMPARED_EXACT for row in lsh.values())
    assert lsh["buckets"][2] == "(B, H, R, N)"
    routing = _rows(contract.contract_table("routing", SUITE))
    assert [row[1] for row in routing if row[0] == "output"] == ["out"]
    slot_lse = next(row for row in routing if row[1] == "slot_lse")
    assert slot_lse[5] == contract.COMPARED_FLOAT  # a float aux has a budget


def test_preset_parameters_say_where_their_default_comes_from():
    rows = {row[1]: row for row in _rows(contract.contract_table("lsh", SUITE))}
    assert rows["dup_count"][2].endswith("default from the preset")
    assert rows["causal"][2] == "bool, default False"


def test_parameter_docs_split_shared_lines():
    doc = """Summary.

    Parameters
    ----------
    q, k, v : ndarray (B, H, N, D), (B, H, N, D), (B, H, N, Dv)
    alpha, beta,
    gamma
        Shared text. Second sentence.
    window : int
        Keys per side.

    Returns
    -------
    Result
    """
    docs = contract._parameter_docs(doc)
    assert docs["v"] == ("ndarray (B, H, N, Dv)", "")
    assert docs["gamma"] == ("", "Shared text.")
    assert docs["window"] == ("int", "Keys per side.")


def test_cli_prints_one_table_and_refuses_unknown_names(capsys):
    assert main(["mechanisms", "--contract", "t5"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^### `(\w+)`", out, re.M) == ["t5"]
    assert main(["mechanisms", "--contract", "nope"]) == 2
