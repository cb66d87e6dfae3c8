"""The ``"cupy"`` backend: the levels of padded units of refattn/hierarchical/multilevel/xp.py on a GPU."""

from ...core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
