"""Multi-level attention (refattn.hierarchical.multilevel) against an independent transcription.

The expected values come from loops over units written here from the
definitions in spec/hierarchical.md (HAN's word and sentence attention,
generalised), never from the code under test.
"""

import numpy as np
import pytest

import refattn
from refattn.hierarchical import multilevel_attention, multilevel_attention_vjp
from refattn.hierarchical.multilevel import cases, properties
from tests.finite_differences import finite_differences

L, C, D, A = 2, 4, 3, 5


def problem(rng, segments, aggregate, b=2):
    levels, n = segments.shape
    arrays = {"x": rng.standard_normal((b, n, C)), "wq": rng.standard_normal((levels, C, D)),
              "wk": rng.standard_normal((levels, C, D)), "wv": rng.standard_normal((levels, C, C)) / 2}  # fmt: skip
    if aggregate == "attention_pool":
        arrays |= {"pool_w": rng.standard_normal((levels, C, A)), "pool_b": rng.standard_normal((levels, A)),
                   "context": rng.standard_normal((levels, A))}  # fmt: skip
    if aggregate == "weights":
        arrays["pool_weights"] = rng.uniform(size=(levels, n))
    return arrays


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def transcription(x, segments, wq, wk, wv, aggregate, output, token_rule, pool_w=None, pool_b=None, context=None,
                  pool_weights=None):  # fmt: skip
    """One batch element, unit by unit: attention inside each unit, G, up a level; the output rule at the end."""
    n = x.shape[0]
    h, outputs, element_of_token = x, [], np.arange(n)
    for level in range(segments.shape[0]):
        # the unit of each element: elements are tokens at level 0, the previous level's units above
        units = np.array([segments[level][np.flatnonzero(element_of_token == e)[0]] for e in range(h.shape[0])])
        o = np.zeros((h.shape[0], wv.shape[2]))
        pooled = []
        for u in range(units.max() + 1):
            members = np.flatnonzero(units == u)
            q, k, v = h[members] @ wq[level], h[members] @ wk[level], h[members] @ wv[level]
            for row, i in enumerate(members):
                o[i] = softmax(q[row] @ k.T / np.sqrt(D)) @ v
            if aggregate == "attention_pool":
                alpha = softmax(np.tanh(o[members] @ pool_w[level] + pool_b[level]) @ context[level])
                pooled.append(alpha @ o[members])
            elif aggregate == "mean":
                pooled.append(o[members].mean(axis=0))
            elif aggregate == "max":
                pooled.append(o[members].max(axis=0))
            elif aggregate == "first":
                pooled.append(o[members[0]])
            else:
                pooled.append(pool_weights[level, members] @ o[members])
        outputs.append(o[element_of_token])
        h, element_of_token = np.array(pooled), segments[level]
    if output == "per_unit":
        return h
    return sum(outputs) if token_rule == "sum" else outputs[0]


SEGMENTS = np.array([[0, 0, 1, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 1, 1]])


@pytest.mark.parametrize("aggregate", ["attention_pool", "mean", "max", "first", "weights"])
@pytest.mark.parametrize("output, token_rule", [("per_token", "sum"), ("per_token", "own"), ("per_unit", "sum")])
def test_equals_the_unit_by_unit_transcription(aggregate, output, token_rule):
    arrays = problem(np.random.default_rng(1), SEGMENTS, aggregate)
    got = multilevel_attention(**arrays, segments=SEGMENTS, aggregate=aggregate, output=output, token_rule=token_rule)
    for b in range(2):
        per_item = {name: value[b] if name == "x" else value for name, value in arrays.items()}
        want = transcription(**per_item, segments=SEGMENTS, aggregate=aggregate, output=output, token_rule=token_rule)
        np.testing.assert_allclose(got.out[b], want, atol=1e-12)


@pytest.mark.parametrize("aggregate, output", [("attention_pool", "per_token"), ("attention_pool", "per_unit"),
                                               ("max", "per_token"), ("weights", "per_unit"), ("mean", "per_token")])  # fmt: skip
def test_vjp_matches_finite_differences(aggregate, output):
    rng = np.random.default_rng(2)
    arrays = problem(rng, SEGMENTS, aggregate, b=1)
    params = {"segments": SEGMENTS, "aggregate": aggregate, "output": output}
    result = multilevel_attention(**arrays, **params)
    dout = rng.standard_normal(result.out.shape)
    grads = multilevel_attention_vjp(dout, **arrays, **params)
    assert set(grads) == set(arrays)
    for name in arrays:
        want = finite_differences(multilevel_attention, arrays, params, dout, None, name)
        np.testing.assert_allclose(grads[name], want, atol=1e-7, err_msg=name)


def test_max_pooling_reports_argmax_and_margin():
    arrays = problem(np.random.default_rng(3), SEGMENTS, "max")
    result = multilevel_attention(**arrays, segments=SEGMENTS, aggregate="max")
    assert result.aux["argmax_0"].shape == (2, 4, C) and result.aux["argmax_0"].dtype == np.int64
    assert np.all(result.aux["margin_0"][:, [0, 1, 3]] > 0)  # units of several tokens
    assert np.all(result.aux["margin_0"][:, 2] == 0)  # unit 2 has one token: no decision


def test_max_pool_case_has_a_safe_margin():
    case = next(c for c in cases.cases() if c.id == "multilevel/max_pool")
    result = multilevel_attention(**case.arrays(np.random.default_rng(case.seed)), **case.params)
    decided = [v[v != 0] for name, v in result.aux.items() if name.startswith("margin")]
    assert min(float(v.min()) for v in decided) > 2e-3


def test_single_elements_pass_through():
    segments = np.tile(np.arange(6), (3, 1))
    arrays = problem(np.random.default_rng(4), segments, "attention_pool")
    x = arrays.pop("x")
    properties.single_elements_pass_through(multilevel_attention, x, {**arrays, "segments": segments,
                                                                       "aggregate": "attention_pool"})  # fmt: skip


@pytest.mark.parametrize("aggregate", ["attention_pool", "mean", "max", "first"])
def test_one_token_units_reduce_to_the_level_above(aggregate):
    segments = np.array([np.arange(8), [0, 0, 1, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 1, 1]])
    arrays = problem(np.random.default_rng(5), segments, aggregate)
    x = arrays.pop("x")
    properties.one_token_units_reduce(multilevel_attention, x,
                                      {**arrays, "segments": segments, "aggregate": aggregate, "output": "per_unit"})


@pytest.mark.parametrize("segments, argument", [
    (np.array([[0, 0, 2, 2]]), "segments"),  # skips unit 1
    (np.array([[0, 1, 0, 1]]), "segments"),  # not sorted
    (np.array([[1, 1, 2, 2]]), "segments"),  # tokens before the first unit left out
    (np.array([[0, 0, 1, 1], [0, 1, 1, 1]]), "segments"),  # a level-0 unit split between two level-1 units
    (np.array([[0.0, 0, 1, 1]]), "segments"),
    (np.array([[0, 0, 1]]), "segments"),
])  # fmt: skip
def test_bad_segments_are_spec_errors(segments, argument):
    arrays = problem(np.random.default_rng(0), np.zeros((segments.shape[0], 4), int), "mean")
    with pytest.raises(refattn.SpecError) as error:
        multilevel_attention(**arrays, segments=segments, aggregate="mean")
    assert error.value.argument == argument


@pytest.mark.parametrize("change, argument", [
    ({"aggregate": "median"}, "aggregate"),
    ({"wq": np.ones((2, 5, 3))}, "wq"),
    ({"wv": np.ones((2, 4, 3))}, "wv"),
    ({"wk": np.ones((1, 4, 3))}, "wk"),
    ({"pool_w": np.ones((2, 4, 5))}, "pool_w"),  # given with aggregate="mean"
    ({"aggregate": "attention_pool"}, "pool_w"),  # missing
    ({"output": "per_document"}, "output"),
])  # fmt: skip
def test_bad_parameters_are_spec_errors(change, argument):
    arrays = problem(np.random.default_rng(0), SEGMENTS, "mean")
    params = {**arrays, "segments": SEGMENTS, "aggregate": "mean", **change}
    with pytest.raises(refattn.SpecError) as error:
        multilevel_attention(**params)
    assert error.value.argument == argument
