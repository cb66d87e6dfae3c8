"""The ``"cupy"`` backend of soft routing: the algorithm of refattn/routing/soft/xp.py on a GPU."""

from ...core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
