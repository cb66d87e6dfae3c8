"""The ``"cupy"`` backend of dense attention: the tiled algorithm of refattn/dense/xp.py on a GPU."""

from ..core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
