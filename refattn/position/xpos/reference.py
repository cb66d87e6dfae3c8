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

from dataclasses import dataclass, replace

import numpy as np

from ...core import checks, registry
from ...core.checks import flag, real_number
from ...core.errors import SpecError
from ...core.precision import FLOAT64, Numerics, numerics
from ...core.results import Cotangents, Grads, Result
from ...dense import reference as dense_reference
from ...dense.inputs import DenseInputs, check_dense_inputs
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

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: those of dense attention's ``out`` and ``lse``."""
        return self.dense.cotangent_shapes()


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
                      **dense_arguments) -> XposInputs:  # fmt: skip
    """Check every argument of ``xpos_attention``; raise :class:`SpecError` on the first bad one.

    ``dense_arguments`` are dense attention's (``mask``, ``bias``, ``causal``, ...), checked by
    :func:`refattn.dense.inputs.check_dense_inputs`.
    """
    dense = check_dense_inputs(q, k, v, **dense_arguments)
    q_positions = checks.positions(q_positions, "q_positions", dense.shape.q_len)
    k_positions = checks.positions(k_positions, "k_positions", dense.shape.kv_len)
    xpos = check_xpos_params(rotary_dim, base, scale_base, gamma, layout, dense.shape.head_dim)
    inputs = XposInputs(
        dense=dense,
        q_positions=check_scaled_positions(q_positions, "q_positions", xpos),
        k_positions=check_scaled_positions(k_positions, "k_positions", xpos),
        xpos=xpos,
    )
    # (X3) lengthens a vector by at most its largest factor (unrotated dims: 1); the rotation keeps norms.
    checks.scores_within_range(
        dense.q, dense.k, dense.scale, "q, k, q_positions, k_positions",
        q_factor=np.max(scales(q_positions, xpos, False), axis=1, initial=1.0),
        k_factor=np.max(scales(k_positions, xpos, True), axis=1, initial=1.0),
    )  # fmt: skip
    return inputs


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
    xpos = check_xpos_params(rotary_dim, 10000.0, scale_base, gamma, "half", None)  # the layout plays no part
    positions = check_scaled_positions(checks.positions(positions, "positions", None), "positions", xpos)
    return scales(positions, xpos, flag(downscale, "downscale"))


def apply_xpos(x, positions, *, downscale=False, rotary_dim=None, base=10000.0, scale_base=512.0, gamma=0.4,
               layout="half", precision=None) -> np.ndarray:  # fmt: skip
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
    layout : {"half", "interleaved"}
        Which dims form a pair, as for :func:`refattn.position.rope.apply_rope` (and with
        its default); torchscale and lucidrains use ``"interleaved"``: pass it explicitly.
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
    q, k, v, *,
    q_positions, k_positions, rotary_dim=None, base=10000.0, scale_base=512.0, gamma=0.4, layout="half",
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Attention over xPos-transformed queries (upscaled) and keys (downscaled).

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
    q_positions : int ndarray (Nq,)
        Position of each query (required; for cached decoding ``Nk − Nq + arange(Nq)``).
    k_positions : int ndarray (Nk,)
    rotary_dim, base, scale_base, gamma, layout
        As :func:`apply_xpos`.
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As :func:`refattn.dense.reference.dense_attention`; ``scale`` defaults to ``1/sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), float64.
    """
    return registry.call_forward("xpos", locals())


xpos_attention_vjp = registry.vjp_function(
    xpos_attention, "xpos", grads="""    ``q``, ``k``, ``v`` and, when a bias was given, ``bias`` (its own shape).
    The transform of q is ``q~ = S R q`` with ``S`` the diagonal scaling and
    ``R`` the rotation, so ``dq = Rᵀ S dq~`` (likewise k, with its own ``S``).
    Positions, ``gamma`` and ``scale_base`` get no gradient.""",
)


def _transformed(x: XposInputs, num: Numerics) -> tuple[DenseInputs, tuple]:
    """The dense inputs with the queries upscaled and rotated at their positions and the keys
    downscaled and rotated at theirs, and the tables of each (cos, sin, factors)."""
    q_transformed, q_tables = _transform(num.load(x.dense.q), x.q_positions, x.xpos, False, num)  # (B, Hq, Nq, D)
    k_transformed, k_tables = _transform(num.load(x.dense.k), x.k_positions, x.xpos, True, num)  # (B, Hkv, Nk, D)
    return replace(x.dense, q=q_transformed, k=k_transformed), (q_tables, k_tables)


def forward(x: XposInputs, num: Numerics) -> Result:
    """The reference backend: (R1)-(R3), (X1)-(X3), then dense (1)-(7), in precision ``num``."""
    transformed, _ = _transformed(x, num)
    return dense_reference.forward(transformed, num)


def vjp(x: XposInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: dense (7')-(1') on the transformed q and k, then (X3'), (R3')."""
    transformed, (q_tables, k_tables) = _transformed(x, num)
    # (7')-(1') Dense attention's VJP: gradients of the transformed q and k, of v and the bias.
    grads = dense_reference.vjp(transformed, cotangents, num)
    # (X3'), (R3') dq = Rᵀ S dq~; dk likewise with the keys' tables, per kv head.
    grads["q"] = _transform_transposed(num.load(grads["q"]), q_tables, x.xpos.rope, num).astype(np.float64)
    grads["k"] = _transform_transposed(num.load(grads["k"]), k_tables, x.xpos.rope, num).astype(np.float64)
    return grads
