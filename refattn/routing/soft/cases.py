"""Conformance cases of soft routing (registry name "soft_routing").

q, k, v, then the router's features ``x`` and weights ``W_r`` (standard
deviation 1.5, so that the mixtures are far from uniform), drawn with the
shared helpers of refattn/conformance/case.py, seeded by the CRC-32 of the case id.
"""

from __future__ import annotations

from ...conformance.case import Case, Dims, draw, make_case, normal

#: The flags only soft routing's cases carry.
FLAGS = {
    "SOFT_ROUTING": (
        "Soft routing mixes P attention paths per token: out[b, h, n] = sum_p softmax_p(x[b, n] . W_r) * "
        "O_p[b, h, n], the heads of a token sharing its distribution; gradients reach W_r, x and every path. "
        "Fails normalising the probabilities over tokens instead of paths, W_r applied transposed, and "
        "gradients that stop at the probabilities."
    ),
}


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, features: int, path_causal: list,
          path_window: list) -> Case:  # fmt: skip
    router = {
        "x": normal(lambda d: (d.b, d.nq, features)),
        "routing_weights": normal(lambda d: (features, len(path_causal)), 1.5),
    }
    return make_case(
        "soft_routing", name, description, flags, draw(dims, router),
        params=dict(path_causal=path_causal, path_window=path_window),
        differentiable=("q", "k", "v", "x", "routing_weights"),
    )  # fmt: skip


def cases() -> list[Case]:
    """The soft-routing cases, in reading order."""
    return [
        _case("three_paths", "Per-token softmax(x W_r) over dense, causal and local (4 back) paths.",
              ("SOFT_ROUTING",), Dims(1, 2, 2, 12, 12, 8), features=6, path_causal=[False, True, True],
              path_window=[None, None, [4, 0]]),
        _case("two_paths_batch", "B = 2, 3 heads sharing each token's mixture of a dense and a local path.",
              ("SOFT_ROUTING", "MULTI_BATCH"), Dims(2, 3, 3, 10, 10, 8), features=5, path_causal=[False, False],
              path_window=[None, [2, 2]]),
    ]  # fmt: skip
