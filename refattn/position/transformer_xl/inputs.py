"""Checked inputs of one Transformer-XL attention call, shared by every backend.

The registry calls :func:`check_transformer_xl_inputs` before any backend runs,
so bad input is rejected identically (and before anything is computed)
whichever backend is chosen. The one condition that depends on the mask --
every unmasked pair needs a row of ``r`` -- is checked by each backend as it
computes, because checking it here would build the (Nq, Nk) mask the kernel
never forms: by the reference with :func:`check_every_unmasked_pair_has_a_row`
and by the Numba kernel tile by tile; both raise :func:`missing_row`'s error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks
from ...core.errors import SpecError
from ...dense.inputs import DenseInputs, check_dense_inputs


@dataclass(frozen=True)
class TransformerXLInputs:
    """Checked q, k, v and dense parameters (``dense``), the position tables and the positions.

    Arrays are kept in the caller's dtype (the reference converts as its
    precision says; the kernels as their dtype says), positions as int64.
    """

    dense: DenseInputs
    r: np.ndarray  # (Hq, R, D): row t holds relative distance R - 1 - t
    u: np.ndarray  # (Hq, D): r_w_bias, added to q in the content term
    v_bias: np.ndarray  # (Hq, D): r_r_bias, added to q in the position term
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: dense attention's."""
        return self.dense.cotangent_shapes()

    @property
    def n_rows(self) -> int:
        """``R``, the number of rows of ``r``: distances 0 ... R - 1 have one."""
        return self.r.shape[1]

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`pair_rows` of this call's positions and ``r``."""
        return pair_rows(self.q_positions, self.k_positions, self.n_rows)


def pair_rows(q_positions: np.ndarray, k_positions: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The row of ``r`` each (query, key) pair reads, and whether it has one.

    Returns
    -------
    rows : int64 ndarray (Nq, Nk)
        ``R - 1 - (q_positions[i] - k_positions[j])``; meaningful only where ``has_row``.
    has_row : bool ndarray (Nq, Nk)
        The distance lies in ``[0, R - 1]``.
    """
    distance = q_positions[:, None] - k_positions[None, :]  # (Nq, Nk)
    rows = n_rows - 1 - distance
    return rows, (rows >= 0) & (rows < n_rows)


def check_transformer_xl_inputs(
    q, k, v, *, r, u, v_bias, q_positions, k_positions, **dense_arguments
) -> TransformerXLInputs:
    """Check every argument of ``transformer_xl_attention``; raise :class:`SpecError` on the first bad one.

    ``dense_arguments`` are :func:`refattn.dense_attention`'s keywords, checked by its own check.
    """
    dense = check_dense_inputs(q, k, v, **dense_arguments)
    heads, head_dim = dense.shape.q_heads, dense.shape.head_dim
    r = _float_table(r, "r", f"(Hq, R, D) = ({heads}, R, {head_dim}) with R >= 1", 3, (heads, None, head_dim))
    u = _float_table(u, "u", f"(Hq, D) = ({heads}, {head_dim})", 2, (heads, head_dim))
    v_bias = _float_table(v_bias, "v_bias", f"(Hq, D) = ({heads}, {head_dim})", 2, (heads, head_dim))
    q_positions = checks.positions(q_positions, "q_positions", dense.shape.q_len)
    k_positions = checks.positions(k_positions, "k_positions", dense.shape.kv_len)
    # (q + u)·k_j + (q + v_bias)·r_t: both terms at most (|q| + |u| + |v_bias|)(|k| + |r|).
    checks.scores_within_range((dense.q, u, v_bias), (dense.k, r), dense.scale, "q, k, r, u, v_bias")
    return TransformerXLInputs(dense, r, u, v_bias, q_positions, k_positions)


def check_position_term_inputs(q, r, v_bias, q_positions, k_positions):
    """Check the arguments of ``relative_position_scores``; return them with positions as int64.

    ``q`` is (B, Hq, Nq, D), ``r`` (Hq, R, D), ``v_bias`` (Hq, D), ``q_positions``
    (Nq,) and ``k_positions`` any non-empty 1-D integer array (it sets Nk).
    """
    if isinstance(q, np.ndarray) and (q.ndim != 4 or q.size == 0):
        raise SpecError("q", "4 non-empty dimensions (B, H, N, D)", f"shape {q.shape}")
    q = checks.float_array(q, "q")
    _, heads, q_len, head_dim = q.shape
    r = _float_table(r, "r", f"(Hq, R, D) = ({heads}, R, {head_dim}) with R >= 1", 3, (heads, None, head_dim))
    v_bias = _float_table(v_bias, "v_bias", f"(Hq, D) = ({heads}, {head_dim})", 2, (heads, head_dim))
    q_positions = checks.positions(q_positions, "q_positions", q_len)
    k_positions = checks.positions(k_positions, "k_positions")
    return q, r, v_bias, q_positions, k_positions


def _float_table(x, name: str, expected: str, ndim: int, shape: tuple) -> np.ndarray:
    """A finite float array of ``ndim`` dimensions whose sizes match ``shape`` (None = any size >= 1)."""
    if isinstance(x, np.ndarray) and (x.ndim != ndim or any(
        size == 0 or (want is not None and size != want) for size, want in zip(x.shape, shape)
    )):  # fmt: skip
        raise SpecError(name, f"shape {expected}", f"shape {x.shape}")
    return checks.float_array(x, name)


def check_every_unmasked_pair_has_a_row(x: TransformerXLInputs) -> None:
    """Raise :func:`missing_row`'s error if a pair that is not masked has no row of ``r``.

    Pairs whose distance lies outside ``[0, R - 1]`` must be excluded by the
    mask, causality or a window; the reference checks this before computing.
    """
    rows, has_row = x.rows()
    allowed = x.dense.allowed()  # broadcastable to (B, Hq, Nq, Nk), or None: all allowed
    missing = ~has_row if allowed is None else allowed & ~has_row  # (..., Nq, Nk)
    if np.any(missing):
        i, j = np.argwhere(missing)[0][-2:]
        raise missing_row(x, int(i), int(j))


def missing_row(x: TransformerXLInputs, i: int, j: int) -> SpecError:
    """The error for query ``i`` and key ``j``, unmasked, whose distance has no row of ``r``."""
    distance = int(x.q_positions[i] - x.k_positions[j])
    return SpecError(
        "r",
        f"a row for the distance q_positions[i] - k_positions[j] of every unmasked pair, i.e. a distance in "
        f"[0, R - 1] = [0, {x.n_rows - 1}] (mask the other pairs)",
        f"distance {distance} at query {i}, key {j}, which no mask, causality or window excludes",
    )
