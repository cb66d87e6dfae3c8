"""What the low-rank Numba backends share: their compute dtype and a batched matrix product.

Every backend computes in float32 for float32, float16 and bfloat16 inputs
and in float64 otherwise, and returns its results in the inputs' dtype (the
rule of refattn/dense/numba.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_FLOAT32_COMPUTED = (np.dtype(np.float32), np.dtype(np.float16))  # and bfloat16, below


def compute_dtype(x: np.ndarray) -> np.dtype:
    """float32 for float32/float16/bfloat16 inputs, float64 otherwise."""
    if x.dtype in _FLOAT32_COMPUTED or x.dtype.name == "bfloat16":
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def returned(arrays: dict, like: np.ndarray) -> dict:
    """Results in the inputs' own dtype (``like``'s): computed in float32 for bfloat16 and float16, returned as them."""
    return {name: value.astype(like.dtype) for name, value in arrays.items()}


def as_compute(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as a contiguous array of the compute dtype."""
    return np.ascontiguousarray(x, dtype=dtype)


@njit(parallel=True, cache=True)
def batched_matmul(a, b):
    """(G, I, J) @ (G, J, K) -> (G, I, K), one BLAS product per leading index, in parallel."""
    out = np.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype)
    for g in prange(a.shape[0]):
        out[g] = np.dot(a[g], b[g])
    return out


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., I, J) @ (..., J, K) with equal leading axes, through :func:`batched_matmul`."""
    lead = a.shape[:-2]
    out = batched_matmul(np.ascontiguousarray(a.reshape((-1,) + a.shape[-2:])),
                         np.ascontiguousarray(b.reshape((-1,) + b.shape[-2:])))  # fmt: skip
    return out.reshape(lead + out.shape[-2:])
