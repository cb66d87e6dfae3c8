"""Segmented attention on CPU: the local attention and the attention over summaries are
the block-sparse kernel (refattn/segmented/blocksparse.py) with one query block per
segment; pooling uses the segment structure (O(N * D)), a given pooling matrix is one
(S, N) product. "lse_merge" is :func:`refattn.merge` of the two partial results over
disjoint key sets (the local keys, the summaries), which is one softmax over their union.
O(N * (L + S)) time; no (N, N) array.

Summary keys are stored prefix keys first (key i: token i's prefix summary, reached
through a band of width 0), then the S segment summaries (not banded).
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads, sum_kv_heads, sum_to_shape
from ...core.softmax import merge
from ...core.tiles import compute_dtype
from .. import blocksparse
from ..pattern import merge_cotangents
from .reference import SegmentedInputs, segment_of


# --------------------------------------------------------------------------
# (3) Pooling and its transpose, by segments.
# --------------------------------------------------------------------------


def _segment_starts(x: SegmentedInputs) -> np.ndarray:
    return np.arange(x.num_segments) * x.segment_len


def _pool(x: SegmentedInputs, a: np.ndarray) -> np.ndarray:
    """``R a`` (B, H, S, D) for ``a`` (B, H, N, D)."""
    if isinstance(x.pooling, np.ndarray):
        return np.einsum("sn,bhnd->bhsd", x.pooling.astype(a.dtype), a)
    if x.pooling == "first":
        return a[:, :, _segment_starts(x)]
    sums = np.add.reduceat(a, _segment_starts(x), axis=2)
    return sums / _mean_counts(x)[:, None].astype(a.dtype)


def _pool_transpose(x: SegmentedInputs, d: np.ndarray, n: int) -> np.ndarray:
    """``Rᵀ d`` (B, H, N, D) for ``d`` (B, H, S, D)."""
    if isinstance(x.pooling, np.ndarray):
        return np.einsum("sn,bhsd->bhnd", x.pooling.astype(d.dtype), d)
    out = np.zeros(d.shape[:2] + (n,) + d.shape[3:], d.dtype)
    if x.pooling == "first":
        out[:, :, _segment_starts(x)] = d
        return out
    return (d / _mean_counts(x)[:, None].astype(d.dtype))[:, :, segment_of(x)]


def _mean_counts(x: SegmentedInputs) -> np.ndarray:
    """Divisor of each segment's mean: its tokens, or L for a padded last segment."""
    n = x.shape.q_len
    counts = np.minimum(_segment_starts(x) + x.segment_len, n) - _segment_starts(x)
    return np.full(x.num_segments, x.segment_len) if x.last_segment == "pad" else counts


def _prefix_pool(x: SegmentedInputs, a: np.ndarray) -> np.ndarray:
    """``P a``: token i's own segment's tokens <= i, their mean or the first."""
    segment = segment_of(x)
    if x.pooling == "first":
        return a[:, :, segment * x.segment_len]
    within = np.arange(x.shape.q_len) - segment * x.segment_len + 1  # tokens so far in the segment
    sums = np.cumsum(a, axis=2)
    before = np.where(segment * x.segment_len > 0, segment * x.segment_len - 1, 0)
    sums = sums - np.where((segment > 0)[:, None], sums[:, :, before], 0)
    return sums / within[:, None].astype(a.dtype)


def _prefix_pool_transpose(x: SegmentedInputs, d: np.ndarray) -> np.ndarray:
    """``Pᵀ d``: token j gets the sum of d_i / count_i over the i >= j of its segment (or, first, all of them)."""
    segment = segment_of(x)
    starts = _segment_starts(x)
    if x.pooling == "first":
        out = np.zeros_like(d)
        out[:, :, starts] = np.add.reduceat(d, starts, axis=2)
        return out
    within = np.arange(x.shape.q_len) - segment * x.segment_len + 1
    scaled = d / within[:, None].astype(d.dtype)
    reversed_sums = np.cumsum(scaled[:, :, ::-1], axis=2)[:, :, ::-1]  # sum over i >= j, all segments
    after = np.minimum((segment + 1) * x.segment_len, x.shape.q_len)  # first token of the next segment
    tail = np.where((after < x.shape.q_len)[:, None], reversed_sums[:, :, np.minimum(after, x.shape.q_len - 1)], 0)
    return reversed_sums - tail


# --------------------------------------------------------------------------
# The pattern as key lists.
# --------------------------------------------------------------------------


def _local_keys(x: SegmentedInputs):
    """(2) One list per segment: its tokens (banded, so that causal applies)."""
    n, starts = x.shape.q_len, _segment_starts(x)
    keys = blocksparse.key_lists([np.arange(s, min(s + x.segment_len, n)) for s in starts], x.segment_len)[None, None]
    return keys, np.ones(keys.shape, dtype=bool)


def _summary_keys(x: SegmentedInputs):
    """(4) One list per segment: the prefix key of each of its tokens (banded, width 0), then the summaries it sees."""
    n = x.shape.q_len
    n_prefix = n if x.uses_prefix else 0
    lists, flags = [], []
    for t, start in enumerate(_segment_starts(x)):
        prefix = np.arange(start, min(start + x.segment_len, n)) if x.uses_prefix else np.arange(0)
        seen = np.arange(t if x.causal else x.num_segments) + n_prefix
        lists.append(np.concatenate([prefix, seen]))
        flags.append((np.arange(len(lists[-1])) < len(prefix)).astype(np.int64))
    width = (x.segment_len if x.uses_prefix else 0) + x.num_segments
    keys = blocksparse.key_lists(lists, width)[None, None]
    return keys, (blocksparse.key_lists(flags, width)[None, None] == 1)


def _summaries(x: SegmentedInputs, k, v):
    """(3) Summary keys and values (B, Hkv, [N +] S, D): prefix summaries first, then R k and R v."""
    summary_k, summary_v = _pool(x, k), _pool(x, v)
    if x.uses_prefix:
        summary_k = np.concatenate([_prefix_pool(x, k), summary_k], axis=2)
        summary_v = np.concatenate([_prefix_pool(x, v), summary_v], axis=2)
    return summary_k, summary_v


def _own_rows(x: SegmentedInputs) -> np.ndarray:
    """Index of token i's own summary among the summary values: its prefix (i) or its segment (N_prefix + seg)."""
    return np.arange(x.shape.q_len) if x.uses_prefix else segment_of(x)


# --------------------------------------------------------------------------
# The backend.
# --------------------------------------------------------------------------


def _partials(x: SegmentedInputs, dtype):
    q, k, v = (a.astype(dtype, copy=False) for a in (x.q, x.k, x.v))
    local_keys, local_banded = _local_keys(x)
    local = blocksparse.attend(q, k, v, local_keys, local_banded, block=x.segment_len, scale=x.scale, causal=x.causal)
    steps = dict(q=q, k=k, v=v, local=local)
    if x.integration == "none":
        return steps
    summary_k, summary_v = _summaries(x, k, v)
    steps.update(summary_k=summary_k, summary_v=summary_v)
    if x.integration != "concat":
        keys, banded = _summary_keys(x)
        steps["over"] = blocksparse.attend(q, summary_k, summary_v, keys, banded, block=x.segment_len, scale=x.scale,
                                           left=0, right=0)  # fmt: skip
    return steps


def forward(x: SegmentedInputs) -> Result:
    dtype = compute_dtype(x.q)
    return _combine(x, _partials(x, dtype), dtype)


def _combine(x: SegmentedInputs, f: dict, dtype) -> Result:
    """(5) The integration of the two partial results."""
    local_out, local_lse = f["local"]
    if x.integration == "none":
        return Result(out=local_out, lse=local_lse)
    if x.integration == "concat":
        own = repeat_kv_heads(f["summary_v"][:, :, _own_rows(x)], x.shape.group)
        joined = np.concatenate([local_out, own], axis=-1)
        return Result(out=(joined @ x.projection.astype(dtype, copy=False)).astype(dtype, copy=False), lse=local_lse)
    over_out, over_lse = f["over"]
    if x.integration == "lse_merge":
        out, lse = merge([f["local"], f["over"]])
        return Result(out=out.astype(dtype, copy=False), lse=lse.astype(dtype, copy=False))
    if x.integration == "sum":
        return Result(out=local_out + over_out, lse=local_lse)
    g = x.gate.astype(dtype, copy=False)
    return Result(out=(g * local_out + (1 - g) * over_out).astype(dtype, copy=False), lse=local_lse)


def vjp(x: SegmentedInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    dtype = compute_dtype(x.q)
    f = _partials(x, dtype)
    q, k, v = f["q"], f["k"], f["v"]
    dout = cotangents.dout.astype(dtype, copy=False)
    dlse = np.zeros(dout.shape[:3], dtype) if cotangents.dlse is None else cotangents.dlse.astype(dtype, copy=False)
    grads = {}
    d_over = None
    if x.integration in ("none", "concat"):
        d_local = (dout, dlse)
        if x.integration == "concat":
            local_out = f["local"][0]
            own = repeat_kv_heads(f["summary_v"][:, :, _own_rows(x)], x.shape.group)
            projection = x.projection.astype(dtype, copy=False)
            grads["projection"] = np.einsum("bhnc,bhnf->cf", np.concatenate([local_out, own], axis=-1), dout)
            d_joined = dout @ projection.T
            dv_dim = x.shape.value_dim
            d_local = (d_joined[..., :dv_dim], dlse)
            d_summary_v = np.zeros(f["summary_v"].shape, dtype)
            d_own = sum_kv_heads(d_joined[..., dv_dim:], x.shape.group)  # (B, Hkv, N, Dv)
            np.add.at(d_summary_v, (slice(None), slice(None), _own_rows(x)), d_own)
    elif x.integration == "lse_merge":
        merged = merge([f["local"], f["over"]])
        d_local, d_over = merge_cotangents([f["local"], f["over"]], merged[1], merged[0], dout, dlse)
    elif x.integration == "sum":
        d_local, d_over = (dout, dlse), (dout, None)
    else:
        g = x.gate.astype(dtype, copy=False)
        grads["gate"] = sum_to_shape(dout * (f["local"][0] - f["over"][0]), x.gate.shape)
        d_local, d_over = (g * dout, dlse), ((1 - g) * dout, None)
    local_keys, local_banded = _local_keys(x)
    dq, dk, dv = blocksparse.attend_vjp(q, k, v, local_keys, local_banded, *f["local"], d_local[0], d_local[1],
                                        block=x.segment_len, scale=x.scale, causal=x.causal)  # fmt: skip
    if d_over is not None:
        keys, banded = _summary_keys(x)
        dq_over, d_summary_k, d_summary_v = blocksparse.attend_vjp(
            q, f["summary_k"], f["summary_v"], keys, banded, *f["over"], d_over[0].astype(dtype, copy=False), d_over[1],
            block=x.segment_len, scale=x.scale, left=0, right=0)  # fmt: skip
        dq = dq + dq_over
        dk = dk + _summaries_transpose(x, d_summary_k)
    if x.integration != "none":
        dv = dv + _summaries_transpose(x, d_summary_v)
    grads.update(q=dq, k=dk, v=dv)
    return Grads({name: np.asarray(grads[name], dtype) for name in ("q", "k", "v", "gate", "projection") if name in grads})


def _summaries_transpose(x: SegmentedInputs, d: np.ndarray) -> np.ndarray:
    """(3') Gradients of the summary keys or values back to the tokens: ``Pᵀ d_prefix + Rᵀ d_segments``."""
    n = x.shape.q_len
    if not x.uses_prefix:
        return _pool_transpose(x, d, n)
    return _prefix_pool_transpose(x, d[:, :, :n]) + _pool_transpose(x, d[:, :, n:], n)

