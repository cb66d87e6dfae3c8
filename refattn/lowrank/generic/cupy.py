"""The ``"cupy"`` backend: the blocked algorithm of refattn/lowrank/generic/xp.py on a GPU."""

from ...core.xp import cupy_backend
from . import xp

forward, vjp = cupy_backend(xp)
