"""What the mechanisms of this family share: the self-attention input rule and
the pattern invariant ("a token's output never depends on keys outside its
pattern"), checked through a VJP's zero pattern."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core import checks
from ..core.errors import SpecError


def self_attention_qkv(q, k, v):
    """``checks.qkv`` plus the self-attention rule ``Nq == Nk``."""
    q, k, v, shape = checks.qkv(q, k, v)
    if shape.q_len != shape.kv_len:
        raise SpecError("k", f"N = {shape.q_len} tokens (self-attention: as q)", f"{shape.kv_len} tokens")
    return q, k, v, shape


@dataclass(frozen=True)
class SelfAttentionInputs:
    """The checked q, k, v of a self-attention mechanism of this family, whose ``out`` is (B, Hq, N, Dv)
    and ``lse`` (B, Hq, N); each mechanism's checked inputs add their own fields."""

    q: np.ndarray  # (B, Hq, N, D)
    k: np.ndarray  # (B, Hkv, N, D)
    v: np.ndarray  # (B, Hkv, N, Dv)
    shape: checks.AttentionShape

    def cotangent_shapes(self) -> dict:
        s = self.shape
        return {"dout": (s.batch, s.q_heads, s.q_len, s.value_dim), "dlse": (s.batch, s.q_heads, s.q_len)}


def dependence_pattern(attend, attend_vjp, q, k, v, params, seed=0) -> np.ndarray:
    """(B, H, N, N) bool: whether output row i has a nonzero gradient with respect to key or value j.

    One VJP per row i with a random cotangent on row i alone (``dlse`` 0);
    ``k``/``v`` gradients are mapped to query heads by the GQA rule (kv head
    g serves query heads g * group ...), so the pattern is per query head when
    Hkv == Hq and per kv group otherwise.
    """
    rng = np.random.default_rng(seed)
    result = attend(q, k, v, **params)
    b, h, n = result.out.shape[:3]
    pattern = np.zeros((b, k.shape[1], n, k.shape[2]), dtype=bool)
    for i in range(n):
        dout = np.zeros(result.out.shape)
        dout[:, :, i] = rng.standard_normal(dout[:, :, i].shape)
        grads = attend_vjp(dout, q, k, v, dlse=np.zeros(result.lse.shape), **params)
        pattern[:, :, i] = np.any(grads["k"] != 0, axis=-1) | np.any(grads["v"] != 0, axis=-1)
    return pattern


def depends_only_on_pattern(attend, attend_vjp, q, k, v, params, allowed, seed=0) -> None:
    """Output row i depends on no key or value j with ``allowed[..., i, j]`` False.

    ``allowed`` is the pattern the spec states, broadcastable to
    (B, Hkv, N, N). Raises ``AssertionError`` naming the first violation.
    """
    found = dependence_pattern(attend, attend_vjp, q, k, v, params, seed)
    outside = found & ~np.broadcast_to(allowed, found.shape)
    if np.any(outside):
        b, g, i, j = (int(x) for x in np.argwhere(outside)[0])
        raise AssertionError(f"output row {i} (batch {b}, kv head {g}) depends on key {j} outside its pattern")


def merge_cotangents(partials, lse, out, dout, dlse):
    """The VJP of :func:`refattn.core.softmax.merge`: cotangents of each partial (out_r, lse_r).

    With ``w_r = exp(lse_r - lse)`` (0 where ``lse_r = -inf``), ``out = sum_r w_r out_r``
    and ``lse = log sum_r exp(lse_r)``::

        d out_r = w_r dout
        d lse_r = w_r (dlse + dout . (out_r - out))

    Returns a list of ``(dout_r, dlse_r)``, one per partial.
    """
    has_key = np.isfinite(lse)
    grads = []
    for part_out, part_lse in partials:
        with np.errstate(invalid="ignore"):
            weight = np.where(has_key & np.isfinite(part_lse), np.exp(part_lse - np.where(has_key, lse, 0.0)), 0.0)
        d_lse = weight * (dlse + np.sum(dout * (part_out - out), axis=-1))
        grads.append((weight[..., None] * dout, d_lse))
    return grads
