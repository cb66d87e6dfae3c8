"""The ``"cupy"`` backend: the tiled algorithm of refattn/position/t5/xp.py on a GPU."""

from ...core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
