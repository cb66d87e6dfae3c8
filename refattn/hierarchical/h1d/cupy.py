"""The ``"cupy"`` backend: the block-batched hierarchy of refattn/hierarchical/h1d/xp.py on a GPU."""

from ...core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
