"""Invariants of differential attention (spec/dilution.md, "Differential attention: invariants"),
reusable on any implementation.

Each property takes ``attend(q, k, v, **params)``, a differential-attention
implementation returning an object with ``.out`` (B, H, Nq, 2D) and,
optionally, ``.aux["map_lse"]`` (B, 2H, Nq), each query head's map's
log-sum-exp -- a refattn :class:`~refattn.core.results.Result`, or your
kernel wrapped to look like one -- and a problem: ``q`` (B, 2H, Nq, D),
``k`` (B, 2Hkv, Nk, D), ``v`` (B, Hkv, Nk, 2D) and ``params``, the keyword
arguments of :func:`refattn.dilution.differential.differential_attention`
(the λ vectors and exactly one of ``lambda_init`` and ``depth`` included).
It raises ``AssertionError`` describing the violation, or returns None.
``rtol`` is a normwise relative tolerance: 1e-10 suits float64
implementations.

The first two properties compare with refattn's dense attention reference
(:func:`refattn.dense_attention`) on one map: query heads ``c, c + 2, ...``,
the key heads of :func:`~refattn.dilution.differential.reference.key_heads`
and value head ``h // G``. Properties that need a particular kind of problem
say so and raise ``ValueError`` when given another.
"""

from __future__ import annotations

import math

import numpy as np

from ...core.invariants import close, require
from ...dense.reference import dense_attention
from .reference import key_heads, lambda_init_from_depth

#: Parameters that belong to the differential step and not to the dense maps.
_OWN = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "lambda_init", "depth", "norm_weight", "norm_eps",
        "apply_norm", "gqa_keys")  # fmt: skip


def _lambda(params: dict) -> float:
    """λ = exp(λ_q1 · λ_k1) − exp(λ_q2 · λ_k2) + λ_init, in float64."""
    lambda_init = lambda_init_from_depth(params["depth"]) if params.get("depth") is not None else params["lambda_init"]
    first = math.exp(float(np.dot(params["lambda_q1"], params["lambda_k1"])))
    second = math.exp(float(np.dot(params["lambda_q2"], params["lambda_k2"])))
    return first - second + lambda_init


def _per_query_head(x):
    """Whether a mask or bias has a query-head axis of its own (size 2H, not 1)."""
    return x is not None and x.ndim >= 3 and x.shape[-3] != 1


def first_map(q, k, v, params):
    """Dense attention (refattn's reference) of map 0: its ``out`` (B, H, Nq, 2D) and ``lse`` (B, H, Nq)."""
    heads, kv_heads = q.shape[1] // 2, k.shape[1] // 2
    dense = {name: value for name, value in params.items() if name not in _OWN}
    for name in ("mask", "bias"):
        if _per_query_head(dense.get(name)):
            dense[name] = dense[name][..., 0::2, :, :]
    keys = k[:, key_heads(heads, kv_heads, params.get("gqa_keys", "paired"))[0]]  # (B, H, Nk, D)
    return dense_attention(q[:, 0::2], keys, np.repeat(v, heads // kv_heads, axis=1), **dense)


def _map_lse(result):
    """``result.aux["map_lse"]`` (B, 2H, Nq), or None when the implementation returns none."""
    found = (getattr(result, "aux", None) or {}).get("map_lse")
    return None if found is None else np.asarray(found)


def _unnormalised(params: dict, **changes) -> dict:
    return dict(params, apply_norm=False, norm_weight=None, **changes)


def zero_lambda_is_the_first_map(attend, q, k, v, params, rtol=1e-10):
    """With λ = 0 and no norm, differential attention is dense attention of the first map.

    λ is made exactly 0 by ``λ_q2 = λ_q1``, ``λ_k2 = λ_k1`` and ``λ_init = 0``
    (so ``exp(a) − exp(a) + 0``). The map log-sum-exp of query heads ``2h``
    (``aux["map_lse"][:, 0::2]``, when returned) is the first map's lse.
    """
    zero = _unnormalised(params, lambda_q2=params["lambda_q1"], lambda_k2=params["lambda_k1"], lambda_init=0.0, depth=None)
    result, want = attend(q, k, v, **zero), first_map(q, k, v, params)
    close("out", result.out, want.out, rtol)
    if _map_lse(result) is not None:
        close("map_lse of heads 2h", _map_lse(result)[:, 0::2], want.lse, rtol)


def identical_maps_give_one_minus_lambda(attend, q, k, v, params, rtol=1e-10):
    """With the two maps identical (``q_{2h+1} = q_{2h}``, key pairs equal, the
    same mask and bias for both heads of a pair), the un-normalised output is
    ``(1 − λ)`` times dense attention of the first map.

    The property builds the identical maps itself from the problem's even
    heads. Setting ``k_{2j+1} = k_{2j}`` makes the maps' keys equal under both
    ``gqa_keys`` rules: ``(2h)//G`` and ``(2h+1)//G`` differ only when ``G``
    divides the odd ``2h + 1``, and then they are ``2j`` and ``2j + 1``.
    """
    q, k = q.copy(), k.copy()
    q[:, 1::2], k[:, 1::2] = q[:, 0::2], k[:, 0::2]
    same = _unnormalised(params)
    for name in ("mask", "bias"):
        if _per_query_head(params.get(name)):
            paired = np.array(params[name])
            paired[..., 1::2, :, :] = paired[..., 0::2, :, :]
            same[name] = paired
    result, want = attend(q, k, v, **same), first_map(q, k, v, same)
    close("out", result.out, (1.0 - _lambda(params)) * want.out, rtol)


def value_scaling_is_eps_rescaling(attend, q, k, v, params, factor=8.0, rtol=1e-10):
    """Scaling ``v`` by ``c > 0`` equals dividing RMSNorm's ε by ``c²``, exactly:
    ``out(c v; ε) = out(v; ε / c²)``, since RMSNorm(c x; ε) = RMSNorm(x; ε / c²).
    The maps' log-sum-exps (``aux["map_lse"]``) do not change. Needs the norm (``apply_norm``, the default).
    """
    require(params.get("apply_norm", True), "apply_norm=True")
    require(factor > 0, "factor > 0")
    eps = params.get("norm_eps", 1e-5)
    scaled = attend(q, k, factor * v, **params)
    rescaled = attend(q, k, v, **dict(params, norm_eps=eps / factor**2))
    close("out", scaled.out, rescaled.out, rtol)
    if _map_lse(scaled) is not None:
        close("map_lse", _map_lse(scaled), _map_lse(rescaled), rtol)


def value_scaling_invariance(attend, q, k, v, params, factor=8.0, rtol=1e-10):
    """The norm makes the output nearly invariant to scaling ``v`` by ``c > 0``:
    in a row whose un-normalised output has mean square ``m``, the output
    changes by at most the relative amount ``ε · |1 − c⁻²| / m``, the price of ε
    (exactly invariant when ε = 0). Rows with ``m = 0`` (fully masked) stay 0.
    Needs the norm (``apply_norm``, the default).
    """
    require(params.get("apply_norm", True), "apply_norm=True")
    require(factor > 0, "factor > 0")
    eps = params.get("norm_eps", 1e-5)
    base, scaled = attend(q, k, v, **params).out, attend(q, k, factor * v, **params).out
    diff = np.asarray(attend(q, k, v, **_unnormalised(params)).out, np.float64)  # (B, H, Nq, 2D)
    mean_square = np.mean(diff * diff, axis=-1, keepdims=True)  # (B, H, Nq, 1)
    with np.errstate(divide="ignore"):
        relative = np.where(mean_square > 0, eps * abs(1.0 - factor**-2) / mean_square, 0.0)
    change = np.abs(np.asarray(scaled, np.float64) - base)
    allowed = relative * np.abs(base) + rtol * max(float(np.max(np.abs(base), initial=0.0)), 1.0)
    if np.any(change > allowed):
        index = tuple(int(i) for i in np.argwhere(change > allowed)[0])
        raise AssertionError(f"out: scaling v by {factor} changed element {index} by {change[index]:.3e} > {allowed[index]:.3e}")


ALL = (zero_lambda_is_the_first_map, identical_maps_give_one_minus_lambda, value_scaling_is_eps_rescaling,
       value_scaling_invariance)  # fmt: skip
