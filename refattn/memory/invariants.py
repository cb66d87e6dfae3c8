"""Invariants every streaming mechanism here obeys, for its ``properties.py``."""

from __future__ import annotations

import numpy as np

from ..core.invariants import close, require


def state_carries_over(forward, q, k, v, split: int, params: dict, state: tuple[str, ...], rtol: float = 1e-10):
    """Streaming ``[:split]`` and then ``[split:]`` from the first call's final state (``aux``) equals one call.

    ``split`` must fall on a segment boundary; ``params`` hold the other arguments.
    """
    n = q.shape[2]
    require(0 < split < n and split % params.get("segment_len", 1) == 0, "a split on a segment boundary")
    whole = forward(q, k, v, **params)
    first = forward(q[:, :, :split], k[:, :, :split], v[:, :, :split], **params)
    carried = {name: first.aux[name] for name in state if name in first.aux}
    second = forward(q[:, :, split:], k[:, :, split:], v[:, :, split:], **{**params, **carried})
    close("out", np.concatenate([first.out, second.out], axis=2), whole.out, rtol)
    if whole.lse is not None:
        close("lse", np.concatenate([first.lse, second.lse], axis=2), whole.lse, rtol)
    for name in whole.aux:
        close(f"aux.{name}", second.aux[name], whole.aux[name], rtol)


def segment_memory_mask(n: int, segment_len: int, mem_len: int) -> np.ndarray:
    """The (N, N) mask of one full pass that streaming with an empty memory equals: ``j <= i`` and
    ``j >= L * floor(i / L) - M``."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return (j <= i) & (j >= segment_len * (i // segment_len) - mem_len)
