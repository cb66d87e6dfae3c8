"""The numba backend of sliding-window attention: dense attention's tiled kernel,
which visits only the key tiles inside the window (refattn/dense/numba.py)."""

from ...dense.numba import forward, vjp  # noqa: F401
