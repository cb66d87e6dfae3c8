"""The Numba kernel's distance-bias hook (refattn/dense/numba.py) and the ALiBi
and T5 Numba backends built on it.

``attention_with_distance_bias`` adds ``distance_table[h, k_pos[j] - q_pos[i]
- d_min]`` to every logit, read tile by tile. The expected values come from
the dense *reference* given that bias explicitly as an (Hq, Nq, Nk) array,
built in this file by a loop over (i, j) from the positions; the expected
gradient of the distance table is the reference's bias gradient summed, by
another loop, over the (b, i, j) of each distance. Float64 must agree to the
conformance tolerance 1e-10 normwise; float32 within the conformance policy's
budgets (c x the float32 reference's own error, plain and jittered, plus the
rounding floor with its sensitivities: refattn/conformance/tolerance.py).

Sizes are awkward on purpose: D = 59, lengths 67 and 130 that are not
multiples of the 64-row tiles, Nq != Nk with query positions offset as in
cached decoding, one query, positions scattered with gaps and repeats.
"""

from __future__ import annotations

import inspect
import tracemalloc
from functools import partial

import numba
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refattn import SpecError, dense_attention, dense_attention_vjp
from refattn.conformance.tolerance import ROUNDING_TRIALS, budgets, error, sensitivities
from refattn.core.precision import jittered
from refattn.core.results import Cotangents
from refattn.dense import numba as kernels
from refattn.dense.inputs import check_dense_inputs
from refattn.position.alibi import numba as alibi_numba
from refattn.position.alibi import reference as alibi_reference
from refattn.position.t5 import numba as t5_numba
from refattn.position.t5 import reference as t5_reference
from refattn.strategies import Problem, dense_problems

FLOAT64_TOL = 1e-10

#: dense_attention's keyword arguments and their defaults.
DENSE_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(dense_attention).parameters.items()
    if parameter.kind == parameter.KEYWORD_ONLY and name not in ("precision", "backend")
}


# --------------------------------------------------------------------------
# The hook takes checked dense inputs and cotangents.
# --------------------------------------------------------------------------


def hooked(q, k, v, *, distance_table, d_min, q_positions, k_positions, **params):
    """The hook's forward on the dense problem (q, k, v, params)."""
    x = check_dense_inputs(q, k, v, **(DENSE_DEFAULTS | params))
    return kernels.attention_with_distance_bias(
        x, distance_table=distance_table, d_min=d_min, q_positions=q_positions, k_positions=k_positions
    )


def hooked_vjp(dout, q, k, v, *, dlse=None, distance_table, d_min, q_positions, k_positions, **params):
    """The hook's VJP on the dense problem (q, k, v, params): (grads, d_distance_table)."""
    x = check_dense_inputs(q, k, v, **(DENSE_DEFAULTS | params))
    return kernels.attention_with_distance_bias_vjp(
        x, Cotangents(dout=dout, dlse=dlse), distance_table=distance_table, d_min=d_min, q_positions=q_positions,
        k_positions=k_positions,
    )  # fmt: skip


# --------------------------------------------------------------------------
# The expected values: an explicit bias, and its gradient by distance.
# --------------------------------------------------------------------------


def explicit_bias(table, d_min, q_positions, k_positions):
    """bias[h, i, j] = table[h, k_positions[j] - q_positions[i] - d_min], (Hq, Nq, Nk), by a loop."""
    bias = np.empty((table.shape[0], q_positions.size, k_positions.size))
    for i, q_position in enumerate(q_positions):
        for j, k_position in enumerate(k_positions):
            bias[:, i, j] = table[:, k_position - q_position - d_min]
    return bias


def by_distance(dbias, d_min, n_distances, q_positions, k_positions):
    """(..., Hq, Nq, Nk) bias gradient -> (Hq, Nd): summed over the leading axes and over the (i, j) of each
    distance, by a loop."""
    per_head = dbias.reshape(-1, *dbias.shape[-3:]).sum(axis=0)  # (Hq, Nq, Nk)
    table = np.zeros((per_head.shape[0], n_distances))
    for i, q_position in enumerate(q_positions):
        for j, k_position in enumerate(k_positions):
            table[:, k_position - q_position - d_min] += per_head[:, i, j]
    return table


def positions(kind, nq, nk, rng):
    """(q_positions, k_positions) of one kind."""
    if kind == "aligned":
        return np.arange(nq), np.arange(nk)
    if kind == "cached_decoding":  # the queries are the last nq of nk + 3 tokens, the keys the first nk
        return nk + 3 - nq + np.arange(nq), np.arange(nk)
    if kind == "packed":  # two documents in one row, positions restarting at 0 halfway
        return tuple(np.concatenate([np.arange(n - n // 2), np.arange(n // 2)]) for n in (nq, nk))
    if kind == "scattered":  # unsorted, with gaps and repeats
        return rng.integers(0, 3 * nq, nq), rng.integers(0, 2 * nk, nk)
    raise AssertionError(kind)


# name: ((B, Hq, Hkv, Nq, Nk, D, Dv), positions, params or a function rng -> params)
SHAPE = (2, 2, 1, 67, 130, 59, 40)
CASES = {
    "aligned": ((1, 2, 2, 67, 67, 16, 16), "aligned", {}),
    "causal_cached_decoding": (SHAPE, "cached_decoding", {"causal": True}),
    "one_query_decoding": ((1, 4, 2, 1, 130, 16, 16), "cached_decoding", {"causal": True}),
    "nq_gt_nk_causal_top_left": ((1, 2, 1, 130, 67, 16, 16), "aligned", {"causal": True, "causal_alignment": "top_left"}),
    "gqa_window_mask": (
        (2, 8, 2, 67, 130, 16, 24),
        "cached_decoding",
        lambda rng: {"window": (20, 5), "mask": rng.random((2, 1, 67, 130)) < 0.9},
    ),
    "packed_user_bias": (SHAPE, "packed", lambda rng: {"bias": rng.standard_normal((1, 2, 1, 130)), "causal": True}),
    "scattered_softcap_dropout": (
        SHAPE,
        "scattered",
        lambda rng: {"softcap": 5.0, "dropout_keep": rng.random((2, 2, 67, 130)) >= 0.3, "dropout_p": 0.3},
    ),
}
FLOAT32_CASES = ["aligned", "causal_cached_decoding", "gqa_window_mask", "packed_user_bias", "scattered_softcap_dropout"]


def make_case(name, seed=0):
    """Inputs, cotangents, hook arguments and dense parameters of one case, float64."""
    (b, hq, hkv, nq, nk, d, dv), kind, params = CASES[name]
    rng = np.random.default_rng(seed)
    qkv = tuple(rng.standard_normal(shape) for shape in ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, dv)))
    dout = rng.standard_normal((b, hq, nq, dv))
    dlse = rng.standard_normal((b, hq, nq))
    q_positions, k_positions = positions(kind, nq, nk, rng)
    d_min, n_distances = kernels.distance_range(q_positions, k_positions)
    table = rng.standard_normal((hq, n_distances))
    hook = dict(distance_table=table, d_min=d_min, q_positions=q_positions, k_positions=k_positions)
    params = params(rng) if callable(params) else params
    return qkv, dout, dlse, hook, params


def with_explicit_bias(hook, params):
    """The dense parameters with the hook's bias made explicit, the user bias (if any) added to it."""
    position_bias = explicit_bias(hook["distance_table"], hook["d_min"], hook["q_positions"], hook["k_positions"])
    user_bias = params.get("bias")
    return {**params, "bias": position_bias if user_bias is None else position_bias + user_bias}


def summed_to(x, shape):
    """``x`` summed over the axes along which ``shape`` broadcasts to it, in ``shape``."""
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    own = (1,) * (4 - len(shape)) + tuple(shape)
    axes = tuple(axis for axis in range(4) if own[axis] == 1 and x.shape[axis] > 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape)


def expected_forward(qkv, hook, params, precision=None):
    return dense_attention(*qkv, **with_explicit_bias(hook, params), precision=precision)


def expected_grads(dout, q, k, v, *, dlse=None, hook, params, precision=None):
    """The hook's gradients, from the dense reference over the explicit bias:
    q, k, v, the user's bias (if any) and ``distance_table``."""
    grads = dense_attention_vjp(dout, q, k, v, dlse=dlse, **with_explicit_bias(hook, params), precision=precision)
    dbias = grads.pop("bias")  # the explicit bias's own shape, (Hq, Nq, Nk) or (1, Hq, Nq, Nk): summed over b
    n_distances = hook["distance_table"].shape[1]
    grads["distance_table"] = by_distance(dbias, hook["d_min"], n_distances, hook["q_positions"], hook["k_positions"])
    if params.get("bias") is not None:
        grads["bias"] = summed_to(dbias, params["bias"].shape)
    return grads


def hook_grads(dout, q, k, v, *, dlse=None, hook, params):
    """The hook's gradients as one dict, the table's under ``distance_table``."""
    grads, d_table = hooked_vjp(dout, q, k, v, dlse=dlse, **hook, **params)
    return {**grads, "distance_table": d_table}


def named(result, grads, with_dlse):
    label = "dlse." if with_dlse else ""
    return {"out": result.out, "lse": result.lse, **{f"{label}grad.{name}": x for name, x in grads.items()}}


def both(qkv, dout, dlse, hook, params):
    """{output: (hook's value, expected value)} for the forward and the VJP with and without dlse."""
    pairs = {}
    for cotangent in (None, dlse):
        fast = named(
            hooked(*qkv, **hook, **params),
            hook_grads(dout, *qkv, dlse=cotangent, hook=hook, params=params),
            cotangent is not None,
        )
        want = named(
            expected_forward(qkv, hook, params),
            expected_grads(dout, *qkv, dlse=cotangent, hook=hook, params=params),
            cotangent is not None,
        )
        assert set(fast) == set(want)
        pairs.update({name: (fast[name], want[name]) for name in want})
    return pairs


# --------------------------------------------------------------------------
# The hook against the dense reference with the bias made explicit.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_matches_the_explicit_bias(name):
    qkv, dout, dlse, hook, params = make_case(name)
    for output, (got, want) in both(qkv, dout, dlse, hook, params).items():
        assert got.dtype == np.float64 and got.shape == want.shape, output
        found = error(output, got, want)
        assert found <= FLOAT64_TOL, f"{name} {output}: normwise error {found:.3e} > {FLOAT64_TOL}"


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_within_the_conformance_budgets(name):
    qkv, dout, dlse, hook, params = make_case(name, seed=1)
    q, k, v = qkv
    exact = expected_forward(qkv, hook, params)
    exact_grads = expected_grads(dout, q, k, v, dlse=dlse, hook=hook, params=params)
    want = named(exact, exact_grads, False)  # the VJP with dlse, under plain names

    cast = tuple(x.astype(np.float32) for x in qkv)
    fast = hooked(*cast, **hook, **params)
    fast_grads = hook_grads(dout.astype(np.float32), *cast, dlse=dlse.astype(np.float32), hook=hook, params=params)
    got = named(fast, fast_grads, False)
    assert fast.out.dtype == np.float32 and set(got) == set(want)

    emulated = []
    for precision in ["float32"] + [jittered("float32", trial) for trial in range(ROUNDING_TRIALS)]:
        result = expected_forward(qkv, hook, params, precision)
        grads = expected_grads(dout, q, k, v, dlse=dlse, hook=hook, params=params, precision=precision)
        emulated.append(named(result, grads, False))

    def vjp(dout, q, k, v, dlse=None):
        return expected_grads(dout, q, k, v, dlse=dlse, hook=hook, params=params)

    sensitivity = sensitivities(vjp, {"q": q, "k": k, "v": v}, dout, exact, exact_grads)
    for output in want:
        allowed = budgets(output, want[output], {"float32": [e[output] for e in emulated]}, sensitivity.get(output, 0.0))
        found = error(output, got[output], want[output])
        assert found <= allowed["float32"], f"{name} {output}: error {found:.3e} > budget {allowed['float32']:.3e}"


# --------------------------------------------------------------------------
# The table's gradient, its accumulation, and the hook switched off.
# --------------------------------------------------------------------------


def test_table_gradient_matches_central_differences():
    """d/d table of <dout, out> + <dlse, lse>, by central differences of the hook's own forward, in float64."""
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 1, 9, 4)), rng.standard_normal((2, 1, 9, 3))
    q_positions, k_positions = 11 + np.arange(5), 3 + np.arange(9)  # bottom-right aligned, shifted
    d_min, n_distances = kernels.distance_range(q_positions, k_positions)
    table = rng.standard_normal((2, n_distances))
    dout, dlse = rng.standard_normal((2, 2, 5, 3)), rng.standard_normal((2, 2, 5))
    params = dict(d_min=d_min, q_positions=q_positions, k_positions=k_positions, causal=True, softcap=3.0)

    def objective(table):
        result = hooked(q, k, v, distance_table=table, **params)
        return np.sum(dout * result.out) + np.sum(dlse * result.lse)

    step = 1e-6
    numeric = np.zeros_like(table)
    for index in np.ndindex(table.shape):
        shift = np.zeros_like(table)
        shift[index] = step
        numeric[index] = (objective(table + shift) - objective(table - shift)) / (2 * step)
    _, analytic = hooked_vjp(dout, q, k, v, dlse=dlse, distance_table=table, **params)
    assert np.max(np.abs(analytic - numeric)) <= 1e-7 * np.max(np.abs(numeric))
    # Causal: key j is seen by query i iff j <= i + 4, i.e. at distances (3 + j) - (11 + i) <= -4, the
    # columns up to -4 - d_min = 8; the later distances never reach a logit and get exactly 0.
    assert d_min == -12 and np.all(analytic[:, 9:] == 0) and np.all(analytic[:, :9] != 0)


def test_table_gradient_is_deterministic_and_independent_of_the_thread_count():
    """One private slice per thread, summed in a fixed order: bit-identical on repeated calls, and the
    same sums in another grouping with one thread."""
    qkv, dout, dlse, hook, params = make_case("causal_cached_decoding", seed=3)
    first = hooked_vjp(dout, *qkv, dlse=dlse, **hook, **params)[1]
    again = hooked_vjp(dout, *qkv, dlse=dlse, **hook, **params)[1]
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        serial = hooked_vjp(dout, *qkv, dlse=dlse, **hook, **params)[1]
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(first, again)
    assert error("grad", serial, first) <= 1e-13


def test_a_zero_table_gives_dense_attention_exactly():
    """The position bias 0 is added to the user bias exactly: the results are dense_attention's, bit for bit."""
    qkv, dout, dlse, hook, params = make_case("packed_user_bias", seed=4)
    hook = {**hook, "distance_table": np.zeros_like(hook["distance_table"])}
    with_zero_table = hooked(*qkv, **hook, **params)
    plain = dense_attention(*qkv, **params, backend="numba")
    assert np.array_equal(with_zero_table.out, plain.out) and np.array_equal(with_zero_table.lse, plain.lse)
    grads, _ = hooked_vjp(dout, *qkv, dlse=dlse, **hook, **params)
    plain_grads = dense_attention_vjp(dout, *qkv, dlse=dlse, **params, backend="numba")
    assert set(grads) == set(plain_grads) == {"q", "k", "v", "bias"}
    for name in grads:
        assert np.array_equal(grads[name], plain_grads[name]), name


# --------------------------------------------------------------------------
# distance_range and bad input.
# --------------------------------------------------------------------------


def test_distance_range_of_contiguous_and_scattered_positions():
    # Cached decoding: queries 96..99 after 100 keys 0..99: distances -99 .. 3, Nq + Nk - 1 of them.
    assert kernels.distance_range(96 + np.arange(4), np.arange(100)) == (-99, 103)
    assert kernels.distance_range(np.arange(1), np.arange(1)) == (0, 1)
    assert kernels.distance_range(np.array([5, 2, 9], np.int32), np.array([7, 0], np.uint8)) == (-9, 15)
    # A table may span 16 distances per position, and never fewer than 65536.
    assert kernels.distance_range(np.array([0]), np.array([65535])) == (65535, 1)
    assert kernels.distance_range(np.array([0, 65535]), np.array([0])) == (-65535, 65536)
    with pytest.raises(SpecError, match="k_positions.*at most 65536 distances"):
        kernels.distance_range(np.array([0, 65536]), np.array([0]))
    many = np.arange(5000)
    assert kernels.distance_range(many, many * 15)[1] == 15 * 4999 + 4999 + 1
    with pytest.raises(SpecError, match="at most 160000 distances"):
        kernels.distance_range(many, many * 40)


@pytest.mark.parametrize(
    "change, argument",
    [
        ({"q_positions": np.arange(66)}, "q_positions"),
        ({"k_positions": np.arange(130.0)}, "k_positions"),
        ({"k_positions": np.arange(130)[None]}, "k_positions"),
        ({"q_positions": list(range(67))}, "q_positions"),
        ({"d_min": 2.0}, "d_min"),
        ({"d_min": True}, "d_min"),
        ({"d_min": -131}, "distance_table"),  # misses distance -132
        ({"d_min": -133}, "distance_table"),  # misses distance 63
        ({"distance_table": np.zeros((3, 196))}, "distance_table"),
        ({"distance_table": np.zeros(196)}, "distance_table"),
        ({"distance_table": np.full((2, 196), np.nan)}, "distance_table"),
    ],
)
def test_bad_hook_input_raises_spec_error(change, argument):
    qkv, dout, _, hook, params = make_case("causal_cached_decoding")
    assert (hook["d_min"], hook["distance_table"].shape) == (-132, (2, 196))  # distances -132 .. 63
    for call in (
        lambda: hooked(*qkv, **{**hook, **change}, **params),
        lambda: hooked_vjp(dout, *qkv, **{**hook, **change}, **params),
    ):
        with pytest.raises(SpecError) as raised:
            call()
        assert raised.value.argument == argument


# --------------------------------------------------------------------------
# Memory: O(N), never an (Nq, Nk) array.
# --------------------------------------------------------------------------


def test_long_sequences_never_hold_an_nq_by_nk_array(monkeypatch):
    """At N = 4096 (an (N, N) float32 array is 64 MiB per head) the forward and VJP through the hook
    allocate under 8 MiB on the NumPy side in all (outputs included), and each kernel is given only
    arrays of at most threads * Hq * N * D elements, far below N * N: q, k, v, their gradients, the
    per-thread (Hq, 2N - 1) tables."""
    n, heads, dim = 4096, 2, 16
    rng = np.random.default_rng(8)
    q, k, v, dout = (rng.standard_normal((1, heads, n, dim), dtype=np.float32) for _ in range(4))
    positions = np.arange(n)
    d_min, n_distances = kernels.distance_range(positions, positions)
    hook = dict(distance_table=rng.standard_normal((heads, n_distances)), d_min=d_min, q_positions=positions, k_positions=positions)
    largest = {}
    kernel_names = {name for name in vars(kernels) if name.endswith("_kernel")}
    for name in kernel_names:

        def recording(*args, kernel=getattr(kernels, name), name=name):
            largest[name] = max(x.size for x in args if isinstance(x, np.ndarray))
            return kernel(*args)

        monkeypatch.setattr(kernels, name, recording)
    small = {**hook, "distance_table": hook["distance_table"][:, :3], "d_min": -1, "q_positions": positions[:2], "k_positions": positions[:2]}
    hooked_vjp(dout[:, :, :2], q[:, :, :2], k[:, :, :2], v[:, :, :2], **small)  # compiled

    tracemalloc.start()
    try:
        result = hooked(q, k, v, **hook, causal=True)
        grads, d_table = hooked_vjp(dout, q, k, v, **hook, causal=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB"
    assert kernel_names and set(largest) == kernel_names
    # q, k, v and their gradients (dq in at most one slice per thread), the (lanes, Hq, 2N - 1) table:
    assert max(largest.values()) <= numba.get_num_threads() * heads * n * dim < n * n
    assert result.out.shape == (1, heads, n, dim) and d_table.shape == (heads, 2 * n - 1)
    assert np.all(np.isfinite(grads.q)) and np.all(d_table[:, n:] == 0)  # causal: no key after its query


# --------------------------------------------------------------------------
# ALiBi and T5 on the hook against their references.
# --------------------------------------------------------------------------

#: mechanism: (reference forward, reference vjp, numba forward, numba vjp)
MECHANISMS = {
    name: (forward, vjp, partial(forward, backend="numba"), partial(vjp, backend="numba"))
    for name, forward, vjp in [
        ("alibi", alibi_reference.alibi_attention, alibi_reference.alibi_attention_vjp),
        ("t5", t5_reference.t5_attention, t5_reference.t5_attention_vjp),
    ]
}


@st.composite
def position_problems(draw, mechanism):
    """A dense problem (refattn.strategies) with positions of any kind and the mechanism's parameters."""
    problem = draw(dense_problems())
    shape = problem.shape
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q_positions, k_positions = positions(draw(st.sampled_from(["aligned", "cached_decoding", "packed", "scattered"])), shape.q_len, shape.kv_len, rng)
    params = {**problem.params, "q_positions": q_positions, "k_positions": k_positions}
    if mechanism == "alibi":
        params["form"] = draw(st.sampled_from(alibi_reference.FORMS))
        if draw(st.booleans()):
            params["slopes"] = rng.uniform(0.01, 2.0, shape.q_heads)
    else:
        bidirectional = draw(st.booleans())
        num_buckets = draw(st.sampled_from([4, 8, 32] if bidirectional else [2, 5, 32]))
        max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        params.update(
            table=rng.standard_normal((num_buckets, shape.q_heads)),
            bidirectional=bidirectional,
            num_buckets=num_buckets,
            max_distance=draw(st.sampled_from([max_exact + 1, max_exact + 11, 128])),
        )
    return Problem(problem.q, problem.k, problem.v, params, shape)


def _named(result, grads):
    return {"out": result.out, "lse": result.lse, **{f"grad.{name}": x for name, x in grads.items()}}


def check_numba_agrees(mechanism, problem, precision, seed):
    """The numba backend within the conformance budgets of the reference (as tests/test_dense_numba_agreement.py)."""
    forward, vjp, fast_forward, fast_vjp = MECHANISMS[mechanism]
    rng = np.random.default_rng(seed)
    q, k, v = problem.qkv
    exact = forward(q, k, v, **problem.params)
    dout = rng.standard_normal(exact.out.shape)
    dlse = np.where(np.isfinite(exact.lse), rng.standard_normal(exact.lse.shape), 0.0)
    exact_grads = vjp(dout, q, k, v, dlse=dlse, **problem.params)
    want = _named(exact, exact_grads)

    cast = [x.astype(precision) for x in (q, k, v)]
    fast = fast_forward(*cast, **problem.params)
    fast_grads = fast_vjp(dout.astype(precision), *cast, dlse=dlse.astype(precision), **problem.params)
    assert fast.out.dtype == np.dtype(precision) and fast.aux == {}
    got = _named(fast, fast_grads)
    assert set(got) == set(want)

    emulated = {}
    if precision != "float64":
        trials = [precision] + [jittered(precision, seed + trial) for trial in range(ROUNDING_TRIALS)]
        results = [(forward(q, k, v, **problem.params, precision=p), vjp(dout, q, k, v, dlse=dlse, **problem.params, precision=p)) for p in trials]
        emulated = {precision: [_named(*r) for r in results]}
    sensitivity = sensitivities(vjp, {"q": q, "k": k, "v": v, **problem.params}, dout, exact, exact_grads)
    for name in want:
        at_precision = {p: [e[name] for e in evaluations] for p, evaluations in emulated.items()}
        allowed = budgets(name, want[name], at_precision, sensitivity.get(name, 0.0))[precision]
        found = error(name, got[name], want[name])
        assert found <= allowed, f"{mechanism} {name}: error {found:.3e} > budget {allowed:.3e} ({precision})"


def saturates_the_softcap(problem) -> bool:
    """Whether some score is over 8 soft-caps: there 1 - tanh² < 5e-7 is a cancellation whose float64
    rounding, 1e-16 absolute, exceeds 1e-10 of a gradient that it dominates. The plain dense kernel
    differs from the dense reference there by as much (with logits at 60 soft-caps, by 2e-9), so such
    draws say nothing about positions and are skipped in float64; float32 budgets include the effect."""
    softcap = problem.params.get("softcap", 0.0)
    if softcap == 0:
        return False
    q, k, _ = problem.qkv
    group = q.shape[1] // k.shape[1]
    scale = problem.params.get("scale", 1 / np.sqrt(q.shape[-1]))
    scores = scale * np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, group, axis=1))
    return bool(np.max(np.abs(scores)) > 8 * softcap)


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
@given(data=st.data(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_the_reference(mechanism, data, precision, seed):
    problem = data.draw(position_problems(mechanism))
    assume(precision != "float64" or not saturates_the_softcap(problem))
    check_numba_agrees(mechanism, problem, precision, seed)


#: Several tiles, Nq != Nk, GQA, a user bias: (mechanism, params).
TILED = {
    "alibi_causal_cached_decoding": ("alibi", {"causal": True}),
    "alibi_symmetric_window": ("alibi", {"form": "symmetric", "window": (30, 30)}),
    "alibi_own_slopes_user_bias": ("alibi", {"slopes": np.linspace(0.05, 1.0, 8), "bias": np.ones((1, 8, 1, 130))}),
    "t5_decoder_causal": ("t5", {"bidirectional": False, "causal": True}),
    "t5_encoder_user_bias": ("t5", {"num_buckets": 8, "max_distance": 20, "bias": np.ones((67, 130))}),
}


@pytest.mark.parametrize("name", sorted(TILED))
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_numba_matches_the_reference_over_several_tiles(name, precision):
    mechanism, params = TILED[name]
    rng = np.random.default_rng(11)
    q, k, v = rng.standard_normal((2, 8, 67, 59)), rng.standard_normal((2, 2, 130, 59)), rng.standard_normal((2, 2, 130, 40))
    q_positions, k_positions = positions("cached_decoding", 67, 130, rng)
    params = {**params, "q_positions": q_positions, "k_positions": k_positions}
    if mechanism == "t5":
        params["table"] = rng.standard_normal((params.get("num_buckets", 32), 8))
    check_numba_agrees(mechanism, Problem(q, k, v, params), precision, seed=12)


def test_backend_numba_dispatches_here_and_rejects_bad_input_as_the_reference_does():
    rng = np.random.default_rng(13)
    q, k, v, dout = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 1, 5, 4)), rng.standard_normal((1, 1, 5, 4)), rng.standard_normal((1, 2, 3, 4))
    q_positions, k_positions = 2 + np.arange(3), np.arange(5)
    alibi = dict(q_positions=q_positions, k_positions=k_positions, causal=True)
    t5 = dict(table=rng.standard_normal((8, 2)), q_positions=q_positions, k_positions=k_positions, num_buckets=8, max_distance=20)
    via_registry = alibi_reference.alibi_attention(q, k, v, **alibi, backend="numba")
    alibi_inputs = alibi_reference.check_alibi_inputs(q, k, v, **(DENSE_DEFAULTS | {"slopes": None, "form": "causal"} | alibi))
    assert np.array_equal(via_registry.out, alibi_numba.forward(alibi_inputs).out)
    via_registry = t5_reference.t5_attention_vjp(dout, q, k, v, **t5, backend="numba")
    t5_inputs = t5_reference.check_t5_inputs(q, k, v, **(DENSE_DEFAULTS | {"bidirectional": True} | t5))
    assert np.array_equal(via_registry["table"], t5_numba.vjp(t5_inputs, Cotangents(dout=dout, dlse=None))["table"])

    bad_calls = [
        ("alibi", {**alibi, "q_positions": q_positions[:2]}),
        ("alibi", {**alibi, "k_positions": k_positions.astype(float)}),
        ("alibi", {**alibi, "slopes": np.ones(3)}),
        ("alibi", {**alibi, "form": "both"}),
        ("t5", {**t5, "table": np.ones((8, 3))}),
        ("t5", {**t5, "num_buckets": 7}),
        ("t5", {**t5, "max_distance": 2}),
        ("t5", {**t5, "bias": np.ones((2, 3))}),
    ]
    for mechanism, params in bad_calls:
        forward, vjp, fast_forward, fast_vjp = MECHANISMS[mechanism]
        for reference_call, numba_call in ((forward, fast_forward), (vjp, fast_vjp)):
            arrays = (q, k, v) if reference_call is forward else (dout, q, k, v)
            with pytest.raises(SpecError) as from_reference:
                reference_call(*arrays, **params)
            with pytest.raises(SpecError) as from_numba:
                numba_call(*arrays, **params)
            assert str(from_numba.value) == str(from_reference.value)
