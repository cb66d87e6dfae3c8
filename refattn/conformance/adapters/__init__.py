"""Adapters that turn a PyTorch or JAX attention function into an implementation
:func:`refattn.conformance.verify.verify` can run: NumPy arrays in, NumPy arrays
out, with gradients from the framework's autodiff as ``.vjp``.

The frameworks are imported when an adapter is first called, never by
importing refattn.
"""

from .jax import from_jax
from .torch import from_torch

__all__ = ["from_torch", "from_jax"]
