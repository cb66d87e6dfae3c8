"""Conformance cases of generic low-rank attention (factors drawn positive, so that row sums are far from 0)."""

from __future__ import annotations

from ...conformance.case import Case, make_case

FLAGS = {
    "LOWRANK_NORMALIZATION": "Normalised U(WV) ⊘ U(W1) against the plain product U(WV) (Nyström's form); "
    "an implementation that normalises, or does not, gives other numbers.",
    "LOWRANK_FACTOR_ORDER": "W is (r, Nk), not (Nk, r): a transposed factor chains only when shapes hide it.",
}


def _factors(b, h, nq, nk, r, dv):
    def arrays(rng):
        return {"u": rng.random((b, h, nq, r)) + 0.1, "w": rng.random((b, h, r, nk)) + 0.1,
                "v": rng.standard_normal((b, h, nk, dv))}  # fmt: skip

    return arrays


def _case(name, description, flags, sizes, **params) -> Case:
    return make_case("lowrank", name, description, flags, _factors(*sizes), params=params, differentiable=("u", "w", "v"))


def cases() -> list[Case]:
    return [
        _case("normalized", "B=1, H=2, 7 queries over 11 keys, rank 3, Dv=5, normalised.",
              ("BASELINE", "LOWRANK_NORMALIZATION", "UNEQUAL_LENGTHS"), (1, 2, 7, 11, 3, 5)),
        _case("unnormalized", "The plain product U(WV), B=2, rank 4, Dv=59.",
              ("LOWRANK_NORMALIZATION", "MULTI_BATCH", "AWKWARD_HEAD_DIM"), (2, 1, 9, 9, 4, 59), normalized=False),
        _case("rank_one", "Rank 1, unnormalised (normalised, every row would be the same mean of V and dU 0).",
              ("LOWRANK_FACTOR_ORDER", "LOWRANK_NORMALIZATION"), (1, 2, 5, 13, 1, 4), normalized=False),
        _case("single_query_rank_above_keys", "One query, rank 6 above Nk = 4 keys.",
              ("SINGLE_TOKEN", "LOWRANK_FACTOR_ORDER"), (1, 1, 1, 4, 6, 3)),
    ]
