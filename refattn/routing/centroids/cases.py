"""Conformance cases of the centroid update (registry name "centroid_ema"; forward only).

The queries and keys come from :func:`~refattn.routing.problems.preset_problem`
(nearest centroids with a recorded margin), then the key padding mask, then
the ``"vq_ema"`` state; the centroids, mask and state are ``param.*`` arrays.
Seeds are the CRC-32 of the case id.
"""

from __future__ import annotations

from ...conformance.case import Case, Dims, make_case
from ..problems import preset_problem, random_key_padding, routing_dims, zero_padded_tokens

#: The flags only the centroid update's cases carry.
FLAGS = {
    "CENTROID_EMA": (
        "A centroid update assigns each routing vector to its nearest centroid by the centroids routing used "
        "(before the update). google-research (vq_ema): EMA of counts and sums, counts smoothed as (c + eps) / "
        "(n + K eps) * n with eps 1e-5, centroid = sums / smoothed counts, padded tokens left out. lucidrains "
        "(normalized_mean_ema): centroid <- decay * centroid + (1 - decay) * normalize(sum of its vectors), "
        "unchanged when it has none. Fails counting padded tokens, skipping the smoothing, not renormalising "
        "the new mean, and swapping decay and 1 - decay."
    ),
    "CENTROID_COUNT_HEADS_MIXED": (
        "Reproduces a defect of google-research's online_kmeans (google_research preset, count_rule="
        "'google_research'): the one-hot assignments [B, H, N, K] are reshaped to [-1, H, K] without a transpose "
        "and summed, so head h's count is credited from token s of head h' with (h' N + s) mod H = h. The right "
        "count is per head (count_rule='per_head', canonical). Fails the per-head count under this preset."
    ),
}


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, clusters: int, preset,
          shared_qk=False, padding=False, warm_state=False, empty_cluster=False, **params) -> Case:  # fmt: skip
    def arrays(rng):
        out = preset_problem(rng, dims, clusters, preset, shared_qk=shared_qk, empty_cluster=empty_cluster)
        if padding:
            out["key_padding_mask"] = random_key_padding(rng, dims)
            if preset == "google_research":  # google-research knows padding by zero vectors only
                out = zero_padded_tokens(out, out["key_padding_mask"])
        if warm_state:
            counts = rng.uniform(2.0, 12.0, (dims.hq, clusters))
            out["ema_counts"] = counts
            out["ema_sums"] = counts[..., None] * (out["centroids"] + 0.1 * rng.standard_normal(out["centroids"].shape))
        return out

    return make_case(
        "centroid_ema", name, description, flags, arrays, params=dict(shared_qk=shared_qk, preset=preset, **params),
        differentiable=("q", "k"), preset=preset, grad=False,
    )  # fmt: skip


def cases() -> list[Case]:
    """The centroid-update cases, in reading order."""
    g, l = "google_research", "lucidrains"
    return [
        _case("google_vq_padding", "google-research VQ EMA from q and k, decay 0.9: padded tokens (zero vectors) "
              "excluded; counts with heads mixed as online_kmeans forms them.",
              ("CENTROID_EMA", "CENTROID_COUNT_HEADS_MIXED"), routing_dims(1, 2, 24, 16, 16), clusters=4, preset=g, padding=True, decay=0.9),
        _case("google_vq_warm_state", "google-research VQ EMA, decay 0.999, from a given (counts, sums) state; "
              "counts with heads mixed.",
              ("CENTROID_EMA", "CENTROID_COUNT_HEADS_MIXED"), routing_dims(2, 2, 16, 16, 16), clusters=3, preset=g, warm_state=True),
        _case("lucidrains_normalized_mean", "lucidrains EMA toward normalised means, decay 0.9; one cluster empty.",
              ("CENTROID_EMA",), routing_dims(1, 2, 24, 16, 16), clusters=4, preset=l, empty_cluster=True, decay=0.9),
        _case("lucidrains_shared", "lucidrains shared-QK: only the queries update, decay 0.999.",
              ("CENTROID_EMA",), routing_dims(2, 2, 16, 16, 16), clusters=3, preset=l, shared_qk=True),
    ]  # fmt: skip
