"""The routing numba backend (refattn/routing/numba.py) against the reference.

Within the conformance tolerance policy (refattn/conformance/tolerance.py):
float64 to 1e-10 normwise; float32 within c x the reference's own float32
error (plain and jittered) plus the rounding floor. Routing has no per-token
``lse`` (its log-sum-exps are per cluster slot, ``aux.slot_lse`` (B, H, K, W)),
so ``tolerance.sensitivities`` gives it no logit sensitivity and every output
gets the plain floor, as the conformance export does for routing. The
integer outputs (memberships, assignments, counts, unrouted) must be equal.

Problems come from refattn/routing/problems.py, whose decisions have a
recorded margin, so float32 routing must make the float64 decisions. Random
problems can still be ill-conditioned where the conformance cases are not: a
routing vector whose cotangent is parallel to it (a shared-QK slot whose only
key is itself) has a layer-norm gradient that cancels to ``eps / var`` of its
size, so two correct summation orders differ by far more than 1e-10 of it.
In float64 the budget is therefore the larger of 1e-10 and ``c x`` the error
of the reference itself in float64 with randomised rounding
(``jittered("float64")``), plus the floor.

Then: clusters taken in groups, the committed conformance cases through
``verify``, the exact tie-break on duplicated tokens, and the dispatch
through the registry.
"""

import functools
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refattn import SpecError
from refattn.conformance.tolerance import (
    C_REFERENCE,
    ROUNDING_TRIALS,
    budgets,
    error,
    floor,
    sensitivities,
)
from refattn.conformance.verify import default_suite_folder, verify
from refattn.core import registry
from refattn.core.precision import jittered
from refattn.routing import get_preset, routing_attention, routing_attention_vjp
from refattn.routing import numba as kernels
from refattn.routing.problems import routed_problem

PRESET_NAMES = (None, "google_research", "lucidrains")
INTEGER_AUX = ("membership", "key_membership", "assignment", "key_assignment", "counts", "unrouted")


def _problem(seed, preset, *, b, h=2, n, d=8, dv=None, clusters, shared_qk=False, memory=0, padding=False):
    """(arrays with gradients, other keyword arguments) of a routed problem with decision margins."""
    chosen = get_preset(preset)
    prescale = 1 / math.sqrt(d) if chosen.query_prescale is None else chosen.query_prescale
    rng = np.random.default_rng(seed)
    p = routed_problem(rng, batch=b, heads=h, length=n, head_dim=d, value_dim=dv, clusters=clusters,
                       routing_norm=chosen.routing_norm, query_prescale=prescale, shared_qk=shared_qk)  # fmt: skip
    arrays = dict(q=p["q"], k=p["q"] if shared_qk else p["k"], v=p["v"])
    if memory:
        arrays["mem_k"] = rng.standard_normal((h, clusters, memory, d))
        arrays["mem_v"] = rng.standard_normal((h, clusters, memory, p["v"].shape[-1]))
    params = dict(centroids=p["centroids"], preset=preset, shared_qk=shared_qk)
    if padding:
        params["key_padding_mask"] = rng.random((b, n)) > 0.3
    return arrays, params


def _outputs(result, grads):
    return {"out": result.out, "aux.slot_lse": result.aux["slot_lse"], **{f"grad.{name}": value for name, value in grads.items()}}


def _reference_outputs(arrays, params, dout, precision):
    result = routing_attention(**arrays, **params, precision=precision)
    return _outputs(result, routing_attention_vjp(dout, **arrays, **params, precision=precision))


def _assert_agrees(arrays, params, precision, seed):
    """backend="numba" in ``precision`` against the float64 reference, within the conformance budgets."""
    rng = np.random.default_rng(seed)
    exact = routing_attention(**arrays, **params)
    dout = rng.standard_normal(exact.out.shape)
    exact_grads = routing_attention_vjp(dout, **arrays, **params)
    want = _outputs(exact, exact_grads)

    cast = {name: x.astype(precision) for name, x in arrays.items()}
    cast_params = dict(params, centroids=params["centroids"].astype(precision))
    fast = routing_attention(**cast, **cast_params, backend="numba")
    fast_grads = routing_attention_vjp(dout.astype(precision), **cast, **cast_params, backend="numba")
    assert fast.out.dtype == fast.aux["slot_lse"].dtype == np.dtype(precision) and fast.lse is None
    assert set(fast.aux) == {*INTEGER_AUX, "slot_lse"}
    for name in INTEGER_AUX:
        assert fast.aux[name].dtype == exact.aux[name].dtype, name
        np.testing.assert_array_equal(fast.aux[name], exact.aux[name], err_msg=name)
    got = _outputs(fast, fast_grads)
    assert set(got) == set(want)

    plain = [] if precision == "float64" else [precision]
    trials = plain + [jittered(precision, seed + trial) for trial in range(ROUNDING_TRIALS)]
    emulated = [_reference_outputs(arrays, params, dout, p) for p in trials]
    sensitivity = sensitivities(routing_attention_vjp, {**arrays, **params}, dout, exact, exact_grads)
    assert sensitivity == {}  # no per-token lse: the plain floor (module docstring)
    for name in want:
        evaluations = [e[name] for e in emulated]
        if precision == "float64":  # 1e-10, or the reference's own float64 rounding sensitivity (module docstring)
            own = max(error(name, e, want[name]) for e in evaluations)
            allowed = max(budgets(name, want[name], {})["float64"], C_REFERENCE * own + floor(name, "float64"))
        else:
            allowed = budgets(name, want[name], {precision: evaluations})[precision]
        found = error(name, got[name], want[name])
        tiny = np.finfo(precision).tiny
        if precision != "float64" and np.max(np.abs(want[name]), initial=0.0) < tiny:
            # Wholly below the normal range (a gradient carried only by weights like exp(-90)): the kernels'
            # exp flushes such weights to 0, as the dense kernels' does; compare absolutely.
            found, allowed = np.max(np.abs(got[name] - want[name]), initial=0.0), tiny
        assert found <= allowed, f"{name}: error {found:.3e} > budget {allowed:.3e} ({precision})"


# --- random problems, every preset and the parameters that differ ---------------------------


@st.composite
def routing_problems(draw):
    preset = draw(st.sampled_from(PRESET_NAMES))
    n = draw(st.sampled_from([8, 12, 16, 24, 32]))
    b = draw(st.integers(1, 2))
    arrays, params = _problem(
        draw(st.integers(0, 2**16)), preset, b=b, n=n, dv=draw(st.sampled_from([3, 8])),
        clusters=draw(st.integers(1, 4)), shared_qk=draw(st.booleans()), memory=draw(st.sampled_from([0, 0, 1, 2])),
        padding=draw(st.booleans()),
    )  # fmt: skip
    params.update(cluster_size=draw(st.integers(1, n)), causal=draw(st.booleans()))
    # Attention-side overrides of the preset (the routing side is what the problem's margins are built for).
    params.update(draw(st.fixed_dictionaries({}, optional={
        "causal_by": st.sampled_from(["position", "slot"]),
        "order": st.sampled_from(["position", "similarity"]),
        "query_padding": st.sampled_from(["mask_row", "mask_window", "none"]),
        "mask_value": st.sampled_from([None, -1e9]),
        "self_mask": st.booleans(),
        "self_mask_value": st.sampled_from([None, -5e4]),
        "scatter_eps": st.sampled_from([0.0, 1e-2]),
        "attend_on": st.sampled_from(["normalized", "raw"]),
    })))  # fmt: skip
    if preset == "google_research":
        # Its logit scale 1 is for layer-normed vectors; on the raw ones (|q| up to 3 D) the logits reach hundreds
        # and whole gradients are carried by weights that underflow float32.
        params.pop("attend_on", None)
    return arrays, params


@given(problem=routing_problems(), precision=st.sampled_from(["float64", "float32"]), seed=st.integers(0, 2**16))
def test_numba_matches_reference(problem, precision, seed):
    arrays, params = problem
    if precision != "float64":
        # A row without a key, filled with lucidrains' -finfo(float32).max, has its lse at the edge of float32,
        # where the randomised-rounding emulation behind the float32 budget overflows (spec/routing.md, Edge cases).
        assume(np.all(np.abs(routing_attention(**arrays, **params).aux["slot_lse"]) < 1e38))
    _assert_agrees(arrays, params, precision, seed)


#: Presets and options on problems with many clusters and slots per work item.
LARGER = {
    "canonical, causal, padding": (None, dict(causal=True), dict(padding=True)),
    "google-research, slot causal, memory": ("google_research", dict(causal=True), dict(memory=2)),
    "lucidrains, shared-QK, causal": ("lucidrains", dict(causal=True), dict(shared_qk=True)),
    "lucidrains, memory, padding": ("lucidrains", {}, dict(memory=1, padding=True)),
}


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("name", list(LARGER))
def test_numba_matches_reference_on_larger_problems(name, precision):
    """N = 192, K = 6 clusters of 40 (some tokens in several clusters, some in none), D = 16, B = 2."""
    preset, options, shape = LARGER[name]
    arrays, params = _problem(7, preset, b=2, h=3, n=192, d=16, dv=12, clusters=6, **shape)
    _assert_agrees(arrays, dict(params, cluster_size=40, **options), precision, seed=3)


@pytest.mark.parametrize("group", [1, 4])
def test_clusters_in_groups_give_the_same_bits(group, monkeypatch):
    """The kernels take the clusters a group at a time; any grouping (here 6 clusters as 6 x 1 or 4 + 2)
    adds every token's slots in the same order, so outputs and gradients are bitwise those of one group."""
    arrays, params = _problem(7, "google_research", b=2, h=3, n=192, d=16, dv=12, clusters=6, memory=2, padding=True)
    params = dict(params, cluster_size=40, causal=True, backend="numba")
    dout = np.random.default_rng(2).standard_normal(arrays["v"].shape)
    whole = routing_attention(**arrays, **params), routing_attention_vjp(dout, **arrays, **params)
    monkeypatch.setattr(kernels, "SLOT_BUFFER_BYTES", 0)
    monkeypatch.setattr(kernels, "GROUP_ITEMS", group * 2 * 3)
    assert kernels._group(2 * 3, 6, 1) == group
    grouped = routing_attention(**arrays, **params), routing_attention_vjp(dout, **arrays, **params)
    np.testing.assert_array_equal(grouped[0].out, whole[0].out, err_msg="out")
    np.testing.assert_array_equal(grouped[0].aux["slot_lse"], whole[0].aux["slot_lse"], err_msg="slot_lse")
    assert set(grouped[1]) == set(whole[1]) == {"q", "k", "v", "mem_k", "mem_v"}
    for name in whole[1]:
        np.testing.assert_array_equal(grouped[1][name], whole[1][name], err_msg=name)


# --- the committed conformance vectors -----------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_numba_backend_passes_the_conformance_cases(dtype):
    report = verify(functools.partial(routing_attention, backend="numba"),
                    vjp=functools.partial(routing_attention_vjp, backend="numba"), suite=default_suite_folder(),
                    mechanism="routing", grad=True, dtype=dtype)  # fmt: skip
    assert report.ok, report.format()


# --- the selection rule --------------------------------------------------------------------


@pytest.mark.parametrize("order", ["position", "similarity"])
def test_exact_ties_go_to_the_lower_position(order):
    """Duplicated tokens tie exactly in both backends; the lower position wins, also inside a cluster's order."""
    arrays, params = _problem(5, None, b=1, n=16, clusters=3)
    for x in (arrays["q"], arrays["k"]):
        x[:, :, 9:12] = x[:, :, 2:5]  # tokens 9-11 copy tokens 2-4
    params = dict(params, order=order)
    for cluster_size in (2, 5, 8, 16):
        exact = routing_attention(**arrays, **params, cluster_size=cluster_size)
        fast = routing_attention(**arrays, **params, cluster_size=cluster_size, backend="numba")
        for name in INTEGER_AUX:
            np.testing.assert_array_equal(fast.aux[name], exact.aux[name], err_msg=f"{name}, cluster size {cluster_size}")
        np.testing.assert_allclose(fast.out, exact.out, rtol=0, atol=1e-12)


# --- the backend's place in the package ------------------------------------------------------


def test_backend_module_is_forward_and_vjp_over_checked_inputs():
    """No public signature restated: the registry checks the inputs once and calls ``forward``/``vjp``."""
    assert registry.get("routing").backends == ("reference", "numba", "cupy")
    public = sorted(name for name in vars(kernels) if callable(vars(kernels)[name]) and not name.startswith("_")
                    and vars(kernels)[name].__module__ == kernels.__name__)  # fmt: skip
    assert public == ["forward", "vjp"]


def test_numba_backend_checks_input_as_the_reference():
    arrays, params = _problem(9, "lucidrains", b=1, n=12, clusters=2, memory=1)
    params["cluster_size"] = 5
    dout = np.random.default_rng(1).standard_normal(arrays["v"].shape)
    grads = routing_attention_vjp(dout, **arrays, **params, backend="numba")
    assert set(grads) == {"q", "k", "v", "mem_k", "mem_v"}
    with pytest.raises(SpecError, match="precision"):
        routing_attention(**arrays, **params, backend="numba", precision="float32")
    with pytest.raises(SpecError, match="cluster_size"):
        routing_attention(**arrays, **dict(params, cluster_size=13), backend="numba")
