"""Invariants of Nyströmformer (spec/low_rank.md), reusable on any implementation."""

from __future__ import annotations

from ...core.invariants import close, require
from ...dense import dense_attention


def full_landmarks_equal_dense(attend, q, k, v, params, rtol=1e-8):
    """With m = N landmarks (each token its own segment) and enough iterations, ``k₁ Z k₃ = P P⁻¹ P = P``:
    the output is softmax attention. Holds to the iteration's precision when the softmax matrix is invertible."""
    require(params.get("num_landmarks") == q.shape[2], "num_landmarks = N")
    require(params.get("conv_kernel") is None and params.get("key_padding_mask") is None, "no conv and no mask")
    close("out", attend(q, k, v, **params).out, dense_attention(q, k, v, scale=params.get("scale")).out, rtol)
