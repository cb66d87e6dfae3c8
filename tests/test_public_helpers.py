"""Public helpers validate their arguments as the mechanisms do (issue 13, item 5).

Every function a mechanism package exports besides the mechanism itself (and
``refattn.merge``) raises ``SpecError`` naming the argument, what was
expected and what was given, for one bad call each: never a raw traceback
(division by zero, an index out of range), an unknown option accepted
silently, or NaN passed through. :data:`BAD_CALLS` holds one per helper, and a
test checks that every exported helper has one. Error messages quote at most
a short summary of what was given.
"""

import importlib
import inspect

import numpy as np
import pytest

import refattn
from refattn import SpecError
from refattn.core import registry
from refattn.core.errors import MAX_GIVEN_CHARS

#: The packages whose exported helpers this file covers.
PACKAGES = (
    "refattn.position", "refattn.position.alibi", "refattn.position.t5", "refattn.position.rope",
    "refattn.position.xpos", "refattn.position.shaw", "refattn.position.transformer_xl", "refattn.dilution",
    "refattn.dilution.ssmax", "refattn.dilution.logn", "refattn.dilution.differential", "refattn.lsh",
    "refattn.routing", "refattn.routing.hybrid", "refattn.routing.soft", "refattn.routing.centroids",
)  # fmt: skip

rng = np.random.default_rng(0)
Q = rng.standard_normal((1, 2, 4, 8))
POSITIONS = np.arange(4)
ROTATIONS = rng.standard_normal((2, 1, 8, 2))  # (H, R, D, P)
BATCHED_ROTATIONS = np.broadcast_to(ROTATIONS, (1,) + ROTATIONS.shape)  # (B, H, R, D, P)
CENTROIDS = rng.standard_normal((2, 3, 8))
NAN_Q = np.where(np.arange(8) == 3, np.nan, Q)

#: helper name -> (package, call with one bad argument, the argument the error names).
BAD_CALLS = {
    "alibi_slopes": ("refattn.position", lambda m: m.alibi_slopes(0), "num_heads"),
    "alibi_bias": ("refattn.position", lambda m: m.alibi_bias(np.ones(2), POSITIONS, POSITIONS, form="bogus"), "form"),
    "relative_position_bucket": ("refattn.position", lambda m: m.relative_position_bucket(np.array([0.5])),
                                 "relative_position"),
    "t5_bias": ("refattn.position", lambda m: m.t5_bias(np.ones((3, 2)), POSITIONS, POSITIONS), "table"),
    "rope_angles": ("refattn.position", lambda m: m.rope_angles(POSITIONS, 3), "rotary_dim"),
    "apply_rope": ("refattn.position", lambda m: m.apply_rope(Q, POSITIONS[:3]), "positions"),
    "xpos_scales": ("refattn.position", lambda m: m.xpos_scales(POSITIONS, 8, gamma=-1.0), "gamma"),
    "apply_xpos": ("refattn.position", lambda m: m.apply_xpos(Q, POSITIONS, layout="bogus"), "layout"),
    "relative_index": ("refattn.position", lambda m: m.relative_index(POSITIONS, POSITIONS, -1), "max_relative_position"),
    "sinusoid_relative_embeddings": ("refattn.position", lambda m: m.sinusoid_relative_embeddings(4, 7), "d_model"),
    "rel_shift": ("refattn.position", lambda m: m.rel_shift(np.ones(3)), "x"),
    "relative_position_scores": ("refattn.position", lambda m: m.relative_position_scores(
        Q, np.ones((2, 3, 7)), np.ones((2, 8)), q_positions=POSITIONS, k_positions=POSITIONS), "r"),
    "attention_diagnostics": ("refattn.dilution", lambda m: m.attention_diagnostics(Q, Q, top_k=0), "top_k"),
    "logit_diagnostics": ("refattn.dilution", lambda m: m.logit_diagnostics(np.array([1.0, np.nan])), "logits"),
    "diagnostics_from_weights": ("refattn.dilution", lambda m: m.diagnostics_from_weights(np.array([[0.5, 0.6]])),
                                 "weights"),
    "equal_keys": ("refattn.dilution", lambda m: m.equal_keys(0), "n"),
    "attended_counts": ("refattn.dilution", lambda m: m.attended_counts(Q, Q, window=(-1, 0)), "window"),
    "lambda_init_from_depth": ("refattn.dilution", lambda m: m.lambda_init_from_depth(-1), "depth"),
    "key_heads": ("refattn.dilution", lambda m: m.key_heads(3, 2), "kv_heads"),
    "rotate": ("refattn.lsh", lambda m: m.rotate(Q, ROTATIONS), "rotations"),
    "hash_buckets": ("refattn.lsh", lambda m: m.hash_buckets(Q, ROTATIONS, 3), "num_buckets"),
    "bucket_margins": ("refattn.lsh", lambda m: m.bucket_margins(NAN_Q, ROTATIONS, 2), "qk"),
    "sort_items": ("refattn.lsh", lambda m: m.sort_items(np.array([[0.5]])), "buckets"),
    "chunk_windows": ("refattn.lsh", lambda m: m.chunk_windows(8, 0, 1, 0), "chunk_len"),
    "window_multiplicity": ("refattn.lsh", lambda m: m.window_multiplicity(0, 1, 0), "num_chunks"),
    "pair_counts": ("refattn.lsh", lambda m: m.pair_counts(np.zeros((1, 2, 1, 4), int), np.full((1, 2, 2), 4),
                                                            np.zeros((1, 2, 2), int), np.ones(1, int)), "pos_q"),
    "log_pair_counts": ("refattn.lsh", lambda m: m.log_pair_counts(np.ones(3, int), "bogus"), "dup_count"),
    "normalised_keys": ("refattn.lsh", lambda m: m.normalised_keys(Q, key_norm="bogus"), "key_norm"),
    "pair_logits": ("refattn.lsh", lambda m: m.pair_logits(
        np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2), int), np.zeros((1, 1, 2), int), causal=False, valid=None,
        self_mask_value=-1e5, mask_value=None, mask_mode="bogus", mask_padded_queries=False), "mask_mode"),
    "unsort": ("refattn.lsh", lambda m: m.unsort(np.zeros((1, 2, 8, 3)), np.zeros((1, 2, 8), int), 3), "num_rounds"),
    "combine_rounds": ("refattn.lsh", lambda m: m.combine_rounds(np.zeros((1, 2, 2, 4, 3)), np.zeros((1, 2, 3, 4))),
                       "round_out"),
    "centroid_ema_normalized_mean": ("refattn.routing", lambda m: m.centroid_ema_normalized_mean(
        Q, CENTROIDS, decay=1.5), "decay"),
    "centroid_ema_vq": ("refattn.routing", lambda m: m.centroid_ema_vq(Q, CENTROIDS, count_rule="bogus"), "count_rule"),
    "commitment_loss": ("refattn.routing", lambda m: m.commitment_loss(Q, Q, np.ones((2, 3, 7))), "centroids"),
    "decision_margins": ("refattn.routing", lambda m: m.decision_margins(np.zeros((1, 2, 4, 3)), 0, "position"),
                         "cluster_size"),
    "get_preset": ("refattn.routing", lambda m: m.get_preset("bogus"), "preset"),
    "kmeans_init": ("refattn.routing", lambda m: m.kmeans_init(Q, np.array([[0, 99]])), "sample_indices"),
    "routed_attention": ("refattn.routing", lambda m: m.routed_attention(
        np.ones((1, 4, 3)), np.ones((3, 2)), [dict(causal=False)]), "paths"),
    "routed_attention_vjp": ("refattn.routing", lambda m: m.routed_attention_vjp(
        np.ones((1, 2, 4, 8)), np.ones((1, 4, 3)), np.ones((3, 2)), [dict(causal=False)]), "paths"),
    "routing_probabilities": ("refattn.routing", lambda m: m.routing_probabilities(np.ones((1, 4, 3)), np.ones((4, 2))),
                              "routing_weights"),
    "routing_vectors": ("refattn.routing", lambda m: m.routing_vectors(Q, routing_norm="bogus"), "routing_norm"),
    "merge": ("refattn", lambda m: m.merge([m.dense_attention(Q, Q, Q), m.dense_attention(Q[:, :1], Q[:, :1], Q[:, :1])]),
              "partials[1]"),
}  # fmt: skip


def _exported_helpers() -> set[str]:
    """Every function a covered package exports that is not a registered mechanism's forward or VJP."""
    mechanisms = {f for name in registry.names() for f in (registry.get(name).forward, registry.get(name).vjp)}
    found = set()
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if inspect.isfunction(value) and value not in mechanisms:
                found.add(name)
    return found | {"merge"}


def test_every_exported_helper_has_a_bad_call():
    assert _exported_helpers() == set(BAD_CALLS)


@pytest.mark.parametrize("helper", sorted(BAD_CALLS))
def test_a_bad_argument_raises_spec_error(helper):
    package, call, argument = BAD_CALLS[helper]
    with pytest.raises(SpecError) as info:
        call(importlib.import_module(package))
    assert info.value.argument == argument, str(info.value)
    assert info.value.expected and info.value.given


@pytest.mark.parametrize(
    "call",
    [
        lambda: refattn.dense_attention(Q, Q, Q, window=list(range(10_000))),
        lambda: refattn.lsh.sort_items(list(range(10_000))),
        lambda: refattn.lsh.chunk_windows(list(range(10_000)), 4, 1, 0),
        lambda: refattn.position.alibi_slopes([1] * 10_000),
        lambda: refattn.merge([("x" * 10_000, None)]),
    ],
    ids=["window", "sort_items", "chunk_windows", "alibi_slopes", "merge"],
)
def test_an_error_quotes_a_long_value_in_a_short_summary(call):
    with pytest.raises(SpecError) as info:
        call()
    assert len(info.value.given) <= MAX_GIVEN_CHARS and len(str(info.value)) < 600, str(info.value)
