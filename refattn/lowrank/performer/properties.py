"""Invariants of Performer (spec/low_rank.md, "Performer"), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)`` returning an object with
``.out`` and a problem; it raises ``AssertionError`` describing the
violation, or returns None.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close, require


def causal_independence(attend, q, k, v, params, cut=None, seed=0, rtol=1e-12):
    """Outputs at query i do not depend on keys or values after i: keys and values from ``cut``
    on (default N − 1, the last key alone) are replaced by noise; rows before ``cut`` must not change.

    The leaking presets (performer-pytorch, Google: one key maximum over all
    positions with ε after ``exp``) fail it. Needs ``causal=True``.
    """
    require(bool(params.get("causal")), "causal=True")
    n = k.shape[2]
    cut = n - 1 if cut is None else cut
    rng = np.random.default_rng(seed)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, cut:] = 3.0 * rng.standard_normal(k2[:, :, cut:].shape)
    v2[:, :, cut:] = rng.standard_normal(v2[:, :, cut:].shape)
    close("out before the cut", attend(q, k2, v2, **params).out[:, :, :cut], attend(q, k, v, **params).out[:, :, :cut], rtol)
