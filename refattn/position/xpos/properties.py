"""Invariants of xPos (spec/position.md, xPos, "Invariants"), reusable on any implementation.

Two kinds of callable are checked:

* ``transform(x, positions, downscale=..., **params)``: the encoding alone,
  (B, H, N, D) -> (B, H, N, D), like :func:`refattn.position.xpos.apply_xpos`
  (``downscale=False`` for queries, True for keys); ``params`` hold
  ``rotary_dim``, ``scale_base``, ``gamma`` (defaults D, 512, 0.4) and whatever
  else it takes;
* ``attend(q, k, v, **params)``: the whole mechanism, like
  :func:`refattn.position.xpos.xpos_attention`.

Each property raises ``AssertionError`` describing the violation, or returns
None. ``rtol`` is a normwise relative tolerance: 1e-10 suits float64.
RoPE's ``layouts_agree_under_permutation`` and ``position_shift_invariance``
(refattn/position/rope/properties.py) hold for xPos as they are: give them a
``transform`` with ``downscale`` bound, and ``attend``.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close
from ..rope.reference import pair_indices


def _factors(positions, params, r, downscale):
    """``ζ_t^(±n / scale_base)`` (N, r/2), written out from the definition."""
    gamma, scale_base = params.get("gamma", 0.4), params.get("scale_base", 512.0)
    zeta = (np.arange(0, r, 2) / r + gamma) / (1 + gamma)  # (r/2,)
    sign = -1.0 if downscale else 1.0
    return zeta[None, :] ** (sign * np.asarray(positions, np.float64)[:, None] / scale_base)


def pair_norms_scale(transform, x, positions, params, rtol=1e-10):
    """The rotation keeps each pair's norm, so pair t of a query at position n has its norm
    times ``ζ_t^(n / scale_base)`` (a key's: times ``ζ_t^(−n / scale_base)``); the dims
    from ``rotary_dim`` on are unchanged."""
    r = params.get("rotary_dim") or x.shape[-1]
    first, second = pair_indices(r, params.get("layout", "half"))
    for downscale in (False, True):
        out = transform(x, positions, downscale=downscale, **params)
        norms = np.hypot(out[..., first], out[..., second])  # (B, H, N, r/2)
        expected = np.hypot(x[..., first], x[..., second]) * _factors(positions, params, r, downscale)
        close(f"pair norms (downscale={downscale})", norms, expected, rtol)
        close("dims after rotary_dim", out[..., r:], x[..., r:], rtol)


def position_zero_is_identity(transform, x, params, rtol=1e-10):
    """At position 0 every angle is 0 and every factor ``ζ^0 = 1``: queries and keys are unchanged."""
    zero = np.zeros(x.shape[2], np.int64)
    for downscale in (False, True):
        close(f"encoding at position 0 (downscale={downscale})", transform(x, zero, downscale=downscale, **params), x, rtol)


def relative_dot_products(transform, q, k, q_positions, k_positions, params, rtol=1e-10):
    """``T↑(n) q · T↓(m) k = T↑(n − m) q · k``: pair t of the score carries ``ζ_t^((n − m) / scale_base)``
    and the rotation by ``θ(n − m)``, so scores depend on positions only through ``n − m``.
    ``q`` (B, H, Nq, D) and ``k`` (B, H, Nk, D) have the same heads."""
    queries = transform(q, q_positions, downscale=False, **params)
    keys = transform(k, k_positions, downscale=True, **params)
    scores = np.einsum("bhqd,bhkd->bhqk", queries, keys)
    relative = np.stack(
        [
            np.einsum("bhqd,bhd->bhq", transform(q, q_positions - m, downscale=False, **params), k[:, :, j])
            for j, m in enumerate(k_positions)
        ],
        axis=-1,
    )  # (B, H, Nq, Nk)
    close("scores vs relative scores", scores, relative, rtol)


ENCODING = (pair_norms_scale, position_zero_is_identity, relative_dot_products)
