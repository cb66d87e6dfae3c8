"""The ``"cupy"`` backend: the update of refattn/routing/centroids/xp.py on a GPU."""

from ...core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
