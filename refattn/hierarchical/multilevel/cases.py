"""Conformance cases of multi-level attention (spec/hierarchical.md).

Tokens are grouped unevenly (units of 1 to 5 tokens); projections are drawn
with standard deviation 1/sqrt(C) so that every level's scores stay of order 1.
Max-pooling cases store the argmax and its margin: the sizes are chosen so
that no unit's maximum is within 2e-3 of its runner-up (``aux["margin_<l>"]``;
tests/test_hierarchical_multilevel.py checks it), far above float32 rounding.
"""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, make_case

FLAGS = {
    "MULTILEVEL_UNITS": "Attention stays inside each unit of a level (block-diagonal over uneven unit lengths).",
    "MULTILEVEL_AGGREGATE": "G aggregates a unit's outputs into one vector: attention pooling softmax(tanh(W h + b)·u), "
    "mean, max, first element or given weights.",
    "MULTILEVEL_TOKEN_RULE": "A token's output adds the outputs of the elements above it (its sentence's, its "
    "document's), or is its own level-0 output.",
    "MULTILEVEL_MAX_SUBGRADIENT": "Max pooling's gradient goes to the first element attaining the maximum; the "
    "argmax and its margin to the runner-up are integer/float intermediates.",
}

#: Two levels over 13 tokens: 5 sentences of 3, 2, 1, 5, 2 tokens; 2 documents of 2 and 3 sentences.
SEGMENTS = np.array([[0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 4, 4],
                     [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])  # fmt: skip
#: Three levels over 10 tokens: words -> phrases -> sentences -> one document.
THREE_LEVELS = np.array([[0, 0, 1, 1, 1, 2, 3, 3, 4, 4],
                         [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # fmt: skip


def _arrays(b, segments, c, d, aggregate, a=4):
    levels, n = segments.shape

    def arrays(rng):
        out = {"x": rng.standard_normal((b, n, c)), "segments": segments}
        for name, width in (("wq", d), ("wk", d), ("wv", c)):
            out[name] = rng.standard_normal((levels, c, width)) / np.sqrt(c)
        if aggregate == "attention_pool":
            out |= {"pool_w": rng.standard_normal((levels, c, a)) / np.sqrt(c),
                    "pool_b": rng.standard_normal((levels, a)), "context": rng.standard_normal((levels, a))}  # fmt: skip
        if aggregate == "weights":
            out["pool_weights"] = rng.uniform(0.0, 1.0, (levels, n))
        return out

    return arrays


def _case(name, description, flags, *, b=1, segments=SEGMENTS, c=8, d=6, aggregate="attention_pool", **params) -> Case:
    differentiable = ("x", "wq", "wk", "wv") + {"attention_pool": ("pool_w", "pool_b", "context"),
                                                "weights": ("pool_weights",)}.get(aggregate, ())  # fmt: skip
    return make_case("multilevel", name, description, flags, _arrays(b, segments, c, d, aggregate),
                     params={"aggregate": aggregate, **params},
                     differentiable=differentiable)  # fmt: skip


def cases() -> list[Case]:
    return [
        _case("han_per_token", "HAN: attention pooling, tokens -> 5 sentences -> 2 documents, per-token sum rule.",
              ("BASELINE", "MULTILEVEL_UNITS", "MULTILEVEL_AGGREGATE", "MULTILEVEL_TOKEN_RULE")),
        _case("han_per_unit", "HAN document vectors: attention pooling at both levels, one output per document, B=2.",
              ("MULTILEVEL_AGGREGATE", "MULTI_BATCH"), b=2, output="per_unit"),
        _case("mean_own", "Mean pooling, each token's own level-0 output, C=7, D=59.",
              ("MULTILEVEL_AGGREGATE", "MULTILEVEL_TOKEN_RULE", "AWKWARD_HEAD_DIM"), c=7, d=59, aggregate="mean",
              token_rule="own"),
        _case("max_pool", "Max pooling over three levels, per unit: argmax and margin in aux.",
              ("MULTILEVEL_AGGREGATE", "MULTILEVEL_MAX_SUBGRADIENT"), segments=THREE_LEVELS, aggregate="max",
              output="per_unit", d=5, c=5),
        _case("first_token", "First-element pooling (a [CLS]-like unit vector), three levels, per token.",
              ("MULTILEVEL_AGGREGATE", "MULTILEVEL_TOKEN_RULE"), segments=THREE_LEVELS, aggregate="first"),
        _case("given_weights", "A given weight matrix per level, per token, scale 0.5.",
              ("MULTILEVEL_AGGREGATE", "SCALE_OVERRIDE"), aggregate="weights", scale=0.5),
    ]  # fmt: skip
