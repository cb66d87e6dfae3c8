"""Conformance cases of routing attention (registry name "routing").

Every case is built with :func:`~refattn.routing.problems.routed_problem`, so
that its decisions (nearest centroids, cluster members, their order) have a
margin of at least :data:`~refattn.routing.problems.MIN_RELATIVE_MARGIN` of
``|r| |μ|`` and are reproduced exactly at float32, float16 and bfloat16.
Centroids and key padding masks are arrays of the case (``param.*``); memory
key/values are inputs with gradients. Each preset has its own cases, with the
preset named both in the case and in its parameters.

Arrays are drawn with the shared helpers of refattn/conformance/case.py
(seeded by the CRC-32 of the case id): the problem, then the key padding
mask, then the memory key/values.
"""

from __future__ import annotations

import numpy as np

from ..conformance.case import EXACT_TIES, EXACT_TIES_DESCRIPTION, Case, Dims, make_case
from .problems import preset_problem, random_key_padding, routing_dims, zero_padded_tokens

#: The flags only routing attention's cases carry (the shared catalogue is refattn/conformance/flags.py).
FLAGS = {
    "ROUTING_BALANCED_TOPK": (
        "Each centroid selects the `cluster_size` tokens most similar to it (balanced clusters of exactly `cluster_size` "
        "members; a token may be in several clusters or in none), ties to the lower position. Fails an "
        "implementation that clusters each token with its nearest centroid (unbalanced k-means clusters, cut or "
        "padded to the cluster size), or ranks tokens by distance instead of similarity."
    ),
    "ROUTING_SCATTER_MEAN_EPS": (
        "A token's output is the sum of what the clusters that picked it computed for it, divided by count + "
        "scatter_eps: 0 in the canonical semantics (the exact mean), 1e-2 for google-research "
        "(scatter_cluster_items), 1e-5 for lucidrains (scatter_mean). Cases have tokens in several clusters. "
        "Fails a sum without the division, the count alone under a preset, or another preset's eps."
    ),
    "ROUTING_UNROUTED_TOKEN": (
        "With K * cluster_size < N some tokens are in no query list: their output is exactly 0 (a sum over nothing), "
        "they are listed in aux.unrouted, and their gradients are 0. Fails 0 / 0 = NaN when scatter_eps = 0, and "
        "falling back to the token's own value or to dense attention."
    ),
    "ROUTING_CAUSAL_BY_POSITION": (
        "Causal routing attention compares the tokens' positions: query slot s sees key slot t iff "
        "key_membership[t] <= membership[s] (lucidrains: indices >= kv_indices); memory slots are always "
        "visible. Cases route q and k separately, so the lists differ and some rows are empty (out 0, aux.slot_lse -inf). "
        "Fails masking by slot (t <= s), which shows a query later tokens and hides earlier ones."
    ),
    "ROUTING_SLOT_CAUSAL": (
        "google-research masks causally by slot inside a cluster (attention_bias_lower_triangle(window): key "
        "slot t <= query slot s, the lists sorted by position), which with separate query and key lists lets "
        "a query attend to later tokens. Its preset reproduces that; fails an implementation that masks by "
        "position under the google_research preset."
    ),
    "ROUTING_ZERO_PADDING": (
        "google-research takes no padding mask: a token whose vector is all zero is padding (embedding_to_padding), "
        "so google cases put zero q, k and v at padded tokens and google's own code reproduces them. Zero routing "
        "vectors have similarity 0 to every centroid: exact ties among padded tokens, to the lower position (TF "
        "top_k) and to centroid 0 (argmax). Fails an implementation that routes padded tokens otherwise, or "
        "breaks those ties by the higher index."
    ),
    "SHARED_QK_SELF_MASK": (
        "Under shared-QK the key lists are the query lists, and a token's own key follows the preset: canonical "
        "excludes it unless no other key of its row is allowed (Reformer's rule), lucidrains replaces its logit "
        "by -5e4 (TOKEN_SELF_ATTN_VALUE) after the other masks, google-research does not mask it. Fails no self "
        "mask, an exact self mask that empties first rows, or one preset's rule under another."
    ),
    "SHARED_QK_KEYS_FROM_K": (
        "Under shared-QK the key lists are routed by q, but the key vectors are the given k (prescaled like q, "
        "normalised where the preset says); the published models pass k = q. The case has k != q. Fails keys "
        "taken from q, which changes the output and moves the key role's gradient into dq."
    ),
    "ROUTING_MASK_ADDED": (
        "mask_mode='add' (google-research, which adds the bias -1e9 to the logits): a masked key's logit is its "
        "score + mask_value, not mask_value, so a row with no allowed key is the softmax of its scores and its "
        "masked keys get gradients; rows with an allowed key are unchanged. Fails replacing the logit under "
        "the google_research preset (a uniform row)."
    ),
    EXACT_TIES: EXACT_TIES_DESCRIPTION,
    "SHARED_QK_SELF_RULE_MEMORY": (
        "The Reformer self rule (canonical shared-QK) keeps a token's own key only when no other key of its row is "
        "unmasked, and memory slots are keys of the row: with memory the own key is always excluded. The case is "
        "causal with one memory slot, so each cluster's first member has no earlier member. Fails counting member "
        "keys only (the first member then attends to itself and the memory key)."
    ),
    "SHARED_QK_SELF_RULE_FINITE_MASK": (
        "The Reformer self rule counts a masked key as absent even when a finite mask_value gives it a logit "
        "(replace mode): a row whose other keys are all masked keeps its own key and attends to itself alone. The "
        "case is causal with mask_value -1e4. Fails counting every key with a finite logit (the row is then uniform "
        "over its masked keys)."
    ),
    "LUCIDRAINS_SELF_WRITTEN_LAST": (
        "lucidrains writes the self logit (-5e4) after every other mask (masked_fill order), un-masking a padded "
        "query's own key: with its window keys at -finfo(float32).max it attends to itself alone. Fails writing "
        "the self value only where the self key was allowed (a uniform row over the masked keys)."
    ),
}


def leading_padding(count: int):
    """A ``key_padding_mask`` maker (B, N): the first ``count`` tokens of every batch element padded."""

    def make(rng, dims: Dims) -> np.ndarray:
        mask = np.ones((dims.b, dims.nq), dtype=bool)
        mask[:, :count] = False
        return mask

    return make


#: Why a google-research padding case's VJP is not the derivative of its forward (Case.not_a_derivative).
ZERO_PADDING_TIE = (
    "padded tokens are zero vectors, whose similarities to every centroid tie exactly; any perturbation breaks "
    "the tie, while the VJP holds the routing fixed"
)


#: Why a tie case's VJP is not the derivative of its forward (Case.not_a_derivative).
COPIES_TIE = (
    "the second half of the tokens copies the first half's q and k, so every cluster's last member ties exactly "
    "with its copy; any perturbation breaks the tie, while the VJP holds the routing fixed"
)


def copied_halves(problem: dict) -> dict:
    """``problem`` with the q and k of tokens N/2 ... N-1 copies of those of tokens 0 ... N/2-1 (v unchanged).

    A copy has bit-identical similarities to every centroid in every precision: with an odd ``cluster_size``
    each cluster's last member ties with its copy, which the tie rule (the lower position first) leaves out.
    """
    half = problem["q"].shape[2] // 2
    copied = dict(problem)
    for name in ("q", "k"):
        copied[name] = problem[name].copy()
        copied[name][:, :, half : 2 * half] = problem[name][:, :, :half]
    return copied


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, clusters: int, cluster_size: int,
          preset=None, shared_qk=False, causal=False, padding=False, memory=0, own_k=False, copies=False,
          **params) -> Case:  # fmt: skip
    """One "routing" case; ``params`` are further JSON keyword arguments (preset overrides).

    ``padding`` is True (:func:`random_key_padding`) or a mask maker; ``own_k`` redraws ``k`` (standard normal)
    after the problem under shared-QK, so that k != q; ``copies`` makes the tie case of :func:`copied_halves`.
    """

    def arrays(rng):
        out = preset_problem(rng, dims, clusters, preset, shared_qk=shared_qk)
        if copies:
            out = copied_halves(out)
        if own_k:
            out["k"] = rng.standard_normal(out["k"].shape)
        if padding:
            out["key_padding_mask"] = (random_key_padding if padding is True else padding)(rng, dims)
            if preset == "google_research":  # google-research knows padding by zero vectors only
                out = zero_padded_tokens(out, out["key_padding_mask"])
        if memory:
            out["mem_k"] = rng.standard_normal((dims.hq, clusters, memory, dims.d))
            out["mem_v"] = rng.standard_normal((dims.hq, clusters, memory, dims.dv))
        return out

    return make_case(
        "routing", name, description, flags, arrays,
        params=dict(cluster_size=cluster_size, shared_qk=shared_qk, causal=causal, preset=preset, **params),
        differentiable=("q", "k", "v", "mem_k", "mem_v") if memory else ("q", "k", "v"), preset=preset,
        not_a_derivative=COPIES_TIE if copies else ZERO_PADDING_TIE if padding and preset == "google_research" else None,
    )  # fmt: skip


def cases() -> list[Case]:
    """The routing-attention cases, in reading order."""
    g, l = "google_research", "lucidrains"
    return [
        # --- canonical ------------------------------------------------------------
        _case("canonical_basic", "Canonical: 4 centroids x cluster size 8 = N = 32, 2 heads, not causal.",
              ("ROUTING_BALANCED_TOPK",), routing_dims(1, 2, 32, 16, 16), clusters=4, cluster_size=8),
        _case("canonical_overlap", "Canonical: 4 clusters of 8 over N = 16: tokens in up to 4 clusters, exact mean.",
              ("ROUTING_BALANCED_TOPK", "ROUTING_SCATTER_MEAN_EPS"), routing_dims(1, 2, 16, 16, 12),
              clusters=4, cluster_size=8),
        _case("canonical_unrouted", "Canonical: 2 clusters of 6 over N = 24: half the tokens unrouted, output 0.",
              ("ROUTING_UNROUTED_TOKEN",), routing_dims(1, 2, 24, 16, 16), clusters=2, cluster_size=6),
        _case("canonical_causal", "Canonical causal, separate query and key lists: by position; some rows empty.",
              ("ROUTING_CAUSAL_BY_POSITION", "FULLY_MASKED_ROW"), routing_dims(1, 2, 32, 16, 16),
              clusters=4, cluster_size=8, causal=True),
        _case("canonical_shared_causal", "Canonical shared-QK, causal: no self-attention unless alone.",
              ("SHARED_QK_SELF_MASK",), routing_dims(1, 2, 32, 16, 16), clusters=4, cluster_size=8,
              shared_qk=True, causal=True),
        _case("canonical_shared_own_k", "Canonical shared-QK with k != q (k drawn after the problem): the key lists "
              "are the query lists, the key vectors are layer-normalised k, not q.",
              ("SHARED_QK_KEYS_FROM_K", "SHARED_QK_SELF_MASK"), routing_dims(1, 2, 16, 16, 16), clusters=3,
              cluster_size=6, shared_qk=True, own_k=True),
        _case("canonical_ties", "Canonical, tokens 8-15 copy the q and k of tokens 0-7 (bit-identical similarities), "
              "clusters of 5: each cluster's fifth member ties exactly with its copy, and the lower position is taken.",
              (EXACT_TIES, "ROUTING_BALANCED_TOPK"), routing_dims(1, 2, 16, 16, 16), clusters=3, cluster_size=5,
              copies=True),
        _case("canonical_shared_memory", "Canonical shared-QK, causal, one memory slot per cluster: a cluster's first "
              "member has no earlier member, but the memory key is another key of its row, so its own key is excluded.",
              ("SHARED_QK_SELF_RULE_MEMORY", "SHARED_QK_SELF_MASK"), routing_dims(1, 2, 16, 16, 16), clusters=3,
              cluster_size=6, shared_qk=True, causal=True, memory=1),
        _case("canonical_shared_finite_mask", "Canonical shared-QK, causal, mask_value -1e4 replacing masked logits: a "
              "cluster's first member's other keys are all masked, which counts as absent despite their finite "
              "logits, so it keeps its own key and attends to itself alone.",
              ("SHARED_QK_SELF_RULE_FINITE_MASK", "SHARED_QK_SELF_MASK"), routing_dims(1, 2, 16, 16, 16), clusters=3,
              cluster_size=6, shared_qk=True, causal=True, mask_value=-1e4),
        _case("canonical_padding", "Canonical, B = 2, padded tokens: masked as keys, their rows empty; Dv = 12.",
              ("PADDING_MASK", "MULTI_BATCH", "ROUTING_UNROUTED_TOKEN"), routing_dims(2, 2, 24, 16, 12),
              clusters=3, cluster_size=6, padding=True),
        # --- google-research ------------------------------------------------------
        _case("google_basic", "google-research: layer norm after q/sqrt(D), scale 1, scatter eps 1e-2.",
              ("ROUTING_BALANCED_TOPK", "ROUTING_SCATTER_MEAN_EPS"), routing_dims(1, 2, 32, 16, 16),
              clusters=4, cluster_size=8, preset=g),
        _case("google_slot_causal", "google-research causal: separate lists masked by slot, not position.",
              ("ROUTING_SLOT_CAUSAL",), routing_dims(1, 2, 32, 16, 16), clusters=4, cluster_size=8, preset=g,
              causal=True),
        _case("google_shared_causal", "google-research shared-QK causal, D = 6: slot = position, no self mask.",
              ("SHARED_QK_SELF_MASK", "ROUTING_UNROUTED_TOKEN"), routing_dims(1, 2, 24, 6, 6),
              clusters=2, cluster_size=8, preset=g, shared_qk=True, causal=True),
        _case("google_padding", "google-research, B = 2, q, k, v zero at padded tokens (google's padding convention: "
              "its own code finds the same padding), padded keys masked by -1e9, padded rows computed.",
              ("ROUTING_SCATTER_MEAN_EPS", "MULTI_BATCH", "ROUTING_ZERO_PADDING"), routing_dims(2, 2, 24, 16, 16), clusters=3,
              cluster_size=8, preset=g, padding=True),
        _case("google_add_empty_rows", "google-research causal, the first 6 of 16 tokens padded (zero vectors): a "
              "query slot whose key slots up to its own are all padded has no allowed key, and google adds -1e9 to "
              "every logit of its row (padded and later keys), so the row is the softmax of its scores, not uniform. "
              "mask_value -1e4 instead of -1e9, so that float16 holds aux.slot_lse; out and the gradients are "
              "google's (exp underflows to 0 either way).",
              ("ROUTING_MASK_ADDED", "ROUTING_SLOT_CAUSAL", "ROUTING_ZERO_PADDING", EXACT_TIES),
              routing_dims(1, 2, 16, 8, 8), clusters=3, cluster_size=8, preset=g, causal=True, padding=leading_padding(6), mask_value=-1e4),
        # --- lucidrains -------------------------------------------------------------
        _case("lucidrains_basic", "lucidrains: L2 routing, raw q/k, 1/sqrt(D), slots by similarity, eps 1e-5.",
              ("ROUTING_BALANCED_TOPK", "ROUTING_SCATTER_MEAN_EPS"), routing_dims(1, 2, 32, 16, 16),
              clusters=4, cluster_size=8, preset=l),
        _case("lucidrains_causal_memory", "lucidrains causal with one memory key/value per cluster (num_mem_kv).",
              ("ROUTING_CAUSAL_BY_POSITION",), routing_dims(1, 2, 32, 16, 16), clusters=4, cluster_size=8,
              preset=l, causal=True, memory=1),
        _case("lucidrains_shared_causal", "lucidrains shared-QK causal: keys L2-normalised, self logit -5e4.",
              ("SHARED_QK_SELF_MASK",), routing_dims(1, 2, 32, 16, 16), clusters=4, cluster_size=8, preset=l,
              shared_qk=True, causal=True),
        _case("lucidrains_shared_padding", "lucidrains shared-QK with padding: a padded query's window keys are "
              "masked, then its self logit is written -5e4, so it attends to itself alone.",
              ("LUCIDRAINS_SELF_WRITTEN_LAST", "SHARED_QK_SELF_MASK"), routing_dims(1, 2, 24, 16, 16), clusters=3,
              cluster_size=8, preset=l, shared_qk=True, padding=True),
        _case("lucidrains_unrouted_memory", "lucidrains, B = 2, 2 clusters of 6 over 24, padding, 2 memory slots.",
              ("ROUTING_UNROUTED_TOKEN", "ROUTING_SCATTER_MEAN_EPS", "MULTI_BATCH"), routing_dims(2, 2, 24, 16, 16),
              clusters=2, cluster_size=6, preset=l, padding=True, memory=2),
    ]  # fmt: skip
