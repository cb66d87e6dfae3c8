"""Longformer on CPU: every row's band and global keys through the block-sparse kernel
(refattn/segmented/blocksparse.py), the global rows again through dense attention's
kernel over every key with the global projections. O(N * (w + G)) time for the band,
O(G * N) for the global rows; no (N, N) array.

The hf preset's padding changes no real token's output (a property the tests
check on the reference), so this backend does not pad.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from ...dense import dense_attention, dense_attention_vjp
from .. import blocksparse
from .reference import LongformerInputs

QUERY_BLOCK = 64


def _keys(x: LongformerInputs) -> tuple[np.ndarray, np.ndarray]:
    """(1)-(2) (B, 1, blocks, width): per query block, its band's keys that are not global (banded),
    then every global key (not banded)."""
    n, w = x.shape.q_len, x.one_sided
    n_blocks = -(-n // QUERY_BLOCK)
    lists, flags = [], []
    for b in range(x.shape.batch):
        global_keys = np.flatnonzero(x.global_tokens[b])
        for t in range(n_blocks):
            band = np.arange(max(t * QUERY_BLOCK - w, 0), min((t + 1) * QUERY_BLOCK + w, n))
            band = band[~x.global_tokens[b, band]]
            lists.append(np.concatenate([band, global_keys]))
            flags.append(np.arange(len(lists[-1])) < len(band))
    width = QUERY_BLOCK + 2 * w + int(x.global_tokens.sum(axis=1).max())
    keys = blocksparse.key_lists(lists, width).reshape(x.shape.batch, 1, n_blocks, -1)
    banded = blocksparse.key_lists([f.astype(np.int64) for f in flags], width).reshape(keys.shape) == 1
    return keys, banded


def _global_qkv(x: LongformerInputs, dtype):
    return tuple(x.projections.get(f"{name}_global", getattr(x, name)).astype(dtype, copy=False) for name in ("q", "k", "v"))


def _kernel_options(x: LongformerInputs) -> dict:
    return dict(block=QUERY_BLOCK, scale=x.scale, left=x.one_sided, right=x.one_sided)


def forward(x: LongformerInputs) -> Result:
    dtype = compute_dtype(x.q)
    keys, banded = _keys(x)
    out, lse = blocksparse.attend(*(a.astype(dtype, copy=False) for a in (x.q, x.k, x.v)), keys, banded, **_kernel_options(x))
    q_global, k_global, v_global = _global_qkv(x, dtype)
    for b in range(x.shape.batch):  # (3) global rows: every key, the global projections
        rows = np.flatnonzero(x.global_tokens[b])
        if rows.size:
            every_key = dense_attention(q_global[b:b + 1, :, rows], k_global[b:b + 1], v_global[b:b + 1],
                                        scale=x.scale, backend="numba")  # fmt: skip
            out[b, :, rows], lse[b, :, rows] = every_key.out[0].transpose(1, 0, 2), every_key.lse[0].T
    return Result(out=out, lse=lse)


def vjp(x: LongformerInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    dtype = compute_dtype(x.q)
    result = saved if saved is not None else forward(x)
    dout = cotangents.dout.astype(dtype, copy=False)
    dlse = np.zeros(result.lse.shape, dtype) if cotangents.dlse is None else cotangents.dlse.astype(dtype, copy=False)
    is_global = x.global_tokens[:, None, :]  # (B, 1, N)
    keys, banded = _keys(x)
    # Global rows hold the global softmax's lse; +inf gives them no weight in the local backward (with their
    # own lse, exp(s - lse) overflows where a local logit exceeds it, and inf times a zeroed cotangent is NaN).
    local_lse = np.where(is_global, np.inf, result.lse)
    dq, dk, dv = blocksparse.attend_vjp(*(a.astype(dtype, copy=False) for a in (x.q, x.k, x.v)), keys, banded,
                                        result.out.astype(dtype, copy=False), local_lse.astype(dtype, copy=False),
                                        np.where(is_global[..., None], 0, dout).astype(dtype, copy=False),
                                        np.where(is_global, 0, dlse).astype(dtype, copy=False), **_kernel_options(x))  # fmt: skip
    q_global, k_global, v_global = _global_qkv(x, dtype)
    d_global = {name: np.zeros(a.shape, dtype) for name, a in (("q", q_global), ("k", k_global), ("v", v_global))}
    for b in range(x.shape.batch):
        rows = np.flatnonzero(x.global_tokens[b])
        if rows.size:
            grads = dense_attention_vjp(dout[b:b + 1, :, rows], q_global[b:b + 1, :, rows], k_global[b:b + 1],
                                        v_global[b:b + 1], dlse=dlse[b:b + 1, :, rows], scale=x.scale,
                                        backend="numba")  # fmt: skip
            d_global["q"][b][:, rows] = grads["q"][0]
            d_global["k"][b], d_global["v"][b] = grads["k"][0], grads["v"][0]
    if x.projections:
        return Grads(q=dq, k=dk, v=dv, q_global=d_global["q"], k_global=d_global["k"], v_global=d_global["v"])
    return Grads(q=dq + d_global["q"], k=dk + d_global["k"], v=dv + d_global["v"])
