"""Compatibility presets of Performer (FAVOR+): the paper's form, lucidrains'
performer-pytorch and Google's JAX code (spec/low_rank.md, "Performer: how
others differ"). ``preset=None`` is canonical; explicit arguments override.
A value may depend on ``causal`` (a callable of it)."""

from __future__ import annotations

#: Query stabilisers: ``"row"`` subtracts each query row's maximum over features.
QUERY_STABILIZERS = ("none", "row")
#: Key stabilisers: ``"global"`` one maximum over all keys and features per (b, h);
#: ``"prefix"`` the maximum over keys up to the query (causal only).
KEY_STABILIZERS = ("none", "global", "prefix")

CANONICAL = dict(
    query_stabilizer="row",
    key_stabilizer=lambda causal: "prefix" if causal else "global",
    feature_eps=0.0,
    denominator_feature_eps=0.0,
    denominator_guard=0.0,
)

PRESETS = {
    None: CANONICAL,
    # lucidrains/performer-pytorch, performer_pytorch/performer_pytorch.py (softmax_kernel, linear_attention,
    # causal_linear_attention_noncuda).
    "lucidrains": dict(CANONICAL, key_stabilizer="global", feature_eps=1e-4,
                       denominator_feature_eps=lambda causal: 1e-6 if causal else 0.0),  # fmt: skip
    # google-research/google-research, performer/fast_attention/jax/fast_attention.py
    # (nonnegative_softmax_kernel_feature_creator, FastAttentionviaLowRankDecomposition).
    "google": dict(CANONICAL, key_stabilizer="global", feature_eps=1e-6, denominator_guard=1e-6),
}


def resolve(preset, causal: bool) -> dict:
    """The preset's values for this ``causal``."""
    return {name: value(causal) if callable(value) else value for name, value in PRESETS[preset].items()}
