"""Checked inputs of one dense-attention call, shared by every dense backend.

Every backend calls :func:`check_dense_inputs` first, so bad input is rejected
identically (and before anything is computed) whichever backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core import checks
from ..core.errors import SpecError
from ..core.masks import combine, position_mask


@dataclass(frozen=True)
class DenseInputs:
    """Checked q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), in the caller's dtype, and parameters."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    shape: checks.AttentionShape
    mask: np.ndarray | None  # user mask, bool, broadcastable to (B, Hq, Nq, Nk)
    bias: np.ndarray | None  # real, broadcastable to (B, Hq, Nq, Nk)
    causal: bool
    causal_alignment: str
    window: tuple[int | None, int | None] | None
    scale: float
    softcap: float
    dropout_keep: np.ndarray | None  # bool, broadcastable to (B, Hq, Nq, Nk)
    dropout_p: float

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: those of ``out`` and ``lse``."""
        s = self.shape
        return {"dout": (s.batch, s.q_heads, s.q_len, s.value_dim), "dlse": (s.batch, s.q_heads, s.q_len)}

    def allowed(self) -> np.ndarray | None:
        """The user mask AND the causal/window mask, or None when nothing is masked."""
        by_position = position_mask(
            self.shape.q_len, self.shape.kv_len, causal=self.causal, window=self.window, alignment=self.causal_alignment
        )
        return combine(self.mask, by_position)


def check_dense_inputs(
    q, k, v, *, mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
) -> DenseInputs:
    """Check every argument of ``dense_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = checks.qkv(q, k, v)
    if mask is not None:
        mask = checks.broadcastable(mask, "mask", shape.scores, "bool")
    if bias is not None:
        bias = checks.broadcastable(bias, "bias", shape.scores, "float")
    causal = checks.flag(causal, "causal")
    causal_alignment = checks.choice(causal_alignment, "causal_alignment", checks.CAUSAL_ALIGNMENTS)
    window = checks.window(window)
    scale = checks.scale(scale, shape.head_dim)
    checks.scores_within_range(q, k, scale)
    softcap = checks.real_number(softcap, "softcap", minimum=0.0)
    dropout_p = checks.real_number(dropout_p, "dropout_p", minimum=0.0, maximum=1.0)
    if dropout_keep is not None:
        dropout_keep = checks.broadcastable(dropout_keep, "dropout_keep", shape.scores, "bool")
    elif dropout_p > 0:
        raise SpecError("dropout_keep", "a bool keep-mask when dropout_p > 0 (randomness is an input)", "None")
    return DenseInputs(q, k, v, shape, mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p)
