"""xPos, the length-extrapolatable rotary embedding: the executable specification.

Sun, Dong, Patra, Ma, Huang, Benhaim, Chaudhary, Song and Wei 2022, "A
Length-Extrapolatable Transformer", eq. (3)-(5); their code is
``XPOS`` in microsoft/torchscale (``xpos_relative_position.py``). xPos is RoPE
(refattn/position/rope/reference.py) with pair ``t`` of a query at position
``n`` also multiplied by ``ζ_t^(n / scale_base)`` and of a key at position
``m`` by ``ζ_t^(−m / scale_base)``, where

    ζ_t = (2t / r + γ) / (1 + γ),   t = 0 .. r/2 − 1,   0 < ζ_t < 1.

Pair ``t`` of the score ``q_n · k_m`` is then multiplied by
``ζ_t^((n − m) / scale_base)``: it still depends on the positions only through
``n − m``, and for ``n > m`` (keys in the past) it decays with the distance,
fastest for the high-frequency pairs (small ``t``).

Positions are explicit. torchscale centres them implicitly, and
differently for the scaling and the rotation (spec/position.md, "How the implementations
lay these out", note 7); passing centred positions here reproduces its scaling, and
its attention output is reproduced with or without centring, since the scores
depend only on ``n − m``.

Equations and their numbers are in spec/position.md (xPos); the step numbers
below match: (R1)-(R3) as RoPE, (X1)-(X3) the scaling, then steps (1)-(7) of
dense attention on the transformed q and k.

Array letters: b batch, h head, n position, d head dim, t rotated pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import registry
from ...core import checks
from ...core.checks import cotangent, flag, real_number
from ...core.errors import SpecError
from ...core.precision import FLOAT64, Numerics, numerics
from ...core.results import Grads, Result
from ...dense.inputs import DenseInputs, check_dense_inputs
from ...dense.reference import dense_attention, dense_attention_vjp
from ..rope.reference import (
    RopeParams,
    check_rope_params,
    check_vectors,
    cos_sin,
    pair_indices,
    rotate,
)

#: ``|n| / scale_base · |log ζ_0|`` above this makes ``ζ_0^(∓n / scale_base)``
#: overflow (or underflow to 0) in float64; such positions are rejected.
MAX_LOG_SCALE = 700.0


# --------------------------------------------------------------------------
# Checked parameters.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class XposParams:
    """Checked xPos parameters: the rotation's, plus ``scale_base`` > 0 and ``gamma`` > 0."""

    rope: RopeParams  # rotary_dim, base, layout; position_scale is 1
    scale_base: float
    gamma: float


@dataclass(frozen=True)
class XposInputs:
    """Checked inputs of one ``xpos_attention`` call."""

    dense: DenseInputs  # q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v and the dense parameters
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64
    xpos: XposParams


def check_xpos_params(rotary_dim, base, scale_base, gamma, layout, head_dim: int | None) -> XposParams:
    """Check the xPos parameters for vectors of ``head_dim`` dims (None: ``rotary_dim`` is required)."""
    return XposParams(
        rope=check_rope_params(rotary_dim, base, 1.0, layout, head_dim),
        scale_base=real_number(scale_base, "scale_base", minimum=0.0, inclusive=False),
        gamma=real_number(gamma, "gamma", minimum=0.0, inclusive=False),
    )


def check_scaled_positions(positions: np.ndarray, name: str, xpos: XposParams) -> np.ndarray:
    """``positions``, checked to keep every scale ``ζ_t^(±n / scale_base)`` finite and non-zero in float64."""
    if positions.size == 0:
        return positions
    decay = -float(np.log(decay_rates(xpos.rope.rotary_dim, xpos.gamma)[0]))  # |log ζ_0|, ζ_0 the smallest ζ
    largest = int(np.max(np.abs(positions)))
    if largest / xpos.scale_base * decay > MAX_LOG_SCALE:
        limit = int(MAX_LOG_SCALE * xpos.scale_base / decay)
        raise SpecError(name, f"|positions| <= {limit}, so that ζ^(±n / scale_base) stays finite and non-zero "
                        "(centre the positions, as torchscale does)", f"|position| {largest}")  # fmt: skip
    return positions


def check_xpos_inputs(q, k, v, *, q_positions, k_positions, rotary_dim, base, scale_base, gamma, layout,
                      **dense_params) -> XposInputs:  # fmt: skip
    """Check every argument of ``xpos_attention``; raise :class:`SpecError` on the first bad one."""
    dense = check_dense_inputs(q, k, v, **dense_params)
    q_positions = checks.positions(q_positions, "q_positions", dense.shape.q_len)
    k_positions = checks.positions(k_positions, "k_positions", dense.shape.kv_len)
    xpos = check_xpos_params(rotary_dim, base, scale_base, gamma, layout, dense.shape.head_dim)
    return XposInputs(
        dense=dense,
        q_positions=check_scaled_positions(q_positions, "q_positions", xpos),
        k_positions=check_scaled_positions(k_positions, "k_positions", xpos),
        xpos=xpos,
    )


# --------------------------------------------------------------------------
# The encoding: (R1)-(R3) as RoPE, then (X1)-(X3).
# --------------------------------------------------------------------------


def decay_rates(rotary_dim: int, gamma: float, num: Numerics = FLOAT64) -> np.ndarray:
    """(X1) ``ζ_t = (2t / r + γ) / (1 + γ)``, t = 0 .. r/2 − 1: (r/2,), in the compute dtype.

    torchscale's buffer ``(arange(0, D, 2) + 0.4 D) / (1.4 D)`` is this with ``γ = 0.4`` and ``r = D``.
    """
    return ((np.arange(0, rotary_dim, 2) / rotary_dim + gamma) / (1.0 + gamma)).astype(num.compute)


def scales(positions: np.ndarray, xpos: XposParams, downscale: bool, num: Numerics = FLOAT64) -> np.ndarray:
    """(X2) ``ζ_t^(±positions[n] / scale_base)``: (N, r/2); the exponent is negative when ``downscale`` (keys)."""
    sign = -1.0 if downscale else 1.0
    exponents = (sign * positions / xpos.scale_base).astype(num.compute)  # (N,)
    return num.store(decay_rates(xpos.rope.rotary_dim, xpos.gamma, num)[None, :] ** exponents[:, None])


def scale_pairs(x: np.ndarray, factors: np.ndarray, rope: RopeParams, num: Numerics = FLOAT64) -> np.ndarray:
    """(X3) Multiply both dims of pair t of each vector at position n by ``factors[n, t]``;
    dims from ``rotary_dim`` on pass through. ``x`` (B, H, N, D), ``factors`` (N, r/2)."""
    first, second = pair_indices(rope.rotary_dim, rope.layout)
    out = x.copy()  # (B, H, N, D)
    out[..., first] = num.store(x[..., first] * factors)
    out[..., second] = num.store(x[..., second] * factors)
    return out


def xpos_scales(positions, rotary_dim, *, downscale=False, scale_base=512.0, gamma=0.4) -> np.ndarray:
    """The xPos factors ``ζ_t^(±positions[n] / scale_base)``, ``ζ_t = (2t / r + γ) / (1 + γ)``.

    Parameters
    ----------
    positions : int ndarray (N,)
    rotary_dim : int
        ``r``: even, at least 2.
    downscale : bool
        False for queries (exponent ``+n / scale_base``), True for keys (``−n / scale_base``).
    scale_base : float > 0
        torchscale ``xpos_scale_base``, lucidrains ``xpos_scale_base`` (512 in both).
    gamma : float > 0
        γ of ``ζ_t`` (0.4 in the paper and both implementations).

    Returns
    -------
    ndarray (N, rotary_dim // 2), float64
    """
    xpos = check_xpos_params(rotary_dim, 10000.0, scale_base, gamma, "interleaved", None)
    positions = check_scaled_positions(checks.positions(positions, "positions", None), "positions", xpos)
    return scales(positions, xpos, flag(downscale, "downscale"))


def apply_xpos(x, positions, *, downscale=False, rotary_dim=None, base=10000.0, scale_base=512.0, gamma=0.4,
               layout="interleaved", precision=None) -> np.ndarray:  # fmt: skip
    """``ζ^(±n / scale_base) ⊙ R(θ_n) x_n`` for every vector ``x_n`` of ``x``.

    Parameters
    ----------
    x : ndarray (B, H, N, D)
        Queries (``downscale=False``) or keys (``downscale=True``).
    positions : int ndarray (N,)
    downscale : bool
        False: queries, scaled by ``ζ^(+n / scale_base)``; True: keys, by ``ζ^(−n / scale_base)``.
    rotary_dim : int, optional
        Rotated and scaled dims, even, in [2, D]; default D.
    base : float > 0
        Frequency base of the rotation (10000 in torchscale).
    scale_base, gamma
        As :func:`xpos_scales`.
    layout : {"interleaved", "half"}
        Which dims form a pair; torchscale and lucidrains use ``"interleaved"``.
    precision : {None, "float64", "float32", "float16", "bfloat16"} or Numerics

    Returns
    -------
    ndarray (B, H, N, D), float64
    """
    x = check_vectors(x, "x")
    positions = checks.positions(positions, "positions", x.shape[2])
    xpos = check_xpos_params(rotary_dim, base, scale_base, gamma, layout, x.shape[3])
    positions = check_scaled_positions(positions, "positions", xpos)
    num = numerics(precision)
    return _transform(num.load(x), positions, xpos, flag(downscale, "downscale"), num)[0].astype(np.float64)


def _transform(x: np.ndarray, positions: np.ndarray, xpos: XposParams, downscale: bool, num: Numerics):
    """(R1)-(R3), (X1)-(X3) on ``x`` (B, H, N, D): the result and its tables (cos, sin, factors)."""
    rope = xpos.rope
    cos, sin = cos_sin(positions, rope, num)  # (N, r/2) each
    factors = scales(positions, xpos, downscale, num)  # (N, r/2)
    rotated = rotate(x, cos, sin, rope.rotary_dim, rope.layout, num)  # (B, H, N, D)
    return scale_pairs(rotated, factors, rope, num), (cos, sin, factors)


def _transform_transposed(g: np.ndarray, tables, rope: RopeParams, num: Numerics) -> np.ndarray:
    """(X3'), (R3') The transpose of :func:`_transform` applied to a cotangent ``g`` (B, H, N, D):
    scaling is diagonal (its own transpose), then ``R(θ)ᵀ = R(−θ)``."""
    cos, sin, factors = tables
    return rotate(scale_pairs(g, factors, rope, num), cos, -sin, rope.rotary_dim, rope.layout, num)


# --------------------------------------------------------------------------
# The mechanism: xPos, then dense attention.
# --------------------------------------------------------------------------


def xpos_attention(
    q,
    k,
    v,
    *,
    q_positions,
    k_positions,
    rotary_dim=None,
    base=10000.0,
    scale_base=512.0,
    gamma=0.4,
    layout="interleaved",
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    dropout_keep=None,
    dropout_p=0.0,
    precision=None,
    backend="reference",
) -> Result:
    """Attention over xPos-transformed queries (upscaled) and keys (downscaled).

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
    v : ndarray (B, Hkv, Nk, Dv)
    q_positions : int ndarray (Nq,)
        Position of each query (required; for cached decoding ``Nk − Nq + arange(Nq)``).
    k_positions : int ndarray (Nk,)
    rotary_dim, base, scale_base, gamma, layout
        As :func:`apply_xpos`.
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As :func:`refattn.dense.reference.dense_attention`; ``scale`` defaults to ``1/sqrt(D)``.
    precision : {None, "float64", "float32", "float16", "bfloat16"} or Numerics
    backend : {"reference", "numba"}

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), float64.
    """
    params = dict(
        q_positions=q_positions, k_positions=k_positions, rotary_dim=rotary_dim, base=base,
        scale_base=scale_base, gamma=gamma, layout=layout, mask=mask, bias=bias, causal=causal,
        causal_alignment=causal_alignment, window=window, scale=scale, softcap=softcap,
        dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    if backend != "reference":
        return _other_backend(backend, precision).xpos_attention(q, k, v, **params)
    x = check_xpos_inputs(q, k, v, **params)
    num = numerics(precision)
    (q_transformed, _), (k_transformed, _) = _transformed_queries_and_keys(x, num)
    return dense_attention(q_transformed, k_transformed, x.dense.v, **_dense_params(params), precision=num)


def _transformed_queries_and_keys(x: XposInputs, num: Numerics):
    """Queries upscaled at their positions, keys downscaled at theirs, each with its tables."""
    queries = _transform(num.load(x.dense.q), x.q_positions, x.xpos, False, num)  # (B, Hq, Nq, D)
    keys = _transform(num.load(x.dense.k), x.k_positions, x.xpos, True, num)  # (B, Hkv, Nk, D)
    return queries, keys


def xpos_attention_vjp(
    dout,
    q,
    k,
    v,
    *,
    dlse=None,
    q_positions,
    k_positions,
    rotary_dim=None,
    base=10000.0,
    scale_base=512.0,
    gamma=0.4,
    layout="interleaved",
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    dropout_keep=None,
    dropout_p=0.0,
    precision=None,
    backend="reference",
) -> Grads:
    """Gradients of :func:`xpos_attention` for cotangents ``dout`` (and ``dlse``).

    The transform of q is ``q~ = S R q`` with ``S`` the diagonal scaling and
    ``R`` the rotation, so ``dq = Rᵀ S dq~`` (likewise k, with its own
    ``S``). Positions, ``gamma`` and ``scale_base`` get no gradient.

    Parameters are those of :func:`xpos_attention`, plus ``dout`` (B, Hq, Nq, Dv)
    and ``dlse`` (B, Hq, Nq, optional).

    Returns
    -------
    Grads
        ``q``, ``k``, ``v`` and, when a bias was given, ``bias``, float64.
    """
    params = dict(
        q_positions=q_positions, k_positions=k_positions, rotary_dim=rotary_dim, base=base,
        scale_base=scale_base, gamma=gamma, layout=layout, mask=mask, bias=bias, causal=causal,
        causal_alignment=causal_alignment, window=window, scale=scale, softcap=softcap,
        dropout_keep=dropout_keep, dropout_p=dropout_p,
    )  # fmt: skip
    if backend != "reference":
        return _other_backend(backend, precision).xpos_attention_vjp(dout, q, k, v, dlse=dlse, **params)
    x = check_xpos_inputs(q, k, v, **params)
    s = x.dense.shape
    dout = cotangent(dout, "dout", (s.batch, s.q_heads, s.q_len, s.value_dim))
    dlse = None if dlse is None else cotangent(dlse, "dlse", (s.batch, s.q_heads, s.q_len))
    num = numerics(precision)
    (q_transformed, q_tables), (k_transformed, k_tables) = _transformed_queries_and_keys(x, num)

    # (7')-(1') Dense attention's VJP: gradients of the transformed q and k, of v and the bias.
    grads = dense_attention_vjp(dout, q_transformed, k_transformed, x.dense.v, dlse=dlse, **_dense_params(params),
                                precision=num)  # fmt: skip
    # (X3'), (R3') dq = Rᵀ S dq~; dk likewise with the keys' tables, per kv head.
    grads["q"] = _transform_transposed(num.load(grads["q"]), q_tables, x.xpos.rope, num).astype(np.float64)
    grads["k"] = _transform_transposed(num.load(grads["k"]), k_tables, x.xpos.rope, num).astype(np.float64)
    return grads


def _dense_params(params: dict) -> dict:
    """The keyword arguments of dense attention among ``params``."""
    xpos_only = ("q_positions", "k_positions", "rotary_dim", "base", "scale_base", "gamma", "layout")
    return {name: value for name, value in params.items() if name not in xpos_only}


def _other_backend(backend: str, precision):
    if precision is not None:
        raise SpecError("precision", "None with a non-reference backend (kernels compute in their input dtype)", repr(precision))
    return registry.backend("xpos", backend)
