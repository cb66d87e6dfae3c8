"""Invariants of RoPE (spec/position.md, RoPE, "Invariants"), reusable on any implementation.

Two kinds of callable are checked:

* ``rotate(x, positions, **params)``: the encoding alone, (B, H, N, D) ->
  (B, H, N, D), like :func:`refattn.position.rope.apply_rope`; ``params``
  hold ``rotary_dim`` (the rotated dims, default D) and whatever else it takes.
* ``attend(q, k, v, **params)``: the whole mechanism, returning an object
  with ``.out`` and ``.lse``, like :func:`refattn.position.rope.rope_attention`;
  ``params`` hold ``q_positions`` and ``k_positions``.

Each property raises ``AssertionError`` describing the violation, or returns
None. ``rtol`` is a normwise relative tolerance: 1e-10 suits float64.
"""

from __future__ import annotations

import numpy as np

from ...core.invariants import close


def rotation_preserves_norms(rotate, x, positions, params, rtol=1e-10):
    """A rotation preserves the norm of every rotated pair, hence of every vector's rotated
    part, and leaves the dims from ``rotary_dim`` on unchanged."""
    r = params.get("rotary_dim") or x.shape[-1]
    rotated = rotate(x, positions, **params)
    close("norm of the rotated part", np.linalg.norm(rotated[..., :r], axis=-1), np.linalg.norm(x[..., :r], axis=-1), rtol)
    close("dims after rotary_dim", rotated[..., r:], x[..., r:], rtol)


def position_zero_is_identity(rotate, x, params, rtol=1e-10):
    """At position 0 every angle is 0: the encoding returns its input."""
    close("encoding at position 0", rotate(x, np.zeros(x.shape[2], np.int64), **params), x, rtol)


def layouts_agree_under_permutation(rotate, x, positions, params, rtol=1e-10):
    """``interleaved(x) = P⁻¹ half(P x)``, with ``P`` gathering the even then the odd rotated dims.

    This is the map HF's Llama conversion applies to Meta's q and k weights
    (``permute`` in convert_llama_weights_to_hf.py). ``params`` must not
    hold ``layout``.
    """
    r = params.get("rotary_dim") or x.shape[-1]
    gather = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, x.shape[-1])])  # P
    scatter = np.argsort(gather)  # P⁻¹
    interleaved = rotate(x, positions, layout="interleaved", **params)
    half = rotate(x[..., gather], positions, layout="half", **params)[..., scatter]
    close("interleaved vs P⁻¹ half P", interleaved, half, rtol)


def relative_dot_products(rotate, q, k, q_positions, k_positions, params, rtol=1e-10):
    """``R(θ_n) q · R(θ_m) k = R(θ_{n−m}) q · k``: rotated scores depend on positions only
    through ``n − m``. ``q`` (B, H, Nq, D) and ``k`` (B, H, Nk, D) have the same heads."""
    scores = np.einsum("bhqd,bhkd->bhqk", rotate(q, q_positions, **params), rotate(k, k_positions, **params))
    relative = np.stack(
        [np.einsum("bhqd,bhd->bhq", rotate(q, q_positions - m, **params), k[:, :, j]) for j, m in enumerate(k_positions)],
        axis=-1,
    )  # (B, H, Nq, Nk): query i rotated by its distance to key j, key j unrotated
    close("scores vs relative scores", scores, relative, rtol)


def position_shift_invariance(attend, q, k, v, params, shift=1000, rtol=1e-10):
    """Adding one constant to every query and key position changes neither output nor lse."""
    shifted = dict(params, q_positions=params["q_positions"] + shift, k_positions=params["k_positions"] + shift)
    base, moved = attend(q, k, v, **params), attend(q, k, v, **shifted)
    close("out", moved.out, base.out, rtol)
    close("lse", moved.lse, base.lse, rtol)


ENCODING = (rotation_preserves_norms, position_zero_is_identity, layouts_agree_under_permutation, relative_dot_products)
MECHANISM = (position_shift_invariance,)
