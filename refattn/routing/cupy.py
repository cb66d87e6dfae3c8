"""The ``"cupy"`` backend: the algorithm of refattn/routing/xp.py on a GPU."""

from ..core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
