"""The LSH Numba backend against the reference, and against the LSH conformance suite.

Agreement is judged by the conformance tolerance policy
(refattn/conformance/tolerance.py): float64 to 1e-10 normwise (or the
policy's floor where |lse| reaches 1e9 and more: trax's padded rows);
float32 within c x the reference's own float32 error (plain and jittered
evaluations) plus the rounding floor. Buckets and permutations must be equal.
Random problems draw ``qk`` with bucket margins (refattn/lsh/cases.py), so
float32 hashing must reproduce the float64 buckets. Problems run with the
default runs or with one chunk per run (``RUN_ROWS = 1``), so that many
runs, their tiles and the colouring of the backward are exercised at small
sizes.
"""

import contextlib
import dataclasses
import functools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import SpecError
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.tolerance import ROUNDING_TRIALS, budgets, error, sensitivities
from refattn.conformance.verify import verify
from refattn.core import registry
from refattn.core.precision import jittered
from refattn.lsh import PRESETS, lsh_attention, lsh_attention_vjp
from refattn.lsh import numba as kernels
from refattn.lsh.cases import cases, draw_qk


@contextlib.contextmanager
def run_rows(rows):
    """Cut the chunks into runs of about ``rows`` items (1: one chunk per run, or before + after)."""
    saved = kernels.RUN_ROWS
    kernels.RUN_ROWS = rows
    try:
        yield
    finally:
        kernels.RUN_ROWS = saved


def _outputs(result, grads):
    return {"out": result.out, "lse": result.lse, **{f"grad.{name}": value for name, value in grads.items()}}


def check_numba_agreement(qk, v, params, precision, seed):
    """The numba backend in ``precision`` against the float64 reference, within the conformance budgets;
    integer intermediates equal."""
    rng = np.random.default_rng(seed)
    exact = lsh_attention(qk, v, **params)
    dout = rng.standard_normal(exact.out.shape)
    dlse = np.where(np.isfinite(exact.lse), rng.standard_normal(exact.lse.shape), 0.0)
    exact_grads = lsh_attention_vjp(dout, qk, v, dlse=dlse, **params)
    want = _outputs(exact, exact_grads)

    cast = {"rotations": params["rotations"].astype(precision)}  # as the verifier casts float arrays
    fast = lsh_attention(qk.astype(precision), v.astype(precision), **params | cast, backend="numba")
    fast_grads = lsh_attention_vjp(dout.astype(precision), qk.astype(precision), v.astype(precision),
                                   dlse=dlse.astype(precision), **params | cast, backend="numba")  # fmt: skip
    assert fast.out.dtype == np.dtype(precision) and fast_grads.qk.dtype == np.dtype(precision)
    assert set(fast.aux) == set(exact.aux)
    for name in exact.aux:
        np.testing.assert_array_equal(fast.aux[name], exact.aux[name], err_msg=name)
    got = _outputs(fast, fast_grads)

    emulated = {}
    if precision != "float64":
        trials = [precision] + [jittered(precision, seed + trial) for trial in range(ROUNDING_TRIALS)]
        evaluations = [
            _outputs(lsh_attention(qk, v, **params, precision=p), lsh_attention_vjp(dout, qk, v, dlse=dlse, **params, precision=p))
            for p in trials
        ]
        emulated = {name: {precision: [e[name] for e in evaluations]} for name in want}
    sensitivity = sensitivities(lsh_attention_vjp, {"qk": qk, "v": v, **params}, dout, exact, exact_grads)
    for name in want:
        allowed = budgets(name, want[name], emulated.get(name, {}), sensitivity.get(name, 0.0))[precision]
        found = error(name, got[name], want[name])
        assert found <= allowed, f"{name}: error {found:.3e} > budget {allowed:.3e} ({precision})"


# --------------------------------------------------------------------------
# Random problems, per preset.
# --------------------------------------------------------------------------


@st.composite
def lsh_problems(draw, preset):
    """A problem the preset accepts (its length rule), with random overrides of the preset's values."""
    b, h, d, dv = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(4, 8)), draw(st.integers(1, 5))
    num_hashes, chunk_len = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    short_allowed = PRESETS[preset].short_sequence == "full"
    if short_allowed and draw(st.booleans()):
        n = draw(st.integers(1, chunk_len))  # the short-sequence path: no length rule
    elif PRESETS[preset].length_rule == "double_chunk":
        n = 2 * chunk_len * draw(st.integers(1, 3))
    elif PRESETS[preset].length_rule == "rounds_multiple":
        n = chunk_len * draw(st.integers(1, 5))
    else:
        n = draw(st.integers(1, 40))
    num_buckets = draw(st.sampled_from([2, 4, 6, [2, 2], [4, 2]]))
    half = sum(num_buckets if isinstance(num_buckets, list) else [num_buckets]) // 2
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rotations = rng.standard_normal(((b,) if draw(st.booleans()) else ()) + (h, num_hashes, d, half))
    params = dict(rotations=rotations, num_buckets=num_buckets, num_hashes=num_hashes, chunk_len=chunk_len, preset=preset,
                  causal=draw(st.booleans()))  # fmt: skip
    if draw(st.booleans()):
        params["key_padding_mask"] = rng.random((b, n)) < 0.7
    overrides = {
        "num_chunks_before": st.integers(0, 2),
        "num_chunks_after": st.integers(0, 2),
        "dup_correction": st.booleans(),
        "mask_mode": st.sampled_from(["replace", "add"]),
        "mask_value": st.sampled_from([None, -1e9]),
    }
    for name in draw(st.sets(st.sampled_from(sorted(overrides)), max_size=3)):
        params[name] = draw(overrides[name])
    if params.get("mask_mode") == "add" and "mask_value" not in params and preset == "lucidrains":
        params["mask_value"] = -1e9  # -finfo(float32).max added to a score leaves float32's range
    qk = draw_qk(rng, rotations, num_buckets, (b, h, n, d), std=draw(st.sampled_from([0.5, 1.0, 3.0])))
    return qk, rng.standard_normal((b, h, n, dv)), params


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("preset", [None, "hf", "trax", "lucidrains"])
@given(data=st.data(), rows=st.sampled_from([1, kernels.RUN_ROWS]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(preset, precision, data, rows, seed):
    qk, v, params = data.draw(lsh_problems(preset))
    with run_rows(rows):
        check_numba_agreement(qk, v, params, precision, seed)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_long_sequence_with_many_runs(precision):
    """N = 700, 3 rounds, chunks of 16, one chunk before and one after: 132 chunks in 17 runs of 8 (by
    RUN_ROWS), so both colours and the last two runs' own calls of the backward carry real work."""
    rng = np.random.default_rng(3)
    rotations = rng.standard_normal((2, 3, 16, 8))
    qk = draw_qk(rng, rotations, [4, 12], (1, 2, 700, 16))
    params = dict(rotations=rotations, num_buckets=[4, 12], num_hashes=3, chunk_len=16, num_chunks_after=1, causal=True,
                  key_padding_mask=rng.random((1, 700)) < 0.9)  # fmt: skip
    with run_rows(128):
        check_numba_agreement(qk, rng.standard_normal((1, 2, 700, 8)), params, precision, 4)


def test_bucket_ids_beyond_the_counting_sort_use_the_merge_sort():
    """[32, 32] buckets over 2 rounds of 10 tokens: 2048 ids for 20 items, sorted by merge sort, stable."""
    rng = np.random.default_rng(5)
    rotations = rng.standard_normal((2, 2, 6, 32))
    assert 2 * 32 * 32 > kernels.COUNTING_SORT_RATIO * 2 * 10
    params = dict(rotations=rotations, num_buckets=[32, 32], num_hashes=2, chunk_len=4)
    qk = np.repeat(draw_qk(rng, rotations, [32, 32], (1, 2, 5, 6)), 2, axis=2)  # equal tokens: equal buckets
    check_numba_agreement(qk, rng.standard_normal((1, 2, 10, 3)), params, "float64", 6)


# --------------------------------------------------------------------------
# The conformance suite, as a user's kernel would be checked.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lsh_suite")
    export(folder, mechanisms=["lsh"])
    return load_suite(folder)


def shared_qk(suite):
    """The suite with each case's ``qk`` given as ``q`` and ``k`` (tests/test_lsh_flags.py's presentation)."""
    cases_ = [dataclasses.replace(c, inputs={"q": c.inputs["qk"], "k": c.inputs["qk"], "v": c.inputs["v"]}) for c in suite.cases]
    return dataclasses.replace(suite, cases=cases_)


numba_lsh = functools.partial(lsh_attention, backend="numba")
numba_lsh_vjp = functools.partial(lsh_attention_vjp, backend="numba")


def numba_lsh_q_k(v, *, q, k, **params):
    """verify() passes the mechanism's positional inputs present (``v``) by position, ``q`` and ``k`` by name."""
    return numba_lsh(q, v, **params)


def numba_lsh_q_k_vjp(dout, v, *, q, k, dlse=None, **params):
    return numba_lsh_vjp(dout, q, v, dlse=dlse, **params)  # grads of qk and v, as stored


def _check_report(report):
    assert len(report.cases) == len(cases())  # every case of refattn/lsh/cases.py was run
    assert report.ok, report.format()
    assert all(check.status == "pass" for case in report.cases for check in case.checks if check.name.startswith("aux."))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_every_conformance_case_passes(suite, dtype):
    """As ``refattn verify --mechanism lsh`` runs the public function with ``backend="numba"``: impl(qk, v)."""
    _check_report(verify(numba_lsh, vjp=numba_lsh_vjp, suite=suite, dtype=dtype, grad=True))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_conformance_case_passes_with_q_and_k_given_as_qk(suite, dtype):
    _check_report(verify(numba_lsh_q_k, vjp=numba_lsh_q_k_vjp, suite=shared_qk(suite), dtype=dtype, grad=True))


# --------------------------------------------------------------------------
# Pieces, dtypes, dispatch.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_chunks", range(1, 40))
@pytest.mark.parametrize("before, after", [(0, 0), (1, 0), (0, 1), (1, 1), (2, 1), (3, 2)])
def test_runs_of_one_colour_share_no_chunk(num_chunks, before, after):
    """The race-freedom of the backward: within a colour, no chunk is touched by two runs."""
    for run_len in {max(s, before + after, 1) for s in (1, 2, 3, 8)}:
        num_runs = -(-num_chunks // run_len)
        colours = kernels._run_colours(num_runs)
        assert sorted(np.concatenate(colours).tolist()) == list(range(num_runs))
        for colour in colours:
            touched = [
                {c % num_chunks for c in range(run * run_len - before, min((run + 1) * run_len, num_chunks) + after)}
                for run in colour
            ]
            assert sum(len(t) for t in touched) == len(set().union(*touched)), (run_len, colour.tolist())


def test_rounds_and_dtypes():
    rng = np.random.default_rng(7)
    rotations = rng.standard_normal((2, 3, 5, 2))
    qk, v = draw_qk(rng, rotations, 4, (2, 2, 18, 5)), rng.standard_normal((2, 2, 18, 3))
    params = dict(rotations=rotations, num_buckets=4, num_hashes=3, chunk_len=4, causal=True, dup_correction=True)
    want = lsh_attention(qk, v, **params, return_rounds=True)
    got = lsh_attention(qk, v, **params, return_rounds=True, backend="numba")
    for name in ("round_out", "round_lse"):
        assert got.aux[name].shape == want.aux[name].shape and error(name, got.aux[name], want.aux[name]) < 1e-12
    for dtype, compute in ((np.float16, np.float32), (ml_dtypes.bfloat16, np.float32), (np.int64, np.float64)):
        low = lsh_attention((4 * qk).astype(dtype), v.astype(dtype), **params, backend="numba")
        assert low.out.dtype == compute and low.lse.dtype == compute


def test_short_sequence_has_no_buckets():
    rng = np.random.default_rng(8)
    rotations = rng.standard_normal((1, 4, 6, 2))
    qk, v = rng.standard_normal((1, 1, 12, 6)), rng.standard_normal((1, 1, 12, 6))
    params = dict(rotations=rotations, num_buckets=4, num_hashes=4, chunk_len=16, preset="hf")
    got = lsh_attention(qk, v, **params, backend="numba")
    assert got.aux == {}
    assert error("out", got.out, lsh_attention(qk, v, **params).out) < 1e-13


def test_dispatch_and_bad_input():
    assert registry.get("lsh").backends == ("reference", "numba", "cupy")
    rng = np.random.default_rng(9)
    qk, v, rotations = rng.standard_normal((1, 2, 8, 4)), rng.standard_normal((1, 2, 8, 4)), rng.standard_normal((2, 1, 4, 2))
    params = dict(rotations=rotations, num_buckets=4, num_hashes=1, chunk_len=4)
    with pytest.raises(SpecError, match="precision"):
        lsh_attention(qk, v, **params, precision="float32", backend="numba")
    for bad, name in ((dict(num_buckets=3), "num_buckets"), (dict(preset="hf", chunk_len=3), "chunk_len"),
                      (dict(rotations=rotations[:, :, :3]), "rotations")):  # fmt: skip
        with pytest.raises(SpecError, match=name):
            numba_lsh(qk, v, **params | bad)
        with pytest.raises(SpecError, match=name):
            numba_lsh_vjp(v, qk, v, **params | bad)
    with pytest.raises(SpecError, match="dout"):
        numba_lsh_vjp(v[:, :, :4], qk, v, **params)


def test_vjp_reuses_the_saved_forward():
    """Given the forward it returned (``saved``), the kernel's VJP skips recomputing out and lse: same gradients."""
    rng = np.random.default_rng(10)
    rotations = rng.standard_normal((2, 2, 6, 3))
    qk, v = draw_qk(rng, rotations, 6, (1, 2, 20, 6)), rng.standard_normal((1, 2, 20, 4))
    params = dict(rotations=rotations, num_buckets=6, num_hashes=2, chunk_len=4, causal=True, dup_correction=True)
    dout, dlse = rng.standard_normal((1, 2, 20, 4)), rng.standard_normal((1, 2, 20))
    saved = numba_lsh(qk, v, **params)
    recomputed = numba_lsh_vjp(dout, qk, v, dlse=dlse, **params)
    reused = numba_lsh_vjp(dout, qk, v, dlse=dlse, saved=saved, **params)
    for name in ("qk", "v"):
        np.testing.assert_array_equal(reused[name], recomputed[name], err_msg=name)
