"""Transformer-XL attention over an array namespace ``xp`` (NumPy or CuPy): dense attention's tiled
algorithm on ``q + u`` (the content term, (1a)), with the position term (1b) added to each tile's
scaled scores before the soft-cap (spec/position.md, Transformer-XL).

Pair (i, j) reads row ``R − 1 − (p_i − p'_j)`` of its head's ``r``. A tile's pairs read rows
``lo .. hi`` (:class:`refattn.dense.xp.RelativeRows`): the tile's ``q + v_bias`` is scored against
them, (…, bq, rows), and each pair picks its own; the gradients scatter back the same way. A kept pair
whose distance has no row raises the reference's :class:`SpecError`, found tile by tile before
anything is computed (:func:`refattn.dense.xp.first_allowed`). Nothing (Nq, Nk) is formed.
"""

from __future__ import annotations

from dataclasses import replace

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .inputs import TransformerXLInputs, missing_row

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


class _PositionTerm:
    """Step (1b) per tile and its gradient.

    Einsum letters: b batch, g kv head, r query head in its group, i query, t row of ``r``, d head dim.
    """

    def __init__(self, x: TransformerXLInputs, xp):
        d, s = x.dense, x.dense.shape
        self.xp, self.scale = xp, d.scale
        dtype = compute_dtype(d.q.dtype)
        grouped = (s.kv_heads, s.group)
        u, v_bias = (xp.asarray(t, dtype=dtype).reshape(grouped + (1, s.head_dim)) for t in (x.u, x.v_bias))
        q = xp.asarray(d.q, dtype=dtype).reshape((s.batch,) + grouped + (s.q_len, s.head_dim))
        self.q_content = (q + u).reshape(d.q.shape)  # (B, Hq, Nq, D): the queries moved by u, (1a)
        self.q_position = q + v_bias  # (b, g, r, Nq, d): the queries moved by v_bias, (1b)
        self.r = xp.asarray(x.r, dtype=dtype).reshape(grouped + (x.n_rows, s.head_dim))  # (g, r, R, d)
        # Pair (i, j) reads row R − 1 − (p_i − p'_j) = p'_j − p_i + R − 1.
        self.rows = dense_xp.RelativeRows(x.q_positions, x.k_positions, x.n_rows - 1, x.n_rows, xp)
        self.dq, self.dr = xp.zeros_like(self.q_position), xp.zeros_like(self.r)

    def scores(self, i0: int, i1: int, j0: int, j1: int):
        """(1b)-(1c) ``scale · (q_i + v_bias) · r[R − 1 − (p_i − p'_j)]``, (B, Hkv, G, bq, bk)."""
        rows, index = self.rows.tile(i0, i1, j0, j1)
        by_row = self.xp.matmul(self.q_position[..., i0:i1, :], self.xp.swapaxes(self.r[..., rows, :], -1, -2))
        return self.scale * self.rows.gather(by_row, index)

    def on_dscores(self, i0: int, i1: int, j0: int, j1: int, ds) -> None:
        """(1b') Each pair's ``scale · ∂L/∂s`` goes to the row it read, then to ``q + v_bias`` and to ``r``."""
        xp = self.xp
        rows, index = self.rows.tile(i0, i1, j0, j1)
        d_by_row = self.rows.scatter(self.scale * ds, index, rows.stop - rows.start)  # (b, g, r, i, t)
        self.dq[..., i0:i1, :] += xp.matmul(d_by_row, self.r[..., rows, :])
        self.dr[..., rows, :] += xp.matmul(xp.swapaxes(d_by_row, -1, -2), self.q_position[..., i0:i1, :]).sum(axis=0)

    def missing(self, i0: int, i1: int, j0: int, j1: int):
        """(bq, bk) bool: the pairs whose distance has no row of ``r``."""
        relative = self.rows.k_positions[None, j0:j1] - self.rows.q_positions[i0:i1, None] + self.rows.offset
        return (relative < 0) | (relative >= self.rows.n_rows)


def _prepared(x: TransformerXLInputs, xp):
    """The position term, and dense's inputs with ``q + u`` (step (1a)); raises if a kept pair has no row."""
    term = _PositionTerm(x, xp)
    pair = dense_xp.first_allowed(x.dense, xp, (BLOCK_Q, BLOCK_K), term.missing)
    if pair is not None:
        raise missing_row(x, *pair)
    return term, replace(x.dense, q=term.q_content)


def forward(x: TransformerXLInputs, xp) -> Result:
    term, dense = _prepared(x, xp)
    out, lse = dense_xp.attend(dense, xp, (BLOCK_Q, BLOCK_K), extra_scores=term.scores)
    return Result(out=out, lse=lse, aux={})


def vjp(x: TransformerXLInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    term, dense = _prepared(x, xp)
    grads = dense_xp.attend_vjp(dense, cotangents, xp, (BLOCK_Q, BLOCK_K), saved,
                                extra_scores=term.scores, on_dscores=term.on_dscores)  # fmt: skip
    s = x.dense.shape
    dq_content = grads["q"].reshape(term.dq.shape)  # (b, g, r, Nq, d): the gradient of q + u
    # q enters both terms; u and v_bias are added to every query of every batch element.
    grads["q"] = (dq_content + term.dq).reshape(x.dense.q.shape)
    grads["r"] = term.dr.reshape(x.r.shape)
    grads["u"] = dq_content.sum(axis=(0, 3)).reshape(s.q_heads, s.head_dim)
    grads["v_bias"] = term.dq.sum(axis=(0, 3)).reshape(s.q_heads, s.head_dim)
    return grads
