"""Conformance cases of cosine attention: shared helpers, one flag of its own."""

from refattn.conformance.case import Dims, draw, make_case

FLAGS = {
    "COSINE_NOT_DOT": (
        "Logits are tau times the cosine of q and k, not their scaled dot product: inputs of very different "
        "norms give different outputs under the two readings."
    ),
}


def cases():
    return [
        make_case("cosine", "baseline", "Cosine attention, tau = 10, N = 9, D = 5.", ("BASELINE", "COSINE_NOT_DOT"),
                  draw(Dims(1, 2, 2, 9, 9, 5), std=3.0), params={"logit_scale": 10.0}),
        make_case("cosine", "causal_cross", "4 queries over 7 keys, causal bottom-right.", ("CAUSAL_ALIGNMENT",),
                  draw(Dims(2, 1, 1, 4, 7, 6)), params={"causal": True}),
    ]  # fmt: skip
