"""Boolean masks by position: causal alignment and sliding windows.

``True`` means "may attend". Causal alignment is explicit (spec/README.md):

* ``"bottom_right"`` (default): the last query lines up with the last key.
  Query ``i`` sees key ``j`` iff ``j <= i + (Nk - Nq)``. This is what a KV
  cache needs: the newest query sees every cached key.
* ``"top_left"``: the first query lines up with the first key (PyTorch
  ``is_causal``). Query ``i`` sees key ``j`` iff ``j <= i``.

Both reduce to ``j <= i`` when ``Nq == Nk``. A window ``(left, right)`` keeps
keys with ``i' - left <= j <= i' + right`` where ``i' = i + offset`` is the
query's aligned position; ``None`` leaves a side unbounded.
"""

from __future__ import annotations

import numpy as np


def query_offset(q_len: int, kv_len: int, alignment: str) -> int:
    """Aligned position of query 0 on the key axis: ``Nk - Nq`` (bottom_right) or 0."""
    return kv_len - q_len if alignment == "bottom_right" else 0


def position_mask(q_len: int, kv_len: int, *, causal: bool, window, alignment: str) -> np.ndarray | None:
    """(Nq, Nk) bool mask from causality and a window, or None when neither restricts.

    Parameters
    ----------
    causal : bool
        Keep keys ``j <= i'`` only.
    window : (left, right) or None
        Keep keys ``i' - left <= j <= i' + right``; a None side is unbounded.
    alignment : "bottom_right" or "top_left"
        Where ``i' = i + offset`` comes from (see module docstring).
    """
    if not causal and window is None:
        return None
    aligned_query = np.arange(q_len)[:, None] + query_offset(q_len, kv_len, alignment)  # (Nq, 1)
    key = np.arange(kv_len)[None, :]  # (1, Nk)
    allowed = np.ones((q_len, kv_len), dtype=bool)
    if causal:
        allowed &= key <= aligned_query
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= key >= aligned_query - left
        if right is not None:
            allowed &= key <= aligned_query + right
    return allowed


def combine(*masks: np.ndarray | None) -> np.ndarray | None:
    """Logical AND of the masks that are given (broadcasting), or None if none is."""
    given = [m for m in masks if m is not None]
    if not given:
        return None
    allowed = given[0]
    for m in given[1:]:
        allowed = allowed & m
    return allowed
