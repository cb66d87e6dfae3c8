"""Checked inputs of one Shaw-attention call, shared by every Shaw backend.

The registry calls :func:`check_shaw_inputs` before any backend runs, so bad
input is rejected identically (and before anything is computed) whichever
backend is chosen. The
dense parameters (masks, causality, window, scale, soft-cap, bias, dropout)
are checked by the dense check itself; this module adds the encoding's own
arguments: the two tables, the positions and the clipping distance.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ...core import checks
from ...core.errors import SpecError
from ...dense.inputs import DenseInputs, check_dense_inputs


@dataclass(frozen=True)
class ShawInputs:
    """Checked dense inputs plus the encoding's arguments, in the caller's dtypes."""

    dense: DenseInputs
    rel_k: np.ndarray  # (2K+1, D), real
    rel_v: np.ndarray  # (2K+1, Dv), real
    q_positions: np.ndarray  # (Nq,), int64
    k_positions: np.ndarray  # (Nk,), int64
    max_relative_position: int  # K >= 0

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: dense attention's."""
        return self.dense.cotangent_shapes()


def check_clip_distance(x) -> int:
    """``max_relative_position`` (K): an integer >= 0, Python or NumPy, not a bool."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or x < 0:
        raise SpecError("max_relative_position", "an integer >= 0", f"{type(x).__name__} {x!r}")
    return int(x)


def check_table(x, name: str, rows: int, width: int, width_name: str) -> np.ndarray:
    """A finite real table of shape ``(rows, width)``: one row per clipped relative distance."""
    if isinstance(x, np.ndarray) and x.shape != (rows, width):
        raise SpecError(name, f"shape (2K+1, {width_name}) = ({rows}, {width})", f"shape {x.shape}")
    return checks.float_array(x, name)


def check_shaw_inputs(
    q, k, v, *, rel_k, rel_v, q_positions, k_positions, max_relative_position, **dense_arguments
) -> ShawInputs:
    """Check every argument of ``shaw_attention``; raise :class:`SpecError` on the first bad one.

    ``dense_arguments`` are :func:`refattn.dense_attention`'s keywords, checked by its own check.
    """
    dense = check_dense_inputs(q, k, v, **dense_arguments)
    s = dense.shape
    clip = check_clip_distance(max_relative_position)
    inputs = ShawInputs(
        dense=dense,
        rel_k=check_table(rel_k, "rel_k", 2 * clip + 1, s.head_dim, "D"),
        rel_v=check_table(rel_v, "rel_v", 2 * clip + 1, s.value_dim, "Dv"),
        q_positions=checks.positions(q_positions, "q_positions", s.q_len),
        k_positions=checks.positions(k_positions, "k_positions", s.kv_len),
        max_relative_position=clip,
    )
    checks.scores_within_range(dense.q, (dense.k, inputs.rel_k), dense.scale, "q, k, rel_k")  # q·k_j + q·a_ij
    return inputs
