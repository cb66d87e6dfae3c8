"""Shaw relative position representations over an array namespace ``xp`` (NumPy or CuPy): dense
attention's tiled algorithm with the relative key term inside the scaled scores (step (1)) and the
relative value term in the output (step (7)), both formed tile by tile (spec/position.md, "Shaw").

A tile's pairs read rows ``lo .. hi`` of ``rel_k`` and ``rel_v`` (:class:`refattn.dense.xp.RelativeRows`):
the tile's queries are scored against those rows, (…, bq, rows), and each pair picks its own; the value
term scatters the tile's dropped weights onto the rows, then multiplies by ``rel_v``. Their gradients
are the same two steps transposed. Nothing (Nq, Nk) or (Nq, Nk, D) is formed except
``aux["relative_index"]``, the reference's (Nq, Nk) index, computed on the host.
"""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .inputs import ShawInputs
from .reference import _relative_index

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


class _Terms:
    """Steps (0), (1) and (7)'s relative terms per tile, and their gradients.

    Einsum letters: b batch, g kv head, r query head in its group, i query, j key, t table row,
    d head dim, e value dim.
    """

    def __init__(self, x: ShawInputs, xp):
        d, s = x.dense, x.dense.shape
        self.xp, self.scale = xp, d.scale
        dtype = compute_dtype(d.q.dtype)
        # (B, Hkv, G, Nq, D): the queries grouped as dense's tiles are.
        self.q = xp.asarray(d.q, dtype=dtype).reshape(s.batch, s.kv_heads, s.group, s.q_len, s.head_dim)
        self.rel_k, self.rel_v = xp.asarray(x.rel_k, dtype=dtype), xp.asarray(x.rel_v, dtype=dtype)  # (2K+1, D | Dv)
        clip = x.max_relative_position
        # (0) Pair (i, j) reads row clip(p_j − p_i, −K, K) + K.
        self.rows = dense_xp.RelativeRows(x.q_positions, x.k_positions, clip, 2 * clip + 1, xp)
        self.dq = xp.zeros_like(self.q)
        self.d_rel_k, self.d_rel_v = xp.zeros_like(self.rel_k), xp.zeros_like(self.rel_v)

    def scores(self, i0: int, i1: int, j0: int, j1: int):
        """(1) ``scale · q_i · rel_k[r_ij]``, (B, Hkv, G, bq, bk)."""
        rows, index = self.rows.tile(i0, i1, j0, j1)
        by_row = self.xp.matmul(self.q[..., i0:i1, :], self.rel_k[rows].T)  # (b, g, r, i, t)
        return self.scale * self.rows.gather(by_row, index)

    def on_dscores(self, i0: int, i1: int, j0: int, j1: int, ds) -> None:
        """(1') q reads ``rel_k[r_ij]`` and the row reads ``q_i``, both times ``scale · ∂L/∂s``."""
        xp = self.xp
        rows, index = self.rows.tile(i0, i1, j0, j1)
        d_by_row = self.rows.scatter(self.scale * ds, index, rows.stop - rows.start)  # (b, g, r, i, t)
        self.dq[..., i0:i1, :] += xp.matmul(d_by_row, self.rel_k[rows])
        self.d_rel_k[rows] += xp.matmul(xp.swapaxes(d_by_row, -1, -2), self.q[..., i0:i1, :]).sum(axis=(0, 1, 2))

    def forward(self, i0: int, i1: int, j0: int, j1: int, kept):
        """(7) ``Σ_j P'_ij rel_v[r_ij]``: the dropped weights summed per row, times the rows."""
        rows, index = self.rows.tile(i0, i1, j0, j1)
        return self.xp.matmul(self.rows.scatter(kept, index, rows.stop - rows.start), self.rel_v[rows])

    def backward(self, i0: int, i1: int, j0: int, j1: int, kept, dout):
        """(7') ``dout_i · rel_v[r_ij]`` for the weights; ``rel_v``'s rows get ``Σ P'_ij dout_i``."""
        xp = self.xp
        rows, index = self.rows.tile(i0, i1, j0, j1)
        weights_by_row = self.rows.scatter(kept, index, rows.stop - rows.start)  # (b, g, r, i, t)
        self.d_rel_v[rows] += xp.matmul(xp.swapaxes(weights_by_row, -1, -2), dout).sum(axis=(0, 1, 2))
        return self.rows.gather(xp.matmul(dout, self.rel_v[rows].T), index)


def forward(x: ShawInputs, xp) -> Result:
    """Steps (0)-(7) per tile; ``aux["relative_index"]`` (Nq, Nk) from the host."""
    terms = _Terms(x, xp)
    out, lse = dense_xp.attend(x.dense, xp, (BLOCK_Q, BLOCK_K), extra_scores=terms.scores, extra_values=terms)
    index = _relative_index(x.q_positions, x.k_positions, x.max_relative_position)
    return Result(out=out, lse=lse, aux={"relative_index": index})


def vjp(x: ShawInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (7')-(0') per tile: dense's gradients plus the relative terms'."""
    terms = _Terms(x, xp)
    grads = dense_xp.attend_vjp(
        x.dense, cotangents, xp, (BLOCK_Q, BLOCK_K), saved,
        extra_scores=terms.scores, on_dscores=terms.on_dscores, extra_values=terms,
    )  # fmt: skip
    grads["q"] = grads["q"] + terms.dq.reshape(grads["q"].shape)
    grads["rel_k"], grads["rel_v"] = terms.d_rel_k, terms.d_rel_v
    return grads
