"""Segmented attention over an array namespace ``xp`` (NumPy or CuPy): the local attention and the attention
over summaries are the shared block-sparse algorithm (refattn/segmented/blocksparse_xp.py) over the Numba
backend's key lists, one query block per segment; pooling works on the tokens viewed as (S, L) segments
(the last one padded with zeros), O(N·D); a given pooling matrix is one (S, N) product; ``"lse_merge"`` is
the merge of the two partial results over their disjoint key sets (spec/segmented.md, steps (1)-(5)).

Shape names: B batch, H heads, N tokens, S segments, L segment length, D feature dim.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.shapes import sum_kv_heads, sum_to_shape
from ...core.xp import compute_dtype, scatter_add
from ...dense import xp as dense_xp
from .. import blocksparse_xp
from .numba import _local_keys, _mean_counts, _own_rows, _summary_keys
from .reference import SegmentedInputs, segment_of

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # query rows and listed keys of a tile


# --- (3) pooling and its transpose, by segments ------------------------------


def _segments(x: SegmentedInputs, a, xp):
    """(B, H, N, D) as (B, H, S, L, D), the tokens past N zero."""
    b, h, n, d = a.shape
    padded = xp.zeros((b, h, x.num_segments * x.segment_len, d), dtype=a.dtype)
    padded[:, :, :n] = a
    return padded.reshape(b, h, x.num_segments, x.segment_len, d)


def _tokens(x: SegmentedInputs, by_segment):
    """The inverse of :func:`_segments`: (B, H, S, L, D) to (B, H, N, D)."""
    b, h, s, length, d = by_segment.shape
    return by_segment.reshape(b, h, s * length, d)[:, :, : x.shape.q_len]


def _pool(x: SegmentedInputs, a, xp):
    """``R a`` (B, H, S, D) for ``a`` (B, H, N, D)."""
    if isinstance(x.pooling, np.ndarray):
        return xp.matmul(xp.asarray(x.pooling, dtype=a.dtype), a)
    if x.pooling == "first":
        return _segments(x, a, xp)[:, :, :, 0]
    return _segments(x, a, xp).sum(axis=3) / xp.asarray(_mean_counts(x), dtype=a.dtype)[:, None]


def _pool_transpose(x: SegmentedInputs, d, xp):
    """``Rᵀ d`` (B, H, N, D) for ``d`` (B, H, S, D)."""
    if isinstance(x.pooling, np.ndarray):
        return xp.matmul(xp.asarray(x.pooling.T, dtype=d.dtype), d)
    if x.pooling == "first":
        by_segment = xp.zeros(d.shape[:3] + (x.segment_len,) + d.shape[3:], dtype=d.dtype)
        by_segment[:, :, :, 0] = d
        return _tokens(x, by_segment)
    return (d / xp.asarray(_mean_counts(x), dtype=d.dtype)[:, None])[:, :, xp.asarray(segment_of(x))]


def _within(x: SegmentedInputs, dtype, xp):
    """(N, 1) how many tokens of its segment each token has seen, itself included."""
    return xp.asarray(np.arange(x.shape.q_len) % x.segment_len + 1, dtype=dtype)[:, None]


def _prefix_pool(x: SegmentedInputs, a, xp):
    """``P a``: token i's own segment's tokens <= i, their mean or the first."""
    by_segment = _segments(x, a, xp)
    if x.pooling == "first":
        return _tokens(x, xp.broadcast_to(by_segment[:, :, :, :1], by_segment.shape))
    return _tokens(x, xp.cumsum(by_segment, axis=3)) / _within(x, a.dtype, xp)


def _prefix_pool_transpose(x: SegmentedInputs, d, xp):
    """``Pᵀ d``: token j gets the sum of d_i / count_i over the i >= j of its segment (or, first, all of them)."""
    if x.pooling == "first":
        by_segment = _segments(x, d, xp)
        first = xp.zeros_like(by_segment)
        first[:, :, :, 0] = by_segment.sum(axis=3)
        return _tokens(x, first)
    by_segment = _segments(x, d / _within(x, d.dtype, xp), xp)
    return _tokens(x, xp.flip(xp.cumsum(xp.flip(by_segment, axis=3), axis=3), axis=3))


def _summaries(x: SegmentedInputs, k, v, xp):
    """(3) Summary keys and values (B, Hkv, [N +] S, D): prefix summaries first, then R k and R v."""
    summary_k, summary_v = _pool(x, k, xp), _pool(x, v, xp)
    if x.uses_prefix:
        summary_k = xp.concatenate([_prefix_pool(x, k, xp), summary_k], axis=2)
        summary_v = xp.concatenate([_prefix_pool(x, v, xp), summary_v], axis=2)
    return summary_k, summary_v


def _summaries_transpose(x: SegmentedInputs, d, xp):
    """(3') Gradients of the summary keys or values back to the tokens: ``Pᵀ d_prefix + Rᵀ d_segments``."""
    n = x.shape.q_len
    if not x.uses_prefix:
        return _pool_transpose(x, d, xp)
    return _prefix_pool_transpose(x, d[:, :, :n], xp) + _pool_transpose(x, d[:, :, n:], xp)


# --- (2), (4) the two attentions and (5) their integration --------------------


def _local_pattern(x: SegmentedInputs) -> blocksparse_xp.Pattern:
    return blocksparse_xp.Pattern(*_local_keys(x), block=x.segment_len, scale=x.scale, causal=x.causal)


def _summary_pattern(x: SegmentedInputs) -> blocksparse_xp.Pattern:
    return blocksparse_xp.Pattern(*_summary_keys(x), block=x.segment_len, scale=x.scale, left=0, right=0)


def _partials(x: SegmentedInputs, xp) -> dict:
    """q, k, v on the device, the local (out, lse), and the summaries and the (out, lse) over them when used."""
    dtype = compute_dtype(x.q.dtype)
    q, k, v = (xp.asarray(a, dtype=dtype) for a in (x.q, x.k, x.v))
    steps = dict(q=q, k=k, v=v, local=blocksparse_xp.attend(q, k, v, _local_pattern(x), xp, (BLOCK_Q, BLOCK_K)))
    if x.integration == "none":
        return steps
    steps["summary_k"], steps["summary_v"] = _summaries(x, k, v, xp)
    if x.integration != "concat":
        steps["over"] = blocksparse_xp.attend(q, steps["summary_k"], steps["summary_v"], _summary_pattern(x), xp,
                                              (BLOCK_Q, BLOCK_K))  # fmt: skip
    return steps


def _merge_weights(lses, xp):
    """The merged lse of partial results and each partial's weight ``exp(lse_r − lse)`` (0 where it is −inf)."""
    top = xp.maximum(*lses)
    stable = xp.where(xp.isfinite(top), top, 0.0)
    total = sum(xp.exp(lse - stable) for lse in lses)
    has_key = total > 0
    lse = xp.where(has_key, stable + xp.log(xp.where(has_key, total, 1.0)), -np.inf)
    return lse, [xp.where(has_key, xp.exp(part - xp.where(has_key, lse, 0.0)), 0.0) for part in lses]


def _own_summary_values(x: SegmentedInputs, f: dict, xp):
    """Token i's own summary value for each query head, (B, Hq, N, Dv) (``"concat"``)."""
    return xp.repeat(f["summary_v"][:, :, xp.asarray(_own_rows(x))], x.shape.group, axis=1)


def forward(x: SegmentedInputs, xp) -> Result:
    f = _partials(x, xp)
    local_out, local_lse = f["local"]
    if x.integration == "none":
        return Result(out=local_out, lse=local_lse, aux={})
    if x.integration == "concat":
        joined = xp.concatenate([local_out, _own_summary_values(x, f, xp)], axis=-1)
        return Result(out=joined @ xp.asarray(x.projection, dtype=joined.dtype), lse=local_lse, aux={})
    over_out, over_lse = f["over"]
    if x.integration == "lse_merge":
        lse, (local_weight, over_weight) = _merge_weights((local_lse, over_lse), xp)
        return Result(out=local_weight[..., None] * local_out + over_weight[..., None] * over_out, lse=lse, aux={})
    if x.integration == "sum":
        return Result(out=local_out + over_out, lse=local_lse, aux={})
    g = xp.asarray(x.gate, dtype=local_out.dtype)
    return Result(out=g * local_out + (1 - g) * over_out, lse=local_lse, aux={})


def _integration_vjp(x: SegmentedInputs, f: dict, dout, dlse, xp):
    """(5') The cotangents (dout, dlse) of the local and the summary attention (None: unused), and the
    gradients of the gate or the projection."""
    local_out = f["local"][0]
    if x.integration == "none":
        return (dout, dlse), None, {}
    if x.integration == "concat":
        projection = xp.asarray(x.projection, dtype=dout.dtype)
        joined = xp.concatenate([local_out, _own_summary_values(x, f, xp)], axis=-1)
        d_joined = dout @ projection.T
        own = {"projection": xp.einsum("bhnc,bhnf->cf", joined, dout),
               "d_own": sum_kv_heads(d_joined[..., x.shape.value_dim:], x.shape.group)}  # fmt: skip
        return (d_joined[..., : x.shape.value_dim], dlse), None, own
    if x.integration == "lse_merge":
        lse, weights = _merge_weights((f["local"][1], f["over"][1]), xp)
        out = weights[0][..., None] * local_out + weights[1][..., None] * f["over"][0]
        local, over = ((w[..., None] * dout, w * (dlse + (dout * (part - out)).sum(axis=-1)))
                       for w, part in zip(weights, (local_out, f["over"][0])))  # fmt: skip
        return local, over, {}
    if x.integration == "sum":
        return (dout, dlse), (dout, None), {}
    g = xp.asarray(x.gate, dtype=dout.dtype)
    d_gate = sum_to_shape(dout * (local_out - f["over"][0]), x.gate.shape)
    return (g * dout, dlse), ((1 - g) * dout, None), {"gate": d_gate}


def vjp(x: SegmentedInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    f = _partials(x, xp)
    q, k, v = f["q"], f["k"], f["v"]
    dout = xp.asarray(cotangents.dout, dtype=q.dtype)
    dlse = xp.zeros(dout.shape[:3], q.dtype) if cotangents.dlse is None else xp.asarray(cotangents.dlse, dtype=q.dtype)
    d_local, d_over, own = _integration_vjp(x, f, dout, dlse, xp)
    tiles = (BLOCK_Q, BLOCK_K)
    dq, dk, dv = blocksparse_xp.attend_vjp(q, k, v, _local_pattern(x), xp, tiles, *f["local"], *d_local)
    if "d_own" in own:
        d_summary_v = xp.zeros(f["summary_v"].shape, q.dtype)
        scatter_add(xp, d_summary_v, (slice(None), slice(None), xp.asarray(_own_rows(x))), own.pop("d_own"))
    if d_over is not None:
        dq_over, d_summary_k, d_summary_v = blocksparse_xp.attend_vjp(
            q, f["summary_k"], f["summary_v"], _summary_pattern(x), xp, tiles, *f["over"], *d_over)  # fmt: skip
        dq = dq + dq_over
        dk = dk + _summaries_transpose(x, d_summary_k, xp)
    if x.integration != "none":
        dv = dv + _summaries_transpose(x, d_summary_v, xp)
    return Grads(q=dq, k=dk, v=dv, **own)
