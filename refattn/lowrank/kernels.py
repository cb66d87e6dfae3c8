"""What the low-rank Numba backends share: their compute dtype, single-threaded BLAS, a batched matrix product.

Every backend computes in float32 for float32, float16 and bfloat16 inputs
and in float64 otherwise, and returns its results in the inputs' dtype (the
rule of refattn/dense/numba.py).

The kernels call BLAS (``np.dot`` inside ``@njit``, SciPy's OpenBLAS) from
Numba's threads, one (batch, head) per thread, on tiles large enough for
OpenBLAS to start threads of its own. Nested, the two thread pools contend:
measured on 2 cores, 512 products (1024 × 64) @ (64 × 266) in ``prange`` took
1.4 s with OpenBLAS at 2 threads against 0.21 s at 1 (and 8 stacked
256 × 256 NumPy products 0.30 s against 0.02 s under load). Every kernel
therefore runs inside :func:`single_threaded_blas`, which also keeps NumPy's
OpenBLAS (the small (m, m) products around the kernels) at one thread.
"""

from __future__ import annotations

import ctypes
import glob
import os
from contextlib import contextmanager

import numpy as np
import scipy
from numba import njit, prange

from ..core.tiles import exp_nonpositive

_FLOAT32_COMPUTED = (np.dtype(np.float32), np.dtype(np.float16))  # and bfloat16, below


def compute_dtype(x: np.ndarray) -> np.dtype:
    """float32 for float32/float16/bfloat16 inputs, float64 otherwise."""
    if x.dtype in _FLOAT32_COMPUTED or x.dtype.name == "bfloat16":
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def returned(arrays: dict, like: np.ndarray) -> dict:
    """Results in the inputs' own dtype (``like``'s): computed in float32 for bfloat16 and float16, returned as them."""
    return {name: value.astype(like.dtype, copy=False) for name, value in arrays.items()}


def _openblas_thread_controls() -> list:
    """(get, set) of the thread count of every bundled OpenBLAS found: SciPy's (behind Numba's ``np.dot``) and NumPy's."""
    controls = []
    for package, name, suffix in ((scipy, "scipy.libs", ""), (np, "numpy.libs", "64_")):
        for path in glob.glob(os.path.join(os.path.dirname(package.__file__), os.pardir, name, "libscipy_openblas*.so")):
            lib = ctypes.CDLL(path)
            get, set_ = (getattr(lib, f"scipy_openblas_{verb}_num_threads{suffix}", None) for verb in ("get", "set"))
            if get is not None and set_ is not None:
                controls.append((get, set_))
    return controls


_OPENBLAS_THREADS = _openblas_thread_controls()


@contextmanager
def single_threaded_blas():
    """SciPy's and NumPy's OpenBLAS at one thread inside the block (Numba's threads run the products), restored after it."""
    before = [get() for get, _ in _OPENBLAS_THREADS]
    for _, set_ in _OPENBLAS_THREADS:
        set_(1)
    try:
        yield
    finally:
        for (_, set_), count in zip(_OPENBLAS_THREADS, before):
            set_(count)


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
    with single_threaded_blas():
        out = batched_matmul(np.ascontiguousarray(a.reshape((-1,) + a.shape[-2:])),
                             np.ascontiguousarray(b.reshape((-1,) + b.shape[-2:])))  # fmt: skip
    return out.reshape(lead + out.shape[-2:])


ATTENTION_TILE = 512  # rows of query and key tiles in :func:`tiled_attention`


@njit(parallel=True, cache=True)
def tiled_attention(q, k, v, scale):
    """``softmax(scale q kᵀ) v`` (B, H, Nq, Dv) and its lse (B, H, Nq), no mask: (512 × 512) BLAS tiles, the online softmax.

    For few keys or few queries (Nyström's m landmarks, Linformer's P
    projections) larger tiles than refattn/dense/numba.py's 64 × 64 make
    the products BLAS-sized; steps as refattn/core/tiles.py describes.
    """
    batch, heads, nq = q.shape[:3]
    nk, dv = k.shape[2], v.shape[3]
    n_tiles = (nq + ATTENTION_TILE - 1) // ATTENTION_TILE
    out = np.empty((batch, heads, nq, dv), q.dtype)
    lse = np.empty((batch, heads, nq), q.dtype)
    for item in prange(batch * heads * n_tiles):
        b, h, i0 = item // (heads * n_tiles), (item // n_tiles) % heads, (item % n_tiles) * ATTENTION_TILE
        i1 = min(i0 + ATTENTION_TILE, nq)
        keys, values = k[b, h], v[b, h]  # (Nk, D), (Nk, Dv), C-contiguous
        rows = q[b, h, i0:i1] * scale
        top = np.full(i1 - i0, -np.inf, q.dtype)  # running maximum, sum and output of each row
        total = np.zeros(i1 - i0, q.dtype)
        acc = np.zeros((i1 - i0, dv), q.dtype)
        for j0 in range(0, nk, ATTENTION_TILE):
            j1 = min(j0 + ATTENTION_TILE, nk)
            weights = np.dot(rows, keys[j0:j1].T)  # logits, then e^{logit − max}
            for i in range(i1 - i0):
                new = max(top[i], weights[i].max())
                alpha = exp_nonpositive(top[i] - new)
                total[i] *= alpha
                acc[i] *= alpha
                top[i] = new
                row = weights[i]
                for j in range(j1 - j0):
                    row[j] = exp_nonpositive(row[j] - new)
                total[i] += row.sum()
            acc += np.dot(weights, values[j0:j1])
        for i in range(i1 - i0):
            out[b, h, i0 + i] = acc[i] / total[i]
            lse[b, h, i0 + i] = top[i] + np.log(total[i])
    return out, lse
