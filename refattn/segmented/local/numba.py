"""local-attention on CPU: the block-sparse kernel (refattn/segmented/blocksparse.py) over
look-around key lists, O(N * (look_backward + 1 + look_forward) * window_size) time, O(N)
memory besides them. Steps (0)-(5) as in reference.py: (1) and (2) are elementwise NumPy
over (B, H, N, D); (3)-(5) are the kernel."""

from __future__ import annotations

import math

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from ...position import apply_rope
from .. import blocksparse
from .reference import L2NORM_EPS, LocalInputs


def _keys(x: LocalInputs) -> tuple[np.ndarray, np.ndarray]:
    """(3) Per query block, the keys of its look-around blocks (padding keys only when attended)."""
    ws, n_blocks = x.window_size, x.padded_len // x.window_size
    last = x.padded_len if x.attend_padding else x.shape.q_len
    rows = [np.arange(max(t - x.look_backward, 0) * ws, min((t + x.look_forward + 1) * ws, last))
            for t in range(n_blocks)]  # fmt: skip
    keys = blocksparse.key_lists(rows, (x.look_backward + 1 + x.look_forward) * ws)[None, None]
    return keys, np.ones(keys.shape, dtype=bool)


def _kernel_options(x: LocalInputs, dtype) -> dict:
    ws = x.window_size
    return dict(block=ws, scale=x.scale, causal=x.causal, left=ws * x.look_backward if x.exact_windowsize else -1,
                right=ws * x.look_forward if x.exact_windowsize and not x.causal else -1,
                self_score=float(x.self_score) if x.shared_qk else math.nan)  # fmt: skip


def _queries_and_keys(x: LocalInputs, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(1)-(2): keys l2-normalised, then q and k rotated; also the key norms (for the VJP)."""
    q, k = x.q.astype(dtype, copy=False), x.k.astype(dtype, copy=False)
    norm = None
    if x.shared_qk:
        norm = np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), L2NORM_EPS).astype(dtype, copy=False)
        k = k / norm
    if x.rotary:
        n = x.shape.q_len
        q = apply_rope(q, np.arange(n) + x.query_shift).astype(dtype, copy=False)
        k = apply_rope(k, np.arange(n)).astype(dtype, copy=False)
    return q, k, norm


def forward(x: LocalInputs) -> Result:
    dtype = compute_dtype(x.q)
    q, k, _ = _queries_and_keys(x, dtype)
    keys, banded = _keys(x)
    out, lse = blocksparse.attend(q, k, x.v.astype(dtype, copy=False), keys, banded, **_kernel_options(x, dtype))
    return Result(out=out, lse=lse)


def vjp(x: LocalInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    dtype = compute_dtype(x.q)
    q, k, norm = _queries_and_keys(x, dtype)
    result = saved if saved is not None else forward(x)
    keys, banded = _keys(x)
    dq, dk, dv = blocksparse.attend_vjp(q, k, x.v.astype(dtype, copy=False), keys, banded, result.out.astype(dtype, copy=False),
                                        result.lse.astype(dtype, copy=False), cotangents.dout, cotangents.dlse,
                                        **_kernel_options(x, dtype))  # fmt: skip
    if x.rotary:  # (2') rotation back
        n = x.shape.q_len
        dq = apply_rope(dq, -(np.arange(n) + x.query_shift)).astype(dtype, copy=False)
        dk = apply_rope(dk, -np.arange(n)).astype(dtype, copy=False)
    if x.shared_qk:  # (1') through k / |k|
        k_hat = x.k.astype(dtype, copy=False) / norm
        radial = np.where(norm > L2NORM_EPS, np.sum(k_hat * dk, axis=-1, keepdims=True), 0.0)
        dk = ((dk - k_hat * radial) / norm).astype(dtype, copy=False)
    return Grads(q=dq, k=dk, v=dv)
