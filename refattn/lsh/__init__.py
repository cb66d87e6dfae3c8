"""LSH attention, Reformer (spec/lsh.md)."""

from ..core import registry
from .inputs import check_lsh_inputs
from .presets import PRESETS, Preset
from .reference import (
    bucket_margins,
    chunk_windows,
    combine_rounds,
    hash_buckets,
    lsh_attention,
    lsh_attention_vjp,
    normalised_keys,
    log_pair_counts,
    pair_counts,
    pair_logits,
    rotate,
    sort_items,
    unsort,
    window_multiplicity,
)


def _implied_by_buckets(arguments: dict, aux: dict):
    """The dense identity over an implementation's own buckets (spec/lsh.md), or None without them."""
    from .properties import lsh_as_dense

    buckets = aux.get("buckets")
    if buckets is None:
        return None
    qk, v = arguments.pop("qk"), arguments.pop("v")
    return lsh_as_dense(qk, v, buckets=buckets, **arguments)


MECHANISM = registry.register(
    "lsh", __name__, lsh_attention, lsh_attention_vjp, check_lsh_inputs, "spec/lsh.md",
    positional=("qk", "v"), implied_output=_implied_by_buckets, backends=("reference", "numba", "cupy"),
)

__all__ = [
    "lsh_attention",
    "lsh_attention_vjp",
    "rotate",
    "hash_buckets",
    "bucket_margins",
    "sort_items",
    "chunk_windows",
    "window_multiplicity",
    "pair_counts",
    "log_pair_counts",
    "normalised_keys",
    "pair_logits",
    "unsort",
    "combine_rounds",
    "Preset",
    "PRESETS",
]
