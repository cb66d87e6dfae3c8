"""Inject a case's random rotations into a library that draws them with ``torch.randn``.

Shared by the LSH adapters (hf_reformer.py, reformer_pytorch_lsh.py): for the duration of the
library's call, ``torch.randn`` is replaced by :func:`fixed_randn`'s stand-in.
"""

from __future__ import annotations

import torch


def fixed_randn(rotations: torch.Tensor, library: str):
    """A stand-in for ``torch.randn`` that returns ``rotations`` for the shape ``library`` asks for, or raises."""

    def randn(*shape, dtype=None, device=None, **_):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if shape != tuple(rotations.shape):
            raise AssertionError(f"{library} asked for rotations of shape {shape}; the case has {tuple(rotations.shape)}")
        return rotations.to(dtype=dtype, device=device)

    return randn
