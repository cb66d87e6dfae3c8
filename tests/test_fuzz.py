"""refattn fuzz finds planted bugs, shrinks them, and saves cases that replay under verify.

Each planted implementation is correct but for one bug of a class the
conformance vectors are built to catch; the fuzzer must find it within a
bounded number of examples at a fixed seed, shrink it to a small problem
(the sizes reached are asserted), and save a case that fails under
``refattn verify --suite`` while the correct implementation passes it.
"""

from __future__ import annotations

import functools
import json
from unittest import mock

import numpy as np
import pytest

import refattn
from refattn import dense_attention, dense_attention_vjp
from refattn.fuzz import FUZZ_FLAG, fuzz, main
from refattn.lsh import reference as lsh_reference
from refattn.lsh.reference import lsh_attention

# --- planted bugs -----------------------------------------------------------------


def strict_causal(q, k, v, *, causal=False, causal_alignment="bottom_right", mask=None, **params):
    """Causal masking that also hides the diagonal (j < i' instead of j <= i')."""
    if causal:
        offset = k.shape[2] - q.shape[2] if causal_alignment == "bottom_right" else 0
        strict = np.arange(k.shape[2])[None, :] < np.arange(q.shape[2])[:, None] + offset
        mask = strict if mask is None else mask & strict
    return dense_attention(q, k, v, mask=mask, causal_alignment=causal_alignment, **params)


def window_off_by_one(q, k, v, *, window=None, **params):
    """A sliding window that keeps one key too many on the left."""
    if window is not None and window[0] is not None:
        window = (window[0] + 1, window[1])
    return dense_attention(q, k, v, window=window, **params)


def gqa_tiled(q, k, v, **params):
    """Query head h reads kv head h % Hkv (tiled) instead of h // (Hq / Hkv) (repeated)."""
    group = q.shape[1] // k.shape[1]
    return dense_attention(q, np.tile(k, (1, group, 1, 1)), np.tile(v, (1, group, 1, 1)), **params)


def top_left(q, k, v, *, causal_alignment="bottom_right", **params):
    """Causal masks and windows aligned top-left whatever the caller asks."""
    return dense_attention(q, k, v, causal_alignment="top_left", **params)


def _ties_reversed(buckets):
    """LSH's sort with equal buckets in descending position order (a stable sort's ties broken the other way)."""
    b, h, r, n = buckets.shape
    backwards = np.argsort(buckets.reshape(b, h, r * n)[..., ::-1], axis=-1, kind="stable")
    permutation = r * n - 1 - backwards
    return permutation, np.argsort(permutation, axis=-1, kind="stable")


def lsh_ties_reversed(qk, v, **params):
    with mock.patch.object(lsh_reference, "sort_items", _ties_reversed):
        return lsh_attention(qk, v, **params)


def _mean_of_rounds(round_out, round_lse):
    """Rounds averaged with equal weights instead of by their log-sum-exps."""
    return round_out.mean(axis=2), refattn.merge([(round_out[:, :, r], round_lse[:, :, r])
                                                   for r in range(round_lse.shape[2])])[1]  # fmt: skip


def lsh_rounds_averaged(qk, v, **params):
    with mock.patch.object(lsh_reference, "combine_rounds", _mean_of_rounds):
        return lsh_attention(qk, v, **params)


# --- found, shrunk, saved, replayed -------------------------------------------------

#: (planted bug, mechanism, correct implementation, examples allowed, seed, check of the shrunk problem).
PLANTED = {
    "strict_causal": (strict_causal, "dense", dense_attention, 100, 0,
                      lambda a: a["q"].shape[2] == a["k"].shape[2] == 1 and a["causal"]),
    "window_off_by_one": (window_off_by_one, "dense", dense_attention, 200, 0,
                          lambda a: a["q"].shape[2] == 1 and a["k"].shape[2] == 2 and a["window"][0] == 0),
    "gqa_tiled": (gqa_tiled, "dense", dense_attention, 100, 0,
                  lambda a: a["q"].shape[1] == 4 and a["k"].shape[1] == 2 and a["k"].shape[2] <= 2),
    "top_left": (top_left, "dense", dense_attention, 100, 0,
                 lambda a: a["q"].shape[2] + a["k"].shape[2] <= 3 and a["q"].shape[2] != a["k"].shape[2]),
    "lsh_ties_reversed": (lsh_ties_reversed, "lsh", lsh_attention, 100, 0,
                          lambda a: a["qk"].shape[2] <= 4 and a["qk"].shape[:2] == (1, 1)),
    "lsh_rounds_averaged": (lsh_rounds_averaged, "lsh", lsh_attention, 100, 0,
                            lambda a: a["num_hashes"] == 2 and a["qk"].shape[:2] == (1, 1) and a["qk"].shape[2] <= 4),
}  # fmt: skip


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_found_shrunk_and_saved(bug, tmp_path):
    planted, mechanism, correct, examples, seed, shrunk = PLANTED[bug]
    report = fuzz(planted, mechanism, examples=examples, seed=seed, save=tmp_path)
    assert not report.ok
    assert report.found_after <= examples
    arguments = report.counterexample.problem.arguments
    assert shrunk(arguments), report.format()
    assert report.counterexample.saved.is_file()

    replay = refattn.verify(planted, suite=tmp_path, mechanism=mechanism)
    assert not replay.ok and replay.cases[0].status == "fail"
    assert replay.cases[0].flags == (FUZZ_FLAG,)
    assert refattn.verify(correct, suite=tmp_path, mechanism=mechanism).ok


def test_found_bug_report_reads_like_verify():
    report = fuzz(window_off_by_one, "dense", examples=200, seed=0)
    text = report.format()
    assert "FAILED" in text and "minimal problem:" in text
    assert "q: float64[1, 1, 1, " in text and "window = (0, None)" in text
    assert "first differing stage: out" in text and "first difference at index (0, 0, 0, 0)" in text


def test_same_seed_same_counterexample():
    first = fuzz(top_left, "dense", examples=100, seed=3)
    second = fuzz(top_left, "dense", examples=100, seed=3)
    assert first.found_after == second.found_after
    assert first.counterexample.case.id == second.counterexample.case.id


def test_correct_implementation_passes_with_gradients_in_float32():
    report = fuzz(dense_attention, "dense", vjp=dense_attention_vjp, grad=True, dtype="float32", examples=15, seed=1)
    assert report.ok, report.format()
    assert report.examples == 15


def test_gradient_bug_is_found():
    def wrong_vjp(dout, q, k, v, **params):
        grads = dense_attention_vjp(dout, q, k, v, **params)
        return {**grads, "v": 2 * grads["v"]}

    report = fuzz(dense_attention, "dense", vjp=wrong_vjp, grad=True, examples=50, seed=0)
    assert not report.ok
    assert report.counterexample.report.first_stage == "grad.v"


def test_saves_accumulate_in_one_fuzz_suite(tmp_path):
    fuzz(strict_causal, "dense", examples=100, seed=0, save=tmp_path)
    fuzz(window_off_by_one, "dense", examples=200, seed=0, save=tmp_path)
    replay = refattn.verify(dense_attention, suite=tmp_path, mechanism="dense")
    assert len(replay.cases) == 2 and replay.ok


def test_max_seconds_stops_the_run():
    report = fuzz(dense_attention, "dense", examples=10_000, seed=0, max_seconds=0.5)
    assert report.ok and report.out_of_time and report.examples < 10_000


def test_properties_catch_a_bug_without_the_oracle():
    def unnormalised(q, k, v, **params):  # weights summing to 2: out doubled, lse unchanged
        result = dense_attention(q, k, v, **params)
        return result.out * 2, result.lse

    report = fuzz(unnormalised, "dense", examples=30, seed=0, properties=True)
    assert not report.ok
    assert any(v.name == "weights_sum_to_one" for v in report.counterexample.violations)


def test_properties_pass_on_the_reference_in_bfloat16():
    report = fuzz(dense_attention, "dense", examples=10, seed=0, properties=True, dtype="bfloat16")
    assert report.ok, report.format()


# --- the command line ----------------------------------------------------------------


def test_cli_finds_and_saves(tmp_path, capsys):
    impl = f"{__file__}:window_off_by_one"
    assert main(["--impl", impl, "--mechanism", "dense", "--examples", "200", "--save", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and f"replay: refattn verify --suite {tmp_path} --mechanism dense --impl {impl}" in out
    assert main(["--backend", "numba", "--mechanism", "dense", "--examples", "5"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "numba", "--mechanism", "nope"], "mechanism"),
        (["--backend", "numba", "--mechanism", "dense", "--examples", "0"], "examples"),
        (["--backend", "numba", "--mechanism", "dense", "--examples", "-3"], "examples"),
        (["--backend", "numba", "--mechanism", "dense", "--dtype", "float8"], "dtype"),
        (["--impl", "refattn:dense_attention", "--mechanism", "dense", "--grad"], "vjp"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refattn fuzz: error:") and message in err


def test_save_refuses_a_different_suite(tmp_path, capsys):
    other = tmp_path / "other"
    fuzz(strict_causal, "dense", examples=100, seed=0, save=other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["cases"][0]["flags"] = ["BASELINE"]
    manifest["flags"] = {"BASELINE": "A suite someone else wrote."}
    (other / "manifest.json").write_text(json.dumps(manifest))
    argv = ["--backend", "numba", "--mechanism", "dense", "--examples", "1", "--save"]
    assert main([*argv, str(other)]) == 2
    assert "holds a different suite" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    assert main([*argv, str(tmp_path / "notes")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_strategy_missing_is_an_error(monkeypatch):
    from refattn.core import registry
    from refattn.strategies import problems

    mechanism = registry.get("dense")
    monkeypatch.setitem(registry._MECHANISMS, "dense", type(mechanism)(**{**mechanism.__dict__, "package": "refattn.core"}))
    with pytest.raises(refattn.SpecError, match="Hypothesis strategies"):
        problems("dense")


def test_check_raises_with_the_report():
    from refattn.fuzz import check

    with pytest.raises(AssertionError, match="first differing stage"):
        check(functools.partial(top_left), "dense", 100, seed=0)
