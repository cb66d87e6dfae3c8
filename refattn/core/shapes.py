"""Head mapping for grouped-query attention, and reduction of broadcast gradients.

GQA/MQA rule (spec/README.md): with ``group = Hq // Hkv``, query head ``h``
reads key/value head ``h // group`` -- the ``repeat_interleave`` rule of
PyTorch, not tiling (``h % Hkv``).
"""

from __future__ import annotations

import numpy as np


def repeat_kv_heads(x: np.ndarray, group: int) -> np.ndarray:
    """(B, Hkv, N, D) -> (B, Hkv * group, N, D), kv head g repeated for query heads g*group ... g*group+group-1."""
    return np.repeat(x, group, axis=1)


def sum_kv_heads(x: np.ndarray, group: int) -> np.ndarray:
    """Adjoint of :func:`repeat_kv_heads`: (B, Hq, N, D) -> (B, Hq // group, N, D), summing each group."""
    b, hq, n, d = x.shape
    return x.reshape(b, hq // group, group, n, d).sum(axis=2)


def sum_to_shape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Adjoint of broadcasting ``shape`` up to ``x.shape``: sum the broadcast axes."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x
