"""The ``"cupy"`` backend: the composition of refattn/routing/hybrid/xp.py on a GPU."""

from ...core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
