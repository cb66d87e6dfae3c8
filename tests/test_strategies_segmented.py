"""The Hypothesis strategies of the segmented family (segmented, sliding_window, longformer, bigbird, local) and
the hierarchical one (h1d, multilevel).

Each strategy's draws are accepted by its mechanism's public function; every
important option is reachable and its minimal example is small (the sizes
``hypothesis.find`` shrinks to are stated); the discrete decisions of drawn
problems (multi-level max pooling, H-Transformer-1D's per-level row maxima)
keep the tie margin of the precision they were drawn for, measured here by
rules written out in the test (unit-by-unit loops; the H-matrix coverage rule).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, find, given, settings

from refattn.hierarchical import multilevel_attention
from refattn.hierarchical.multilevel import strategies as multilevel_strategies
from refattn.strategies import problems, tie_margin

from .strategy_checks import draws_are_accepted

MECHANISMS = ("segmented", "sliding_window", "longformer", "bigbird", "local", "h1d", "multilevel")
FIND = settings(database=None, max_examples=1000, derandomize=True, suppress_health_check=list(HealthCheck))
MARGINS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def sizes(problem) -> tuple:
    """The shape of the first positional input: (B, H, N, D), or (B, N, C) for multilevel's ``x``."""
    return problem.arrays[problem.positional[0]].shape


# --- draws are accepted ----------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_draws_are_accepted_by_the_public_function(mechanism, precision):
    draws_are_accepted(mechanism, precision, settings(max_examples=40, deadline=None, database=None))


# --- options are reachable, and their minimal examples small ---------------------------


def given_pooling(p):
    return isinstance(p.arguments.get("pooling"), np.ndarray)


def resolved(p, name, canonical, lucidrains):
    """An h1d parameter: given, else the preset's value (inputs.preset_values, non-causal)."""
    return p.params.get(name, lucidrains if p.preset == "lucidrains" else canonical)


REACHABLE = [
    # (mechanism, what, condition, sizes of the minimal example, parameters it has)
    ("sliding_window", "hf_causal", lambda p: p.params["convention"] == "hf_causal", (1, 1, 1, 1), {"window_size": 1}),
    ("sliding_window", "hf_bidirectional", lambda p: p.params["convention"] == "hf_bidirectional", (1, 1, 1, 1),
     {"window_size": 0}),
    ("sliding_window", "mistral", lambda p: p.params["convention"] == "mistral", (1, 1, 1, 1), {"window_size": 0}),
    ("sliding_window", "longformer", lambda p: p.params["convention"] == "longformer", (1, 1, 1, 1),
     {"window_size": 0}),
    ("sliding_window", "Nq != Nk", lambda p: p.arrays["k"].shape[2] > p.arrays["q"].shape[2], (1, 1, 1, 1), {}),
    ("sliding_window", "GQA", lambda p: p.arrays["q"].shape[1] > p.arrays["k"].shape[1], (1, 4, 1, 1), {}),
    ("segmented", "short last segment", lambda p: p.params["last_segment"] == "short"
     and sizes(p)[2] % p.params["segment_len"], (1, 1, 3, 1), {"segment_len": 2}),
    ("segmented", "padded segment longer than N", lambda p: p.params["last_segment"] == "pad"
     and p.params["segment_len"] > sizes(p)[2], (1, 1, 1, 1), {"segment_len": 2}),
    ("segmented", "sum", lambda p: p.params["integration"] == "sum", (1, 1, 1, 1), {}),
    ("segmented", "lse_merge", lambda p: p.params["integration"] == "lse_merge", (1, 1, 1, 1), {}),
    ("segmented", "gate over (B, Hq, N, 1)", lambda p: "gate" in p.arrays and p.arrays["gate"].shape[-1] == 1
     and p.arrays["gate"].shape[2] > 1, (1, 1, 2, 1), {}),
    ("segmented", "causal concat (prefix)", lambda p: p.params["integration"] == "concat" and p.params["causal"],
     (1, 1, 1, 1), {"current_summary": "prefix"}),
    ("segmented", "causal prefix first-token", lambda p: p.params["causal"] and p.params["integration"] != "none"
     and p.params["current_summary"] == "prefix" and p.params.get("pooling") == "first", (1, 1, 1, 1), {}),
    ("segmented", "given pooling, causal", lambda p: given_pooling(p) and p.params["causal"]
     and p.params["integration"] != "none", (1, 1, 1, 1), {"current_summary": "exclude"}),
    ("longformer", "hf preset", lambda p: p.preset == "hf", (1, 1, 1, 1), {"attention_window": 2}),
    ("longformer", "hf padding", lambda p: p.preset == "hf" and sizes(p)[2] % p.params["attention_window"],
     (1, 1, 1, 1), {"attention_window": 2}),
    ("longformer", "global tokens", lambda p: "global_tokens" in p.arrays and p.arrays["global_tokens"].any(),
     (1, 1, 1, 1), {}),
    ("longformer", "global projections", lambda p: "q_global" in p.arrays, (1, 1, 1, 1), {}),
    ("bigbird", "ITC", lambda p: p.params["extra_global_tokens"] == 0 and p.preset is None, (1, 1, 1, 1), {}),
    ("bigbird", "ETC", lambda p: p.params["extra_global_tokens"] > 0, (1, 1, 2, 1), {"extra_global_tokens": 1}),
    ("bigbird", "hf", lambda p: p.preset == "hf", (1, 1, 1, 1), {}),
    ("bigbird", "hf past its short-sequence rule", lambda p: p.preset == "hf" and sizes(p)[2] > p.params["block_size"]
     * (5 + 2 * p.arrays["random_blocks"].shape[2]), (1, 1, 6, 1), {"block_size": 1}),
    ("bigbird", "hf_train random blocks", lambda p: p.preset == "hf_train" and p.arrays["random_blocks"].size > 0,
     (1, 1, 6, 1), {"block_size": 1}),
    ("bigbird", "ITC random blocks", lambda p: p.params["extra_global_tokens"] == 0
     and p.arrays["random_blocks"].size > 0, (1, 1, 3, 1), {}),
    ("bigbird", "an overridden preset parameter", lambda p: p.preset is None
     and p.params.get("count_repeated_blocks") is True, (1, 1, 1, 1), {}),
    ("local", "autopad", lambda p: p.params["autopad"] and sizes(p)[2] % p.params["window_size"], (1, 1, 1, 1),
     {"window_size": 2}),
    ("local", "causal", lambda p: p.params["causal"], (1, 1, 1, 1), {}),
    ("local", "exact window", lambda p: p.params["exact_windowsize"], (1, 1, 1, 1), {}),
    ("local", "look forward 2", lambda p: p.params.get("look_forward") == 2, (1, 1, 1, 1), {}),
    ("local", "look backward 2", lambda p: p.params["look_backward"] == 2, (1, 1, 1, 1), {}),
    ("local", "shared QK", lambda p: p.params.get("shared_qk"), (1, 1, 1, 1), {"self_score": -5e4}),
    ("local", "rotary", lambda p: p.params["rotary"], (1, 1, 1, 2), {}),
    ("local", "lucidrains", lambda p: p.preset == "lucidrains", (1, 1, 1, 1), {}),
    ("h1d", "padding", lambda p: p.params["padding"] and sizes(p)[2] & (sizes(p)[2] - 1), (1, 1, 3, 1),
     {"block_size": 1}),
    ("h1d", "causal", lambda p: p.params["causal"], (1, 1, 1, 1), {}),
    ("h1d", "two levels", lambda p: p.params.get("num_levels", 0) >= 2, (1, 1, 4, 1), {"block_size": 1}),
    ("h1d", "lucidrains", lambda p: p.preset == "lucidrains", (1, 1, 1, 1), {}),
    ("h1d", "per-level row maxima", lambda p: resolved(p, "row_max", "shared", "per_level") == "per_level",
     (1, 1, 1, 1), {}),
    ("h1d", "siblings", lambda p: resolved(p, "neighbours", "tridiagonal", "siblings") == "siblings", (1, 1, 1, 1),
     {}),
    ("h1d", "first-token coarse queries", lambda p: p.params.get("coarse_queries") == "first", (1, 1, 1, 1), {}),
    ("multilevel", "mean", lambda p: p.params["aggregate"] == "mean", (1, 1, 1), {}),
    ("multilevel", "first", lambda p: p.params["aggregate"] == "first", (1, 1, 1), {}),
    ("multilevel", "weights", lambda p: p.params["aggregate"] == "weights", (1, 1, 1), {}),
    ("multilevel", "attention_pool", lambda p: p.params["aggregate"] == "attention_pool", (1, 1, 1), {}),
    ("multilevel", "max with a decision", lambda p: p.params["aggregate"] == "max"
     and p.arguments["segments"][0, -1] < sizes(p)[1] - 1, (1, 2, 1), {}),
    ("multilevel", "three levels", lambda p: p.arguments["segments"].shape[0] == 3, (1, 1, 1), {}),
    ("multilevel", "per unit", lambda p: p.params["output"] == "per_unit", (1, 1, 1), {}),
    ("multilevel", "sum rule", lambda p: p.params["token_rule"] == "sum", (1, 1, 1), {}),
]  # fmt: skip


@pytest.mark.parametrize(("mechanism", "what", "condition", "smallest", "params"), REACHABLE,
                         ids=[f"{m}-{w}" for m, w, *_ in REACHABLE])  # fmt: skip
def test_option_is_reachable_and_shrinks_small(mechanism, what, condition, smallest, params):
    found = find(problems(mechanism), condition, settings=FIND)
    assert sizes(found) == smallest, found.describe()
    assert {name: found.params.get(name) for name in params} == params, found.describe()


# --- discrete decisions are far from ties ---------------------------------------------


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def multilevel_margins(x, segments, wq, wk, wv, scale=None, **_):
    """Each max-pooling decision's gap over its rounding scale, unit by unit (one batch element at a time).

    Scale: the unit's largest ``|v_c|`` times ``Π (1 + largest |logit|)`` over the levels so far.
    """
    margins = []
    scale = 1.0 / np.sqrt(wq.shape[2]) if scale is None else scale
    for b in range(x.shape[0]):
        h, element_of_token, growth = x[b], np.arange(x.shape[1]), 1.0
        for level in range(segments.shape[0]):
            units = np.array([segments[level][np.flatnonzero(element_of_token == e)[0]] for e in range(h.shape[0])])
            q, k, v = h @ wq[level], h @ wk[level], h @ wv[level]
            outputs, largest_logit = {}, 0.0
            for u in range(units.max() + 1):
                members = np.flatnonzero(units == u)
                logits = scale * q[members] @ k[members].T
                largest_logit = max(largest_logit, np.abs(logits).max())
                outputs[u] = np.array([softmax(row) @ v[members] for row in logits])
            growth *= 1.0 + largest_logit
            for u, o in outputs.items():
                members = np.flatnonzero(units == u)
                for c in range(o.shape[1]):
                    if len(members) > 1:
                        first, second = np.sort(o[:, c])[::-1][:2]
                        margins.append((first - second) / (np.abs(v[members, c]).max() * growth))
            h = np.stack([outputs[u].max(axis=0) for u in sorted(outputs)])
            element_of_token = segments[level]
    return np.array(margins)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_multilevel_max_pooling_is_far_from_ties(precision):
    @MARGINS
    @given(multilevel_strategies.problems(precision, aggregates=("max",)))
    def far(problem):
        margins = multilevel_margins(**problem.arrays, **problem.params)
        assert margins.size == 0 or margins.min() >= tie_margin(precision)

    far()


def test_multilevel_max_pooling_decisions_survive_float32():
    """The margin is enough: the reference evaluated in float32 takes every argmax the float64 one takes."""

    @MARGINS
    @given(multilevel_strategies.problems("float32", aggregates=("max",)))
    def same_argmax(problem):
        exact = problem.call(multilevel_attention).aux
        rounded = problem.call(multilevel_attention, precision="float32").aux
        for name in (name for name in exact if name.startswith("argmax")):
            np.testing.assert_array_equal(rounded[name], exact[name], err_msg=name)

    same_argmax()


def test_multilevel_margin_rule_sees_a_tie():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 2))
    x[0, 1] = x[0, 0]  # two identical tokens in one unit: equal outputs, a tie in every feature
    weights = {name: rng.standard_normal((1, 2, 2)) for name in ("wq", "wk", "wv")}
    assert multilevel_margins(x, np.zeros((1, 2), dtype=np.int64), **weights).max() == 0.0


def h1d_coarse(a, level, n, first_token=False):
    """Coarse tokens of level ``level`` over the padded length of ``a`` (H, P, D): means over the real tokens of each
    group of ``2**level`` (or the group's first token), and how many real tokens each group has."""
    group = 1 << level
    coarse, counts = [], []
    for start in range(0, a.shape[1], group):
        real = [t for t in range(start, start + group) if t < n]
        counts.append(len(real))
        if not real:
            coarse.append(np.zeros(a.shape[::2]))
        else:
            coarse.append(a[:, real[0]] if first_token else a[:, real].mean(axis=1))
    return np.stack(coarse, axis=1), np.array(counts)


def h1d_kept(level, i, j, r, causal, neighbours, finest):
    """Which terms keep coarse query i with coarse key j at ``level`` (blocks of r): the H-matrix coverage rule.

    Level 0: its own block (causal: j <= i) and, with ``finest``, its neighbours; level l >= 1: neighbouring blocks
    whose level-(l-1) blocks are not neighbours (tridiagonal), or the sibling. Causal: only blocks before.
    Returns the term's name, or None.
    """
    bi, bj = i // r, j // r
    if level == 0 and bi == bj:
        return "own" if not causal or j <= i else None
    if level == 0 and not finest:
        return None
    if neighbours == "siblings":
        return "sibling" if bj == bi ^ 1 and (not causal or bj < bi) else None
    if abs(bi - bj) != 1 or (causal and bj > bi):
        return None
    if level > 0 and abs((2 * i) // r - (2 * j) // r) <= 1:
        return None  # the finer level covers this pair
    return "left" if bj < bi else "right"


def h1d_margins(q, k, v, block_size, causal=False, padding=False, preset=None, num_levels=None, scale=None, **given):
    """Each per-level row maximum's gap over its rounding scale, block row by block row (one head at a time).

    Written from spec/hierarchical.md: the lucidrains preset's values (per-level maxima, siblings, no level-0
    sibling when causal, one level fewer when non-causal), coarse queries and keys as means (or first tokens),
    and the kept pairs of :func:`h1d_kept`. Scale: ``scale · Σ_d |q_d| mean|k|_d`` over the row's kept keys.
    """
    lucidrains = preset == "lucidrains"
    row_max = given.get("row_max", "per_level" if lucidrains else "shared")
    if row_max != "per_level":
        return np.zeros(0)
    neighbours = given.get("neighbours", "siblings" if lucidrains else "tridiagonal")
    finest = given.get("finest_sibling", not (lucidrains and causal))
    first_token = given.get("coarse_queries", "first" if causal and not lucidrains else "all") == "first"
    n, r = q.shape[2], block_size
    p = r
    while p < n:
        p *= 2
    if num_levels is None:
        num_levels = max(1, int(np.log2(p // r))) - (lucidrains and not causal)
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    pad = lambda a: np.pad(a, ((0, 0), (0, 0), (0, p - n), (0, 0)))  # noqa: E731
    margins = []
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qh, kh = pad(q)[b, h][None], pad(k)[b, h // group][None]
            for level in range(num_levels):
                cq, counts = h1d_coarse(qh, level, n, first_token)
                sq, _ = h1d_coarse(np.abs(qh), level, n, first_token)
                ck, _ = h1d_coarse(kh, level, n)
                sk, _ = h1d_coarse(np.abs(kh), level, n)
                for i in np.flatnonzero(counts):
                    by_term = {}
                    for j in np.flatnonzero(counts):
                        term = h1d_kept(level, i, j, r, causal, neighbours, finest)
                        if term is not None:
                            by_term.setdefault(term, []).append(j)
                    for keys in by_term.values():
                        if len(keys) > 1:
                            scores = scale * ck[0, keys] @ cq[0, i]
                            first, second = np.sort(scores)[::-1][:2]
                            margins.append((first - second) / (scale * (sk[0, keys] @ sq[0, i])).max())
    return np.array(margins)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_h1d_row_maxima_are_far_from_ties(precision):
    @MARGINS
    @given(problems("h1d", precision))
    def far(problem):
        per_level = problem.params.get("row_max", "per_level" if problem.preset == "lucidrains" else "shared")
        assume(per_level == "per_level")
        margins = h1d_margins(**problem.arrays, **problem.params)
        assert margins.size == 0 or margins.min() >= tie_margin(precision)

    far()


def test_h1d_margin_rule_sees_a_tie():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 2, 3))
    k = np.repeat(rng.standard_normal((1, 1, 1, 3)), 2, axis=2)  # two equal keys in one block: a tied maximum
    assert h1d_margins(q, k, k, 2, preset="lucidrains", num_levels=1).max() == 0.0
