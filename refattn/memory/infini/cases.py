"""Conformance cases for Infini-attention: several segments, both update rules, the zero first
denominator, a given initial memory, and the replications' variants."""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, draw, make_case, normal
from ..flags import quote

FLAGS = quote("STREAM_STATE", "RETRIEVE_AFTER_UPDATE", "ZERO_DENOMINATOR", "DELTA_RULE", "FEATURE_MAP",
              "GRADIENT_THROUGH_MEMORY")  # fmt: skip


def _memory():
    """An initial memory M (B, Hkv, D, Dv) and a positive norm z (B, Hkv, D), as σ(K) sums are."""
    return {"memory": normal(lambda d: (d.b, d.hkv, d.d, d.dv or d.d)),
            "norm": lambda rng, d: 1.0 + np.abs(rng.standard_normal((d.b, d.hkv, d.d)))}  # fmt: skip


def _case(name, description, flags, dims, extra=None, **params) -> Case:
    arrays = {"beta": normal(lambda d: (d.hq,)), **(extra or {})}
    return make_case("infini", name, description, flags, draw(dims, arrays), params=params,
                     differentiable=("q", "k", "v", "beta"))  # fmt: skip


def cases() -> list[Case]:
    return [
        _case("linear_from_zero", "Segments of 4 over 12 tokens from M = 0, z = 0, eps 0: the first retrieval is 0.",
              ("ZERO_DENOMINATOR", "RETRIEVE_AFTER_UPDATE", "GRADIENT_THROUGH_MEMORY"), Dims(1, 2, 2, 12, 12, 8),
              segment_len=4),
        _case("delta_rule", "Delta rule, eps 1e-3, segments of 3 over 9 tokens, GQA 4:2, Dv=5.",
              ("DELTA_RULE", "GQA_HEAD_MAP"), Dims(1, 4, 2, 9, 9, 8, 5), segment_len=3, update="delta", eps=1e-3),
        _case("state_in_out", "From a given memory and norm: segments of 5 over 10 tokens, B=2.",
              ("STREAM_STATE", "MULTI_BATCH"), Dims(2, 2, 1, 10, 10, 6), _memory(), segment_len=5),
        _case("update_first", "The retrieve-after-update variant, from a given memory, delta rule.",
              ("RETRIEVE_AFTER_UPDATE", "DELTA_RULE"), Dims(1, 2, 2, 8, 8, 6), _memory(), segment_len=4,
              update="delta", update_order="update_first", eps=1e-3),
        _case("identity_feature_map", "No σ (a replication's bug), from a memory whose norm keeps denominators away "
              "from 0 for these queries.", ("FEATURE_MAP",), Dims(1, 2, 2, 6, 6, 4), _memory(), segment_len=3,
              feature_map="identity", eps=10.0),
    ]  # fmt: skip
