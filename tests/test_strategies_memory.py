"""The recurrent-memory mechanisms' Hypothesis strategies: valid problems, every option reachable, small
minimal examples, and discrete decisions (max pooling, most-used selection, Infini-attention's
denominators) at least ``tie_margin`` from a tie, the margins computed here from the mechanisms' rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from refattn.core.precision import Numerics, STORAGE_DTYPES
from refattn.memory import compressive_attention
from refattn.memory.compressive.strategies import max_pool_margins, usage_margins
from refattn.memory.infini.strategies import denominator_margins
from refattn.strategies import problems, tie_margin

from .strategy_checks import draws_are_accepted

MEMORY = ("xl_recurrence", "sinks", "infini", "memory_tokens", "compressive")
#: hypothesis.find's budget: enough to reach every option; shrinking then runs to the end.
FIND = settings(database=None, max_examples=300, suppress_health_check=list(HealthCheck))


# --- valid problems ----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("mechanism", MEMORY)
def test_draws_are_accepted_by_the_public_function(mechanism, precision):
    draws_are_accepted(mechanism, precision,
                       settings(max_examples=60, deadline=None, derandomize=True,
                                suppress_health_check=list(HealthCheck)),
                       also=_one_key_per_query)  # fmt: skip


def _one_key_per_query(problem) -> None:
    q, k = problem.arguments["q"], problem.arguments["k"]
    assert k.shape[2] == q.shape[2] <= 40  # a stream: one key per query (Nq != Nk is not allowed)


# --- every option reachable, minimal examples small ----------------------------------

#: (mechanism, what the problem must have, what the minimal such problem is).
REACHABLE = {
    "xl_recurrence relative scores": (
        "xl_recurrence", lambda a: "r" in a,
        lambda a: a["q"].shape == (1, 1, 1, 1) and a["r"].shape == (1, 1, 1) and a["segment_len"] == 1),
    "xl_recurrence same_length": (
        "xl_recurrence", lambda a: a.get("same_length"), lambda a: a["q"].shape[2] == 1 and a["mem_len"] == 1),
    "xl_recurrence HF zero memory, GQA": (
        "xl_recurrence", lambda a: a.get("hf_zero_memory") and a["mem_len"] > 0 and a["q"].shape[1] > a["k"].shape[1],
        lambda a: a["q"].shape == (1, 4, 1, 1) and a["k"].shape == (1, 2, 1, 1) and a["mem_len"] == 1),  # GQA 4:2 first
    "xl_recurrence given memory, short last segment": (
        "xl_recurrence", lambda a: "memory_k" in a and a["q"].shape[2] % a["segment_len"] and a["q"].shape[2] > a["segment_len"],
        lambda a: a["q"].shape[2] == 3 and a["segment_len"] == 2 and a["memory_k"].shape[2] == 0),
    "sinks cache at stream positions": (
        "sinks", lambda a: "cache_k" in a and a["positions"] == "original",
        lambda a: a["q"].shape == (1, 1, 1, 2) and a["cache_k"].shape[2] == 1 and a["sink_count"] + a["recent_size"] == 1),
    "sinks eviction of sinks and recent tokens": (
        "sinks", lambda a: a["sink_count"] > 0 and a["recent_size"] > 0 and a["q"].shape[2] > a["sink_count"] + a["recent_size"],
        lambda a: a["q"].shape[2] == 3 and a["sink_count"] == a["recent_size"] == 1),
    "sinks interleaved partial rotation": (
        "sinks", lambda a: a.get("rope_layout") == "interleaved" and a.get("rotary_dim", a["q"].shape[3]) < a["q"].shape[3],
        lambda a: a["q"].shape[3] == 3 and a["rotary_dim"] == 2),
    "infini delta rule, update first, eps": (
        "infini", lambda a: a["update"] == "delta" and a["update_order"] == "update_first" and a["eps"] > 0,
        lambda a: a["q"].shape == (1, 1, 1, 1) and a["eps"] == 1e-3),
    "infini no feature map from a given state": (
        "infini", lambda a: a["feature_map"] == "identity" and "memory" in a,
        lambda a: a["q"].shape == (1, 1, 1, 1) and a["memory"].shape == (1, 1, 1, 1)),
    "memory_tokens lucidrains positions, memory_not_causal": (
        "memory_tokens", lambda a: a["positions"] == "lucidrains" and a["memory_mask"] == "memory_not_causal",
        lambda a: a["q"].shape == (1, 1, 1, 2) and a["memory"].shape == (1, 1, 2)),
    "memory_tokens several segments of several memory tokens": (
        "memory_tokens", lambda a: a["q"].shape[2] > a["segment_len"] > 1 and a["memory"].shape[1] > 1,
        lambda a: a["q"].shape[2] == 4 and a["segment_len"] == 2 and a["memory"].shape[1] == 2),
    "compressive max pooling evicting": (
        "compressive", lambda a: a["compression"] == "max_pool" and a["rate"] > 1 and a["q"].shape[2] > a["mem_len"],
        lambda a: a["q"].shape == (1, 1, 2, 1) and a["rate"] == 2 and a["mem_len"] == 0),
    "compressive most-used into the compressed memory": (
        "compressive", lambda a: a["compression"] == "most_used" and a["rate"] > 1 and a["compressed_len"] > 0
        and a["q"].shape[2] > a["mem_len"],
        lambda a: a["q"].shape[2] == 2 and a["rate"] == 2 and a["compressed_len"] == 1),
    "compressive convolution from a given state": (
        "compressive", lambda a: a["compression"] == "conv" and "memory_usage" not in a and "memory_k" in a
        and a["rate"] == 3,
        lambda a: a["conv_weight_k"].shape == (1, 1, 3) and a["q"].shape[2] == 3 and a["memory_k"].shape[2] == 0),
    "compressive dilated convolution": (
        "compressive", lambda a: a.get("dilation", 1) > 1,
        lambda a: a["dilation"] == a["rate"] == 2 and a["conv_weight_k"].shape == (1, 1, 1) and a["q"].shape[2] == 2),
    "compressive rate 1, short last segment": (
        "compressive", lambda a: a["rate"] == 1 and a["q"].shape[2] > a["segment_len"] and a["q"].shape[2] % a["segment_len"],
        lambda a: a["q"].shape[2] == 3 and a["segment_len"] == 2),
}  # fmt: skip


@pytest.mark.parametrize("option", sorted(REACHABLE))
def test_option_is_reachable_and_shrinks_small(option):
    mechanism, wanted, minimal = REACHABLE[option]
    smallest = find(problems(mechanism), lambda p: bool(wanted(p.arguments)), settings=FIND)
    assert minimal(smallest.arguments), smallest.describe()


def test_every_f_c_and_rate_is_drawn():
    seen = set()

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(problems("compressive"))
    def record(problem):
        seen.add((problem.arguments["compression"], problem.arguments["rate"]))

    record()
    assert {f for f, _ in seen} == {"mean_pool", "max_pool", "conv", "dilated_conv", "most_used"}
    assert {rate for _, rate in seen} == {1, 2, 3, 4}


# --- discrete decisions far from ties ------------------------------------------------


def evicted_runs(memory: np.ndarray, stream: np.ndarray, segment_len: int, mem_len: int, rate: int) -> list:
    """The runs of ``rate`` entries max pooling compresses, step by step: each step appends its segment to the
    memory and evicts the oldest beyond ``mem_len`` (Rae et al. 2020, Algorithm 1)."""
    runs, held = [], memory
    for start in range(0, stream.shape[2], segment_len):
        grown = np.concatenate([held, stream[:, :, start:start + segment_len]], axis=2)
        evicted = grown.shape[2] - min(mem_len, grown.shape[2])
        runs += [grown[:, :, first:first + rate] for first in range(0, evicted, rate)]
        held = grown[:, :, evicted:]
    return runs


def run_margin(run: np.ndarray) -> float:
    """The smallest, over features, of (largest − second largest) / (|largest| + |second largest|) of a run
    (B, H, rate, F)."""
    ordered = -np.sort(-run, axis=2)
    first, second = ordered[:, :, 0], ordered[:, :, 1]
    return float(np.min((first - second) / (np.abs(first) + np.abs(second))))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_max_pooling_decisions_are_far_from_ties(precision, data):
    problem = data.draw(problems("compressive", precision).filter(lambda p: p.arguments["compression"] == "max_pool"
                                                                   and p.arguments["rate"] > 1))  # fmt: skip
    a = problem.arguments
    for name, stream in (("memory_k", a["k"]), ("memory_v", a["v"])):
        memory = a.get(name, stream[:, :, :0])
        for run in evicted_runs(memory, stream, a["segment_len"], a["mem_len"], a["rate"]):
            assert run_margin(run) >= tie_margin(precision)


def test_max_pool_margin_sees_a_near_tie():
    stream = np.array([1.0, 1.0 + 1e-9, -2.0, 3.0]).reshape(1, 1, 4, 1)
    margins = max_pool_margins(stream[:, :, :0], stream, evicted=4, rate=2)
    assert margins[0, 0, 0, 0] == pytest.approx(1e-9 / (2.0 + 1e-9))
    assert margins[0, 0, 1, 0] == pytest.approx(5.0 / 5.0)
    assert margins.min() < tie_margin("float32")


def selected_keys(problem, precision) -> np.ndarray:
    """The final compressed keys of ``problem``, the reference evaluated in ``precision`` (a Numerics)."""
    return np.asarray(problem.call(compressive_attention, precision=precision).aux["compressed_k"], np.float64)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_most_used_selection_is_reproduced_in_the_precision(precision, data):
    """The compressed memory holds the same entries when the oracle runs in ``precision``, with its rounding
    moved at random (the errors of an equally correct kernel): every selection is made as in float64."""
    problem = data.draw(problems("compressive", precision).filter(lambda p: p.arguments["compression"] == "most_used"
                                                                   and p.arguments["rate"] > 1))  # fmt: skip
    exact = selected_keys(problem, None)
    storage = STORAGE_DTYPES[precision]
    for trial in range(3):
        rounded = selected_keys(problem, Numerics(precision, storage, np.dtype(np.float32), np.random.default_rng(trial)))
        np.testing.assert_allclose(rounded, exact, rtol=4 * tie_margin(precision), atol=0)


def test_usage_margin_sees_a_tie():
    """Two equal memory entries of equal usage, both seen by every query: evicting one of them is a tie."""
    rng = np.random.default_rng(0)
    key = rng.standard_normal((1, 1, 1, 4))
    margins = usage_margins(rng.standard_normal((1, 1, 2, 4)), rng.standard_normal((1, 1, 2, 4)), segment_len=2,
                            mem_len=2, compressed_len=1, rate=2, memory_k=np.concatenate([key, key], axis=2),
                            compressed_k=np.zeros((1, 1, 0, 4)), memory_usage=np.full((1, 1, 2), 0.5), scale=None,
                            precision="float32")  # fmt: skip
    assert margins.shape == (1,) and margins[0] < tie_margin("float32")


def infini_denominators(a: dict) -> list[tuple[float, float]]:
    """Every retrieval denominator ``σ(x)·z + ε`` and its rounding scale ``Σ|σ(x)_d z_d| + ε``, token by
    token: the queries' (reading z before or after their segment's write) and, with the delta rule, the keys'."""
    sigma = (lambda x: x) if a["feature_map"] == "identity" else (lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0))))
    q, k, eps, length = a["q"], a["k"], a["eps"], a["segment_len"]
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    norm = a.get("norm", np.zeros((b, hkv, d)))
    found = []
    for start in range(0, n, length):
        after = norm + sigma(k[:, :, start:start + length]).sum(axis=2)
        read = after if a["update_order"] == "update_first" else norm
        for i, h, t in np.ndindex(b, hq, min(length, n - start)):
            phi, z = sigma(q[i, h, start + t]), read[i, h // (hq // hkv)]
            found.append((float(phi @ z + eps), float(np.abs(phi) @ np.abs(z) + eps)))
        if a["update"] == "delta":
            for i, h, t in np.ndindex(b, hkv, min(length, n - start)):
                phi, z = sigma(k[i, h, start + t]), norm[i, h]
                found.append((float(phi @ z + eps), float(np.abs(phi) @ np.abs(z) + eps)))
        norm = after
    return found


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_infini_denominators_are_exact_zeros_or_far_from_zero(precision, data):
    a = data.draw(problems("infini", precision)).arguments
    for denominator, rounding in infini_denominators(a):
        assert (denominator == rounding == 0.0) or abs(denominator) >= tie_margin(precision) * rounding


def test_denominator_margin_sees_a_near_zero():
    q = np.array([1.0, -1.0 + 1e-9]).reshape(1, 1, 1, 2)
    margins, _ = denominator_margins(q, q, segment_len=1, norm=np.ones((1, 1, 2)), feature_map="identity",
                                     update="linear", update_order="retrieve_first", eps=0.0)  # fmt: skip
    assert margins[0, 0, 0] == pytest.approx(1e-9 / 2.0)
