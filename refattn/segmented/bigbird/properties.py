"""Invariants of BigBird attention (spec/segmented.md, "BigBird"), reusable on any implementation.

``attend(q, k, v, **params)`` returns an object with ``.out`` (B, H, N, Dv) and ``.lse`` (B, H, N).
"""

from __future__ import annotations

from ...core.invariants import close


def global_blocks_are_dense(attend, dense, q, k, v, params, rtol=1e-10):
    """The first and last query blocks attend to every key: their rows are dense attention's."""
    block = params["block_size"]
    got, want = attend(q, k, v, **params), dense(q, k, v)
    for rows in (slice(0, block), slice(q.shape[2] - block, q.shape[2])):
        close("out", got.out[:, :, rows], want.out[:, :, rows], rtol)
        close("lse", got.lse[:, :, rows], want.lse[:, :, rows], rtol)


def three_blocks_are_dense(attend, dense, q, k, v, params, rtol=1e-10):
    """With at most three blocks every block is global or sliding to every other: dense attention."""
    block = q.shape[2] // 3 if "block_size" not in params else params["block_size"]
    got, want = attend(q, k, v, **{**params, "block_size": block}), dense(q, k, v)
    close("out", got.out, want.out, rtol)
    close("lse", got.lse, want.lse, rtol)


def extra_global_tokens_are_dense(attend, dense, q, k, v, params, rtol=1e-10):
    """ETC: the rows of the ``extra_global_tokens`` extra tokens attend to every token: dense attention's rows."""
    rows = slice(0, params["extra_global_tokens"])
    got, want = attend(q, k, v, **params), dense(q, k, v)
    close("out", got.out[:, :, rows], want.out[:, :, rows], rtol)
    close("lse", got.lse[:, :, rows], want.lse[:, :, rows], rtol)
