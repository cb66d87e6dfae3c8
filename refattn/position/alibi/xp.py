"""ALiBi over an array namespace ``xp`` (NumPy or CuPy): dense attention's tiled algorithm with the
position term ``m_h · δ_ij`` formed tile by tile (spec/position.md, (A1)-(A3)), never as (Nq, Nk)."""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .reference import AlibiInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile


def _position_term(x: AlibiInputs, xp):
    """``term(i0, i1, j0, j1)``: (A1)-(A2) on one tile, (1, Hkv, G, bq, bk) in the compute dtype."""
    s, dtype = x.dense.shape, compute_dtype(x.dense.q.dtype)
    slopes = xp.asarray(x.slopes, dtype=dtype).reshape(1, s.kv_heads, s.q_heads // s.kv_heads, 1, 1)
    q_positions, k_positions = xp.asarray(x.q_positions), xp.asarray(x.k_positions)

    def term(i0: int, i1: int, j0: int, j1: int):
        # (A1) δ_ij = p_j − p_i ("causal") or −|p_j − p_i| ("symmetric").
        distance = k_positions[None, j0:j1] - q_positions[i0:i1, None]  # (bq, bk)
        if x.form == "symmetric":
            distance = -xp.abs(distance)
        # (A2) m_h · δ_ij.
        return slopes * distance.astype(dtype)

    return term


def forward(x: AlibiInputs, xp) -> Result:
    """(A1)-(A3) per tile inside dense (1)-(7)."""
    out, lse = dense_xp.attend(x.dense, xp, (BLOCK_Q, BLOCK_K), _position_term(x, xp))
    return Result(out=out, lse=lse, aux={})


def vjp(x: AlibiInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Dense (7')-(1') with the same term; slopes and positions are constants (no gradient)."""
    return dense_xp.attend_vjp(x.dense, cotangents, xp, (BLOCK_Q, BLOCK_K), saved, _position_term(x, xp))
