"""BigBird on CPU: the sequence's non-global query blocks through the block-sparse
kernel (refattn/segmented/blocksparse.py) over per-head key-block lists, the global
rows (ITC: query blocks 0 and nb - 1; ETC: the g extra global tokens) through dense
attention's kernel over every key. ETC's extra global tokens are keys at the head of
every sequence block's list. O(N * (g + (5 + r) * block)) time; memory O(N) besides
the lists (Hq * nb * (g + (5 + r) * block) indices)."""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from ...dense import dense_attention, dense_attention_vjp
from .. import blocksparse
from .reference import BigBirdInputs


def _keys(x: BigBirdInputs) -> tuple[np.ndarray, np.ndarray]:
    """(1)-(5) (1, Hq, nb, width): the keys of each sequence query block's list; global query blocks empty.

    Key indices count the extra global tokens (ETC), listed first; sliding
    and global blocks are listed once; each random entry is listed again when
    blocks are counted repeatedly, else only if not yet listed.
    """
    nb, block, heads, g = x.num_blocks, x.block_size, x.shape.q_heads, x.extra_global_tokens
    random_row = {int(t): row for row, t in enumerate(x.random_query_blocks)}
    rows = []
    for h in range(heads):
        for t in range(nb):
            if t in x.global_blocks:
                rows.append([])
                continue
            listed = sorted({*x.global_blocks, t - 1, t, t + 1} & set(range(nb)))
            for s in x.random_blocks[h, random_row[t]]:
                if x.count_repeated_blocks or s not in listed:
                    listed.append(int(s))
            rows.append(np.concatenate([np.arange(g)] + [np.arange(g + s * block, g + (s + 1) * block) for s in listed]))
    width = g + (len(x.global_blocks) + 3 + x.random_blocks.shape[2]) * block
    keys = blocksparse.key_lists(rows, width).reshape(1, heads, nb, -1)
    return keys, np.zeros(keys.shape, dtype=bool)


def _global_rows(x: BigBirdInputs) -> np.ndarray:
    """The rows attending to every key: ETC's extra global tokens, ITC's query blocks 0 and nb - 1, or every row
    when the short-sequence rule applies."""
    n, block = x.shape.q_len, x.block_size
    if x.extra_global_tokens:
        return np.arange(x.extra_global_tokens)
    if x.full_attention or x.num_blocks <= 2:
        return np.arange(n)
    return np.concatenate([np.arange(block), np.arange(n - block, n)])


def forward(x: BigBirdInputs) -> Result:
    dtype = compute_dtype(x.q)
    q, k, v = (a.astype(dtype, copy=False) for a in (x.q, x.k, x.v))
    rows, g = _global_rows(x), x.extra_global_tokens
    out = np.zeros(q.shape[:3] + (v.shape[3],), dtype)
    lse = np.full(q.shape[:3], -np.inf, dtype)
    if rows.size < x.shape.q_len:
        keys, banded = _keys(x)
        out[:, :, g:], lse[:, :, g:] = blocksparse.attend(q[:, :, g:], k, v, keys, banded, block=x.block_size,
                                                          scale=x.scale)  # fmt: skip
    every_key = dense_attention(q[:, :, rows], k, v, scale=x.scale, backend="numba")
    out[:, :, rows], lse[:, :, rows] = every_key.out, every_key.lse
    return Result(out=out, lse=lse)


def vjp(x: BigBirdInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    dtype = compute_dtype(x.q)
    q, k, v = (a.astype(dtype, copy=False) for a in (x.q, x.k, x.v))
    result = saved if saved is not None else forward(x)
    rows, g = _global_rows(x), x.extra_global_tokens
    dlse = np.zeros(result.lse.shape, dtype) if cotangents.dlse is None else cotangents.dlse.astype(dtype, copy=False)
    dout = cotangents.dout.astype(dtype, copy=False)
    glob = dense_attention_vjp(dout[:, :, rows], q[:, :, rows], k, v, dlse=dlse[:, :, rows], scale=x.scale,
                               backend="numba")  # fmt: skip
    dq, dk, dv = np.zeros(q.shape, dtype), glob["k"].astype(dtype, copy=False), glob["v"].astype(dtype, copy=False)
    if rows.size < x.shape.q_len:
        keys, banded = _keys(x)
        dout_middle, dlse_middle = dout.copy(), dlse.copy()
        dout_middle[:, :, rows], dlse_middle[:, :, rows] = 0, 0
        out, lse = result.out.astype(dtype, copy=False), result.lse.astype(dtype, copy=False)
        dq[:, :, g:], dk_middle, dv_middle = blocksparse.attend_vjp(q[:, :, g:], k, v, keys, banded, out[:, :, g:],
                                                                    lse[:, :, g:], dout_middle[:, :, g:],
                                                                    dlse_middle[:, :, g:], block=x.block_size,
                                                                    scale=x.scale)  # fmt: skip
        dk, dv = dk + dk_middle, dv + dv_middle
    dq[:, :, rows] = glob["q"]
    return Grads(q=dq, k=dk, v=dv)
