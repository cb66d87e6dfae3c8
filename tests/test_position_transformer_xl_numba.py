"""The Transformer-XL Numba backend against the reference, and the invariants on both backends.

Agreement is judged by the conformance tolerance policy (refattn/conformance/tolerance.py):
float64 to 1e-10 normwise; float32 within c x the reference's own float32
error (plain and jittered evaluations) plus the rounding floor. The problems
cover several query and key tiles, positions with gaps (tiles spanning more
than SPAN_MAX rows of r), more than BLOCK_R rows (several dr work items per
head), windows that leave most pairs without a row, and fully masked rows.
"""

from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn import SpecError
from refattn.conformance.tolerance import ROUNDING_TRIALS, budgets, error, sensitivities
from refattn.core.precision import jittered
from refattn.position.transformer_xl import (
    properties,
    transformer_xl_attention,
    transformer_xl_attention_vjp,
)
from refattn.position.transformer_xl.numba import BLOCK_R, SPAN_MAX

PROBLEMS = {
    # name: (b, hq, hkv, nq, nk, d, positions, rows, options)
    "memory_softcap_bias_dropout": (2, 4, 2, 70, 150, 8, "memory", 150, dict(softcap=1.0, bias=True, dropout=True)),
    "gaps_and_mask": (1, 2, 1, 80, 80, 8, "gaps", None, dict(mask=True)),
    "more_rows_than_a_row_block": (1, 2, 2, 20, 300, 8, "memory", BLOCK_R + 44, {}),
    "window_with_five_rows": (2, 2, 2, 90, 90, 16, "memory", 5, dict(window=(4, 0))),
    "queries_after_keys": (1, 3, 1, 9, 70, 8, "after", 79, dict(causal=False, scale=0.3)),
    "more_queries_than_keys": (1, 2, 2, 70, 20, 8, "memory", 20, {}),
    "decode_single_query": (1, 4, 1, 1, 200, 8, "memory", 200, {}),
}


def _problem(name, seed=0):
    b, hq, hkv, nq, nk, d, layout, rows, options = PROBLEMS[name]
    rng = np.random.default_rng(seed)
    if layout == "memory":  # the original: queries at the last Nq key positions
        q_positions, k_positions = np.arange(nk - nq, nk), np.arange(nk)
    elif layout == "after":
        q_positions, k_positions = nk + np.arange(nq), np.arange(nk)
    else:  # keys 0, 2, 5, 7, 10, ... and queries at the last Nq of them
        k_positions = np.cumsum(np.resize([2, 3], nk)) - 2
        q_positions = k_positions[-nq:]
    rows = rows or int(q_positions.max() - k_positions.min()) + 1
    q = rng.standard_normal((b, hq, nq, d))
    k, v = rng.standard_normal((b, hkv, nk, d)), rng.standard_normal((b, hkv, nk, 5))
    params = dict(
        r=rng.standard_normal((hq, rows, d)),
        u=rng.standard_normal((hq, d)),
        v_bias=rng.standard_normal((hq, d)),
        q_positions=q_positions,
        k_positions=k_positions,
        causal=options.get("causal", True),
        softcap=options.get("softcap", 0.0),
        window=options.get("window"),
        scale=options.get("scale"),
    )
    if options.get("bias"):
        params["bias"] = rng.standard_normal((1, hq, 1, nk))
    if options.get("mask"):
        params["mask"] = rng.random((b, 1, nq, nk)) < 0.7
    if options.get("dropout"):
        params.update(dropout_p=0.2, dropout_keep=rng.random((b, hq, nq, nk)) >= 0.2)
    return q, k, v, params, rng


DIFFERENTIABLE = ("r", "u", "v_bias", "bias")


def _cast(params, dtype):
    """The float tables and bias in ``dtype``; positions and masks as they are."""
    cast = {name: params[name].astype(dtype) for name in DIFFERENTIABLE if params.get(name) is not None}
    return params | cast


def _outputs(result, grads):
    return {"out": result.out, "lse": result.lse, **{f"grad.{name}": value for name, value in grads.items()}}


def _reference_outputs(q, k, v, dout, dlse, params, precision):
    result = transformer_xl_attention(q, k, v, **params, precision=precision)
    return _outputs(result, transformer_xl_attention_vjp(dout, q, k, v, dlse=dlse, **params, precision=precision))


def test_problems_reach_the_kernel_paths():
    _, _, _, gaps, _ = _problem("gaps_and_mask")
    spread = gaps["q_positions"][63] - gaps["k_positions"][0] - (gaps["q_positions"][0] - gaps["k_positions"][63])
    assert spread + 1 > SPAN_MAX  # the first tile reads more rows than one gathered product holds
    assert PROBLEMS["more_rows_than_a_row_block"][7] > BLOCK_R


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_numba_matches_reference(name, precision):
    q, k, v, params, rng = _problem(name)
    exact = transformer_xl_attention(q, k, v, **params)
    dout = rng.standard_normal(exact.out.shape)
    dlse = np.where(np.isfinite(exact.lse), rng.standard_normal(exact.lse.shape), 0.0)
    exact_grads = transformer_xl_attention_vjp(dout, q, k, v, dlse=dlse, **params)
    want = _outputs(exact, exact_grads)

    cast, cast_params = [x.astype(precision) for x in (q, k, v)], _cast(params, precision)
    fast = transformer_xl_attention(*cast, **cast_params, backend="numba")
    fast_grads = transformer_xl_attention_vjp(
        dout.astype(precision), *cast, dlse=dlse.astype(precision), **cast_params, backend="numba"
    )
    assert fast.out.dtype == np.dtype(precision) and fast_grads.r.dtype == np.dtype(precision)
    got = _outputs(fast, fast_grads)
    assert set(got) == set(want)

    emulated = []
    if precision != "float64":
        trials = [precision] + [jittered(precision, seed) for seed in range(ROUNDING_TRIALS)]
        emulated = [_reference_outputs(q, k, v, dout, dlse, params, p) for p in trials]
    arguments = {"q": q, "k": k, "v": v, **params}
    sensitivity = sensitivities(transformer_xl_attention_vjp, arguments, dout, exact, exact_grads)
    for name_ in want:
        at_precision = {precision: [e[name_] for e in emulated]} if emulated else {}
        allowed = budgets(name_, want[name_], at_precision, sensitivity.get(name_, 0.0))[precision]
        found = error(name_, got[name_], want[name_])
        assert found <= allowed, f"{name_}: error {found:.3e} > budget {allowed:.3e} ({precision})"


UNMASKED_PAIRS_WITHOUT_A_ROW = [
    dict(causal=False, window=None),  # negative distances
    dict(window=(6, 0)),  # distances up to 5 with rows for 0 ... 3
    dict(mask=np.ones((3, 6), bool), window=(None, 1)),
]


@pytest.mark.parametrize("overrides", UNMASKED_PAIRS_WITHOUT_A_ROW)
def test_numba_rejects_unmasked_pairs_without_a_row_as_the_reference_does(overrides):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 6, 4)), rng.standard_normal((1, 2, 6, 4))
    params = dict(r=rng.standard_normal((2, 4, 4)), u=np.zeros((2, 4)), v_bias=np.zeros((2, 4)),
                  q_positions=np.arange(3, 6), k_positions=np.arange(6), causal=True, window=(3, 0))  # fmt: skip
    params |= overrides
    errors = []
    for backend in ("reference", "numba"):
        with pytest.raises(SpecError) as info:
            transformer_xl_attention(q, k, v, **params, backend=backend)
        errors.append(str(info.value))
        with pytest.raises(SpecError):
            transformer_xl_attention_vjp(np.zeros((1, 2, 3, 4)), q, k, v, **params, backend=backend)
    assert errors[0] == errors[1] and "argument `r`" in errors[0]


# --------------------------------------------------------------------------
# Invariants (refattn.position.transformer_xl.properties) on both backends.
# --------------------------------------------------------------------------


@st.composite
def original_problems(draw):
    """Problems in the original's setup (causal, memory, R = Nk), GQA and a bias sometimes."""
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]))
    nq = draw(st.integers(1, 9))
    nk = nq + draw(st.integers(0, 9))
    b, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    params = dict(
        r=rng.standard_normal((hq, nk, d)),
        u=rng.standard_normal((hq, d)),
        v_bias=rng.standard_normal((hq, d)),
        q_positions=np.arange(nk - nq, nk),
        k_positions=np.arange(nk),
        causal=True,
    )
    if draw(st.booleans()):
        params["bias"] = rng.standard_normal((hq, 1, nk))
    q, k, v = (rng.standard_normal(shape) for shape in ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, 2)))
    return q, k, v, params


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("prop", properties.ALL, ids=lambda prop: prop.__name__)
@given(problem=original_problems())
def test_invariants(prop, backend, problem):
    q, k, v, params = problem
    prop(partial(transformer_xl_attention, backend=backend), q, k, v, params)


def test_saved_forward_gives_the_gradients_of_the_stateless_vjp():
    q, k, v, params, rng = _problem("memory_softcap_bias_dropout")
    dout = rng.standard_normal(q.shape[:3] + (v.shape[3],))
    saved = transformer_xl_attention(q, k, v, **params, backend="numba")
    stateless = transformer_xl_attention_vjp(dout, q, k, v, **params, backend="numba")
    reused = transformer_xl_attention_vjp(dout, q, k, v, **params, saved=saved, backend="numba")
    for name in stateless:
        np.testing.assert_array_equal(reused[name], stateless[name], err_msg=name)
