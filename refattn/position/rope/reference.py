"""Rotary position embedding (RoPE): the executable specification.

Su, Lu, Pan, Murtadha, Wen and Liu 2021, "RoFormer: Enhanced Transformer with
Rotary Position Embedding", eq. (34). Pair ``t`` of the first ``r`` dimensions
of every query and key is rotated by the angle ``θ[n, t]``, proportional to
the token's position ``n``. A rotation by ``θ(n)`` followed by the transpose of
one by ``θ(m)`` is one by ``θ(n) − θ(m) = θ(n − m)``, so the score
``q_n · k_m`` depends on the positions only through ``n − m``.

Which dimensions form a pair is the *layout*:

* ``"half"``: dimension ``t`` pairs with ``t + r/2`` (HF ``rotate_half``,
  GPT-NeoX, every HF Llama-family model);
* ``"interleaved"``: dimension ``2t`` pairs with ``2t + 1`` (the paper,
  GPT-J ``rotate_every_two``, Meta's Llama ``view_as_complex``).

Partial rotary (GPT-NeoX ``rotary_pct``, GPT-J ``rotary_dim``) rotates only the
first ``r = rotary_dim`` of the ``D`` dimensions; the others pass through, and
the frequencies are spaced over ``r``, not ``D``.

Equations and their numbers are in spec/position.md (RoPE); the step numbers
below match: (R1)-(R3) the encoding, then steps (1)-(7) of dense attention
(refattn/dense/reference.py, spec/dense.md) on the rotated q and k.

Array letters: b batch, h head, n position, d head dim, t rotated pair
(``0 <= t < r/2``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import numpy as np

from ...core import checks, registry
from ...core.checks import choice, float_array, real_number
from ...core.errors import SpecError
from ...core.precision import FLOAT64, Numerics, numerics
from ...core.results import Cotangents, Grads, Result
from ...dense import reference as dense_reference
from ...dense.inputs import DenseInputs, check_dense_inputs

#: How the rotated dimensions are paired (module docstring).
LAYOUTS = ("half", "interleaved")


# --------------------------------------------------------------------------
# Checked parameters.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeParams:
    """Checked RoPE parameters: ``rotary_dim`` even in [2, D], ``base`` > 0, ``position_scale`` > 0."""

    rotary_dim: int
    base: float
    position_scale: float
    layout: str


@dataclass(frozen=True)
class RopeInputs:
    """Checked inputs of one ``rope_attention`` call."""

    dense: DenseInputs  # q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v and the dense parameters
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64
    rope: RopeParams

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: those of dense attention's ``out`` and ``lse``."""
        return self.dense.cotangent_shapes()


def check_rotary_dim(rotary_dim, head_dim: int | None) -> int:
    """``rotary_dim``: an even int in [2, D]; None means D (which must then be even)."""
    if rotary_dim is None and head_dim is not None:
        if head_dim % 2:
            raise SpecError("rotary_dim", f"an even number of rotated dims; the head dim {head_dim} is odd, "
                            "so give rotary_dim <= it explicitly", "None")  # fmt: skip
        return head_dim
    bound = "" if head_dim is None else f" and at most the head dim {head_dim}"
    expected = f"an even int >= 2{bound}"
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral):
        raise SpecError("rotary_dim", expected, checks.summary(rotary_dim))
    if rotary_dim < 2 or rotary_dim % 2 or (head_dim is not None and rotary_dim > head_dim):
        raise SpecError("rotary_dim", expected, checks.summary(rotary_dim))
    return int(rotary_dim)


def check_rope_params(rotary_dim, base, position_scale, layout, head_dim: int | None) -> RopeParams:
    """Check the RoPE parameters for vectors of ``head_dim`` dims (None: ``rotary_dim`` is required)."""
    return RopeParams(
        rotary_dim=check_rotary_dim(rotary_dim, head_dim),
        base=real_number(base, "base", minimum=0.0, inclusive=False),
        position_scale=real_number(position_scale, "position_scale", minimum=0.0, inclusive=False),
        layout=choice(layout, "layout", LAYOUTS),
    )


def check_vectors(x, name: str) -> np.ndarray:
    """``x``: a finite real (B, H, N, D) array."""
    if isinstance(x, np.ndarray) and x.ndim != 4:
        raise SpecError(name, "4 dimensions (B, H, N, D)", f"shape {x.shape}")
    return float_array(x, name)


def check_rope_inputs(q, k, v, *, q_positions, k_positions, rotary_dim, base, position_scale, layout,
                      **dense_arguments) -> RopeInputs:  # fmt: skip
    """Check every argument of ``rope_attention``; raise :class:`SpecError` on the first bad one.

    ``dense_arguments`` are dense attention's (``mask``, ``bias``, ``causal``, ...), checked by
    :func:`refattn.dense.inputs.check_dense_inputs`.
    """
    dense = check_dense_inputs(q, k, v, **dense_arguments)
    return RopeInputs(
        dense=dense,
        q_positions=checks.positions(q_positions, "q_positions", dense.shape.q_len),
        k_positions=checks.positions(k_positions, "k_positions", dense.shape.kv_len),
        rope=check_rope_params(rotary_dim, base, position_scale, layout, dense.shape.head_dim),
    )


# --------------------------------------------------------------------------
# The encoding: steps (R1)-(R3).
# --------------------------------------------------------------------------


def pair_indices(rotary_dim: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """The dims ``(first[t], second[t])`` that pair ``t`` rotates, each (r/2,).

    ``"half"``: ``(t, t + r/2)``; ``"interleaved"``: ``(2t, 2t + 1)``. The two
    layouts are one permutation apart (spec/position.md): with ``P`` gathering
    the even then the odd rotated dims, ``interleaved(x) = P⁻¹ half(P x)``.
    """
    pairs = np.arange(rotary_dim // 2)
    if layout == "half":
        return pairs, pairs + rotary_dim // 2
    return 2 * pairs, 2 * pairs + 1


def frequencies(rotary_dim: int, base: float, num: Numerics = FLOAT64) -> np.ndarray:
    """(R1) ``ω_t = base^(−2t / r)``, t = 0 .. r/2 − 1: (r/2,), in ``num``'s compute dtype."""
    exponents = np.arange(0, rotary_dim, 2) / rotary_dim  # 2t / r
    return (base**-exponents).astype(num.compute)


def angles(positions: np.ndarray, rope: RopeParams, num: Numerics = FLOAT64) -> np.ndarray:
    """(R2) ``θ[n, t] = (positions[n] / position_scale) · ω_t``: (N, r/2), in the compute dtype.

    The angles are formed in the compute dtype, never rounded to a narrower
    storage dtype: that is how implementations form them (HF computes
    ``inv_freq`` and the angles in float32 whatever the model's dtype), and
    a position in the thousands rounded to bfloat16 would be off by many
    radians.
    """
    scaled = (positions / rope.position_scale).astype(num.compute)  # (N,)
    return scaled[:, None] * frequencies(rope.rotary_dim, rope.base, num)[None, :]


def cos_sin(positions: np.ndarray, rope: RopeParams, num: Numerics) -> tuple[np.ndarray, np.ndarray]:
    """(R2) cos θ and sin θ, (N, r/2) each, computed in the compute dtype and stored."""
    theta = angles(positions, rope, num)
    return num.store(np.cos(theta)), num.store(np.sin(theta))


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rotary_dim: int, layout: str,
           num: Numerics = FLOAT64) -> np.ndarray:  # fmt: skip
    """(R3) Rotate pair t of each vector at position n by the angle with cosine ``cos[n, t]``
    and sine ``sin[n, t]``; the dims from ``rotary_dim`` on pass through unchanged.

    ``x`` is (B, H, N, D) in the compute dtype and ``cos``, ``sin`` are (N, r/2).
    With ``-sin`` this is the transposed (inverse) rotation ``R(θ)ᵀ = R(−θ)``.
    """
    first, second = pair_indices(rotary_dim, layout)
    x_first, x_second = x[..., first], x[..., second]  # (B, H, N, r/2) each
    out = x.copy()  # (B, H, N, D); dims >= r stay as they are
    out[..., first] = num.store(x_first * cos - x_second * sin)
    out[..., second] = num.store(x_second * cos + x_first * sin)
    return out


def rope_angles(positions, rotary_dim, *, base=10000.0, position_scale=1.0) -> np.ndarray:
    """The rotation angles ``θ[n, t] = (positions[n] / position_scale) · base^(−2t / rotary_dim)``.

    Parameters
    ----------
    positions : int ndarray (N,)
        Token positions.
    rotary_dim : int
        ``r``, the number of rotated dims: even, at least 2.
    base : float > 0
        ``base`` of the frequencies (HF ``rope_theta``; 10000, or 500000 in Llama 3).
    position_scale : float > 0
        Linear position scaling (position interpolation, HF ``rope_scaling``
        ``{"type": "linear", "factor": position_scale}``): positions are divided by it.

    Returns
    -------
    ndarray (N, rotary_dim // 2), float64
    """
    rope = check_rope_params(rotary_dim, base, position_scale, "half", None)
    return angles(checks.positions(positions, "positions", None), rope)


def apply_rope(x, positions, *, rotary_dim=None, base=10000.0, position_scale=1.0, layout="half",
               precision=None) -> np.ndarray:  # fmt: skip
    """Rotate the first ``rotary_dim`` dims of every vector of ``x`` by its position's angles.

    Parameters
    ----------
    x : ndarray (B, H, N, D)
        Queries or keys.
    positions : int ndarray (N,)
        Position of each of the N vectors.
    rotary_dim : int, optional
        Rotated dims, even, in [2, D]; default D (which must then be even).
    base, position_scale
        As :func:`rope_angles`.
    layout : {"half", "interleaved"}
        Pairs ``(t, t + r/2)`` (HF, GPT-NeoX) or ``(2t, 2t + 1)`` (paper, GPT-J, Meta).
    precision : {None, "float64", "float32", "float16", "bfloat16"} or Numerics
        Evaluate in that precision (refattn.core.precision).

    Returns
    -------
    ndarray (B, H, N, D), float64
        Dims ``rotary_dim ..`` are those of ``x``.
    """
    x = check_vectors(x, "x")
    positions = checks.positions(positions, "positions", x.shape[2])
    rope = check_rope_params(rotary_dim, base, position_scale, layout, x.shape[3])
    num = numerics(precision)
    cos, sin = cos_sin(positions, rope, num)
    return rotate(num.load(x), cos, sin, rope.rotary_dim, rope.layout, num).astype(np.float64)


# --------------------------------------------------------------------------
# The mechanism: RoPE, then dense attention.
# --------------------------------------------------------------------------


def rope_attention(
    q, k, v, *,
    q_positions, k_positions, rotary_dim=None, base=10000.0, position_scale=1.0, layout="half",
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Attention over queries and keys rotated by RoPE: ``dense(R(θ_q) q, R(θ_k) k, v)``.

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
    q_positions : int ndarray (Nq,)
        Position of each query (required; for cached decoding ``Nk − Nq + arange(Nq)``).
    k_positions : int ndarray (Nk,)
        Position of each key.
    rotary_dim, base, position_scale, layout
        As :func:`apply_rope`.
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As :func:`refattn.dense.reference.dense_attention`. Masks, causality
        and windows stay index-based; ``scale`` defaults to ``1/sqrt(D)``, D
        the full head dim.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), float64, as dense attention.
    """
    return registry.call_forward("rope", locals())


rope_attention_vjp = registry.vjp_function(
    rope_attention, "rope", grads="""    ``q``, ``k``, ``v`` and, when a bias was given, ``bias`` (its own shape).
    Dense attention's VJP gives the gradients of the rotated q and k; each is
    rotated back by the transposed rotation ``R(θ)ᵀ = R(−θ)`` (the rotation is
    orthogonal and linear in q, k). Positions are integers: no gradient.""",
)


def _rotated(x: RopeInputs, num: Numerics) -> tuple[DenseInputs, tuple]:
    """(R1)-(R3) for q and k: the dense inputs with q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) rotated,
    and the tables (cos, sin) of the queries and of the keys, (N, r/2) each."""
    r, layout = x.rope.rotary_dim, x.rope.layout
    q_cos, q_sin = cos_sin(x.q_positions, x.rope, num)  # (Nq, r/2)
    k_cos, k_sin = cos_sin(x.k_positions, x.rope, num)  # (Nk, r/2)
    q_rotated = rotate(num.load(x.dense.q), q_cos, q_sin, r, layout, num)
    k_rotated = rotate(num.load(x.dense.k), k_cos, k_sin, r, layout, num)
    return replace(x.dense, q=q_rotated, k=k_rotated), ((q_cos, q_sin), (k_cos, k_sin))


def forward(x: RopeInputs, num: Numerics) -> Result:
    """The reference backend: (R1)-(R3), then dense (1)-(7) on the rotated q and k, in precision ``num``."""
    rotated, _ = _rotated(x, num)
    return dense_reference.forward(rotated, num)


def vjp(x: RopeInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: dense (7')-(1') on the rotated q and k, then (R3'), in precision ``num``."""
    rotated, ((q_cos, q_sin), (k_cos, k_sin)) = _rotated(x, num)
    # (7')-(1') Dense attention's VJP: gradients of the rotated q and k, of v and the bias.
    grads = dense_reference.vjp(rotated, cotangents, num)
    # (R3') q~ = R(θ) q, so dq = R(θ)ᵀ dq~ = R(−θ) dq~: cos is even, sin odd. Likewise k, per kv head.
    r, layout = x.rope.rotary_dim, x.rope.layout
    grads["q"] = rotate(num.load(grads["q"]), q_cos, -q_sin, r, layout, num).astype(np.float64)
    grads["k"] = rotate(num.load(grads["k"]), k_cos, -k_sin, r, layout, num).astype(np.float64)
    return grads
