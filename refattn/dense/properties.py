"""Invariants of dense attention (spec/dense.md, "Invariants"), reusable on any implementation.

Each property takes ``attend(q, k, v, **params)``, a function returning an
object with ``.out`` (B, Hq, Nq, Dv) and ``.lse`` (B, Hq, Nq) -- a refattn
:class:`~refattn.core.results.Result`, or your kernel wrapped to look like
one -- and a problem (q, k, v, params). It raises ``AssertionError``
describing the violation, or returns None. ``rtol`` is a normwise relative
tolerance: 1e-10 suits float64 implementations.

Properties that need a particular kind of problem (no causal mask, no
dropout...) say so and raise ``ValueError`` when given another, so a test
filters its problems rather than passing vacuously.
"""

from __future__ import annotations

import numpy as np

from ..core.invariants import close, require
from ..core.masks import position_mask
from ..core.softmax import merge

POSITION_PARAMS = ("causal", "window")


def _explicit_mask(q, k, params) -> dict:
    """``params`` with causal/window turned into an explicit bool mask (same meaning)."""
    params = dict(params)
    nq, nk = q.shape[2], k.shape[2]
    by_position = position_mask(
        nq,
        nk,
        causal=params.pop("causal", False),
        window=params.pop("window", None),
        alignment=params.pop("causal_alignment", "bottom_right"),
    )
    if by_position is not None:
        params["mask"] = by_position if params.get("mask") is None else params["mask"] & by_position
    return params


def weights_sum_to_one(attend, q, k, v, params, rtol=1e-10):
    """Rows of attention weights sum to 1 (0 on a fully masked row).

    Seen through the output: with every value equal to 1, ``out = sum_j p_ij = 1``.
    Needs no dropout (a keep-mask rescales surviving weights).
    """
    require(params.get("dropout_keep") is None, "no dropout")
    result = attend(q, k, np.ones_like(v), **params)
    has_key = np.isfinite(result.lse)[..., None]
    close("sum of weights", result.out, np.where(has_key, 1.0, 0.0) * np.ones_like(result.out), rtol)


def key_permutation_invariance(attend, q, k, v, params, seed=0, rtol=1e-10):
    """Permuting keys and values together (and the mask/bias/keep columns) changes nothing.

    Needs no causal mask or window: those tie keys to positions.
    """
    require(not params.get("causal") and params.get("window") is None, "no causal mask and no window")
    perm = np.random.default_rng(seed).permutation(k.shape[2])
    permuted = dict(params)
    for name in ("mask", "bias", "dropout_keep"):
        if params.get(name) is not None:
            permuted[name] = params[name][..., perm]
    base, moved = attend(q, k, v, **params), attend(q, k[:, :, perm], v[:, :, perm], **permuted)
    close("out", moved.out, base.out, rtol)
    close("lse", moved.lse, base.lse, rtol)


def causal_independence(attend, q, k, v, params, seed=0, rtol=1e-10):
    """Outputs at query i do not depend on keys or values after its causal bound ``i + Nk - Nq``
    (``i`` for top-left alignment).

    Every key/value after a cut is replaced by noise; rows whose bound is
    before the cut must not change. Needs ``causal=True``.
    """
    require(bool(params.get("causal")), "causal=True")
    nq, nk = q.shape[2], k.shape[2]
    offset = nk - nq if params.get("causal_alignment", "bottom_right") == "bottom_right" else 0
    rng = np.random.default_rng(seed)
    cut = int(rng.integers(0, nk))
    k2, v2 = k.copy(), v.copy()
    k2[:, :, cut:] = rng.standard_normal(k2[:, :, cut:].shape)
    v2[:, :, cut:] = rng.standard_normal(v2[:, :, cut:].shape)
    rows = np.arange(nq) + offset < cut  # rows whose every visible key is before the cut
    base, changed = attend(q, k, v, **params), attend(q, k2, v2, **params)
    close("out of rows before the cut", changed.out[:, :, rows], base.out[:, :, rows], rtol)
    close("lse of rows before the cut", changed.lse[:, :, rows], base.lse[:, :, rows], rtol)


def score_shift_invariance(attend, q, k, v, params, shift=7.25, rtol=1e-10):
    """Adding a constant to every score changes no output; lse moves by the constant.

    The constant enters through ``bias`` (added to an existing bias, if any).
    """
    shifted = dict(params)
    shifted["bias"] = shift + (params["bias"] if params.get("bias") is not None else np.zeros((1, 1)))
    base, moved = attend(q, k, v, **params), attend(q, k, v, **shifted)
    close("out", moved.out, base.out, rtol)
    close("lse - shift", moved.lse - shift, base.lse, rtol)


def identical_keys_give_mean(attend, q, k, v, params, rtol=1e-10):
    """When every key is the same, every weight is exactly 1/n over the n allowed keys:
    the output is the mean of the allowed values (the uniform-dilution case).

    Needs no bias and no dropout (softcap is fine: equal scores stay equal).
    Uses key 0 of each head as the common key.
    """
    require(params.get("bias") is None and params.get("dropout_keep") is None, "no bias and no dropout")
    same_k = np.broadcast_to(k[:, :, :1], k.shape).copy()
    result = attend(q, same_k, v, **params)
    explicit = _explicit_mask(q, k, params)
    allowed = np.ones(result.lse.shape + (k.shape[2],), bool)
    if explicit.get("mask") is not None:
        allowed = allowed & explicit["mask"]
    group = q.shape[1] // k.shape[1]
    values = np.repeat(v, group, axis=1)  # (B, Hq, Nk, Dv)
    count = allowed.sum(-1, keepdims=True)  # (B, Hq, Nq, 1)
    mean = np.einsum("bhqk,bhke->bhqe", allowed.astype(float), values) / np.maximum(count, 1)
    close("out", result.out, mean, rtol)


def gqa_equals_repeated_heads(attend, q, k, v, params, rtol=1e-10):
    """Grouped-query attention equals multi-head attention with each kv head
    repeated for its group (query head h reads kv head h // group)."""
    group = q.shape[1] // k.shape[1]
    gqa = attend(q, k, v, **params)
    mha = attend(q, np.repeat(k, group, axis=1), np.repeat(v, group, axis=1), **params)
    close("out", gqa.out, mha.out, rtol)
    close("lse", gqa.lse, mha.lse, rtol)


def fully_masked_rows(attend, q, k, v, params, rows=(0,)):
    """A row with no allowed key gives output exactly 0 and lse exactly -inf (never NaN)."""
    params = dict(params)
    b, hq, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mask = np.ones((b, hq, nq, nk), bool) if params.get("mask") is None else np.broadcast_to(params["mask"], (b, hq, nq, nk)).copy()
    rows = [r for r in rows if r < nq]
    mask[:, :, rows] = False
    params["mask"] = mask
    result = attend(q, k, v, **params)
    if not (np.all(result.out[:, :, rows] == 0) and np.all(result.lse[:, :, rows] == -np.inf)):
        raise AssertionError(f"fully masked rows {rows}: expected out 0 and lse -inf")
    if np.any(np.isnan(result.out)) or np.any(np.isnan(result.lse)):
        raise AssertionError("NaN in the output")


def split_and_merge(attend, q, k, v, params, split=None, rtol=1e-10):
    """Attending to keys [0, s) and [s, Nk) separately and merging equals attending to all.

    Causal masks and windows are made explicit first (they are positional);
    mask, bias and keep-mask columns are split with the keys.
    """
    require(k.shape[2] >= 2, "at least two keys")
    nk = k.shape[2]
    split = nk // 2 if split is None else split
    params = _explicit_mask(q, k, params)
    halves = []
    for cols in (slice(0, split), slice(split, nk)):
        part = dict(params)
        for name in ("mask", "bias", "dropout_keep"):
            if params.get(name) is not None:
                part[name] = params[name][..., cols]
        halves.append(attend(q, k[:, :, cols], v[:, :, cols], **part))
    out, lse = merge(halves)
    whole = attend(q, k, v, **params)
    close("merged out", out, whole.out, rtol)
    close("merged lse", lse, whole.lse, rtol)


def out_from_lse(attend, q, k, v, params, rtol=1e-10):
    """``out_i = sum_j exp(s_ij - lse_i) v_j`` over allowed keys: the lse is the
    natural-log normaliser of the final masked scores.

    Scores are formed here from their definition (scale, softcap, bias).
    Needs no dropout.
    """
    require(params.get("dropout_keep") is None, "no dropout")
    result = attend(q, k, v, **params)
    explicit = _explicit_mask(q, k, params)
    group = q.shape[1] // k.shape[1]
    keys, values = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = params.get("scale") or 1 / np.sqrt(q.shape[-1])
    s = scale * np.einsum("bhqd,bhkd->bhqk", q, keys)
    if params.get("softcap"):
        s = params["softcap"] * np.tanh(s / params["softcap"])
    if params.get("bias") is not None:
        s = s + params["bias"]
    if explicit.get("mask") is not None:
        s = np.where(explicit["mask"], s, -np.inf)  # exp(-inf - lse) = 0
    lse = result.lse[..., None]
    has_key = np.isfinite(lse)
    weights = np.where(has_key, np.exp(s - np.where(has_key, lse, 0.0)), 0.0)
    close("out", result.out, np.einsum("bhqk,bhke->bhqe", weights, values), rtol)


ALL = (
    weights_sum_to_one,
    key_permutation_invariance,
    causal_independence,
    score_shift_invariance,
    identical_keys_give_mean,
    gqa_equals_repeated_heads,
    fully_masked_rows,
    split_and_merge,
    out_from_lse,
)
