"""ALiBi, attention with linear biases: the executable specification.

Press, Smith & Lewis 2022, "Train Short, Test Long: Attention with Linear
Biases Enables Input Length Extrapolation" (ICLR), section 3. No position
embedding is added to the tokens; instead head ``h`` adds a penalty linear in
the distance to every logit,

    z[b, h, i, j] = cap(scale · q_i · k_j) + m_h · (p_j − p_i) + bias[b, h, i, j]

where ``p_i`` and ``p_j`` are the positions of query ``i`` and key ``j`` (given
explicitly, so that cached decoding passes ``p = offset + arange``) and
``m_h`` is the head's slope, by default the authors' geometric sequence
(:func:`alibi_slopes`). Everything after the bias (mask, softmax, dropout,
values) is dense attention, which this module calls rather than repeats.

Two forms of the distance term (``form``):

* ``"causal"``, the paper's: ``m_h · (p_j − p_i)``, i.e. ``−m_h · (p_i − p_j)``;
  under a causal mask every visible key has ``p_j <= p_i`` and the term is a
  penalty. Without a causal mask, keys after the query get a *positive* term.
* ``"symmetric"``: ``−m_h · |p_i − p_j|``, FlashAttention's non-causal ALiBi.

The authors' fairseq code, BLOOM (HF ``build_alibi_tensor``) and
FlashAttention's causal path add ``m_h · p_j`` alone (MPT ``m_h · (p_j − Nk + 1)``).
That differs from the causal form by ``m_h · p_i`` (plus a constant), the same
for every key of a query row: the output, the weights and every gradient are
the same whatever the mask, and the log-sum-exp is larger by exactly
``m_h · p_i``. refattn returns the log-sum-exp of the causal form
(``properties.key_only_shortcut`` states the relation).

Equations and their numbers are in spec/position.md (ALiBi); the step numbers
below match: (A1)-(A3), then dense attention's steps (1)-(7) of spec/dense.md.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics, numerics
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import sum_to_shape
from ...dense import reference as dense_reference
from ...dense.inputs import DenseInputs, check_dense_inputs

FORMS = ("causal", "symmetric")


# --- the encoding -------------------------------------------------------------


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The authors' default slopes ``m_h`` (``get_slopes`` of their fairseq code), float64.

    For ``n`` a power of two, ``m_h = s^(h+1)`` with ``s = 2^(-8/n)``
    (``2^(-2^-(log2 n - 3))`` as the authors write it): ``n = 8`` gives
    1/2, 1/4, ..., 1/256. Otherwise, with ``c`` the largest power of two
    below ``n``, the ``c`` slopes of ``c`` heads come first, followed by every
    other slope of ``2c`` heads (the 1st, 3rd, ...), the first ``n − c`` of
    them. The arithmetic is the authors' (Python floats), so the values are
    bitwise theirs.

    Parameters
    ----------
    num_heads : int >= 1
        Number of query heads ``Hq``.

    Returns
    -------
    ndarray (num_heads,), float64
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise SpecError("num_heads", "an integer >= 1", checks.summary(num_heads))
    n = int(num_heads)
    if n & (n - 1) == 0:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return np.array([start * start**i for i in range(n)])
    closest = 2 ** math.floor(math.log2(n))
    return np.concatenate([alibi_slopes(closest), alibi_slopes(2 * closest)[0::2][: n - closest]])


def alibi_bias(slopes, q_positions, k_positions, form: str = "causal") -> np.ndarray:
    """The ALiBi bias ``m_h · (p_j − p_i)`` (``"causal"``) or ``−m_h · |p_j − p_i|`` (``"symmetric"``).

    Parameters
    ----------
    slopes : ndarray (H,)
        Finite slopes ``m_h``, one per query head.
    q_positions : int ndarray (Nq,)
    k_positions : int ndarray (Nk,)
    form : {"causal", "symmetric"}

    Returns
    -------
    ndarray (H, Nq, Nk), float64
    """
    slopes = _checked_slopes(slopes, None)
    q_positions = checks.positions(q_positions, "q_positions", None)
    k_positions = checks.positions(k_positions, "k_positions", None)
    form = checks.choice(form, "form", FORMS)
    return _position_bias(slopes, signed_distance(q_positions, k_positions, form), numerics(None))


def signed_distance(q_positions: np.ndarray, k_positions: np.ndarray, form: str) -> np.ndarray:
    """Step (A1): ``δ_ij = p_j − p_i`` (``"causal"``) or ``−|p_j − p_i|`` (``"symmetric"``), (Nq, Nk) int64."""
    distance = k_positions[None, :] - q_positions[:, None]  # (Nq, Nk)
    return distance if form == "causal" else -np.abs(distance)


def _position_bias(slopes: np.ndarray, distance: np.ndarray, num: Numerics) -> np.ndarray:
    """Step (A2): ``m_h · δ_ij``, (H, Nq, Nk), stored in ``num``'s precision."""
    return num.store(num.load(slopes)[:, None, None] * distance.astype(num.compute))


# --- checked inputs -----------------------------------------------------------


@dataclass(frozen=True)
class AlibiInputs:
    """Checked arguments of one ``alibi_attention`` call."""

    dense: DenseInputs  # q (B, Hq, Nq, D), k, v and the dense parameters; ``bias`` is the user's
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64
    slopes: np.ndarray  # (Hq,), the caller's dtype
    form: str

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: those of dense attention's ``out`` and ``lse``."""
        return self.dense.cotangent_shapes()


def _checked_slopes(slopes, num_heads: int | None) -> np.ndarray:
    """Finite slopes of shape (num_heads,) (any length when None)."""
    slopes = checks.float_array(slopes, "slopes")
    if slopes.ndim != 1 or (num_heads is not None and slopes.shape[0] != num_heads):
        wanted = "shape (H,)" if num_heads is None else f"shape (Hq,) = ({num_heads},), one slope per query head"
        raise SpecError("slopes", wanted, f"shape {slopes.shape}")
    return slopes


def check_alibi_inputs(q, k, v, *, q_positions, k_positions, slopes, form, **dense_arguments) -> AlibiInputs:
    """Check every argument of ``alibi_attention``; raise :class:`SpecError` on the first bad one.

    ``dense_arguments`` are dense attention's (``mask``, ``bias``, ``causal``, ...), checked by
    :func:`refattn.dense.inputs.check_dense_inputs`.
    """
    dense = check_dense_inputs(q, k, v, **dense_arguments)
    shape = dense.shape
    return AlibiInputs(
        dense=dense,
        q_positions=checks.positions(q_positions, "q_positions", shape.q_len),
        k_positions=checks.positions(k_positions, "k_positions", shape.kv_len),
        slopes=alibi_slopes(shape.q_heads) if slopes is None else _checked_slopes(slopes, shape.q_heads),
        form=checks.choice(form, "form", FORMS),
    )


# --- the mechanism ------------------------------------------------------------


def alibi_attention(
    q, k, v, *,
    q_positions, k_positions, slopes=None, form="causal",
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Attention with linear biases: dense attention whose logits get ``m_h · δ_ij``.

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
    q_positions : int ndarray (Nq,)
        Position of each query in its sequence (required; cached decoding
        passes ``Nk − Nq + arange(Nq)``).
    k_positions : int ndarray (Nk,)
        Position of each key.
    slopes : ndarray (Hq,), optional
        Slope ``m_h`` of each query head; default :func:`alibi_slopes` ``(Hq)``.
        Not differentiated.
    form : {"causal", "symmetric"}
        ``δ_ij = p_j − p_i`` (the paper's) or ``−|p_j − p_i|`` (FlashAttention's non-causal ALiBi).
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As :func:`refattn.dense_attention`. ``bias`` is added to the ALiBi bias;
        masks and causal alignment are by index, as in dense attention.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), float64, the
        log-sum-exp of the logits with the ``form`` bias. ``aux`` is empty.
    """
    return registry.call_forward("alibi", locals())


alibi_attention_vjp = registry.vjp_function(
    alibi_attention, "alibi", grads="""    ``q``, ``k``, ``v``, and ``bias`` (the bias's own shape) when a bias
    was given. Slopes and positions are constants: no gradient.""",
)


def _logits_bias(x: AlibiInputs, num: Numerics) -> np.ndarray:
    """Steps (A1)-(A3): the ALiBi bias plus the user's bias, (Hq, Nq, Nk) or broadcast to (B, Hq, Nq, Nk)."""
    # (A1) Signed distance of every key position from every query position.
    distance = signed_distance(x.q_positions, x.k_positions, x.form)  # (Nq, Nk)
    # (A2) Per-head linear bias m_h · δ_ij.
    position_bias = _position_bias(x.slopes, distance, num)  # (Hq, Nq, Nk)
    # (A3) The user's bias is added to it; both are added to the capped scores in dense step (3).
    if x.dense.bias is None:
        return position_bias
    return num.store(position_bias + num.load(x.dense.bias))


def _with_logits_bias(x: AlibiInputs, num: Numerics) -> DenseInputs:
    """The dense inputs with the summed bias of (A1)-(A3) in place of the user's."""
    return replace(x.dense, bias=_logits_bias(x, num))


def forward(x: AlibiInputs, num: Numerics) -> Result:
    """The reference backend: (A1)-(A3), then dense (1)-(7) with the summed bias, in precision ``num``."""
    return dense_reference.forward(_with_logits_bias(x, num), num)


def vjp(x: AlibiInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: dense (7')-(1'), then (A3'), in precision ``num``."""
    # Dense (7')-(1'): dense attention's VJP gives q, k, v and, at its (3'), the summed bias's gradient.
    dense_grads = dense_reference.vjp(_with_logits_bias(x, num), cotangents, num)
    grads = Grads(q=dense_grads["q"], k=dense_grads["k"], v=dense_grads["v"])
    # (A3') The user's bias gets that gradient, summed over the axes it was broadcast along.
    if x.dense.bias is not None:
        grads["bias"] = sum_to_shape(dense_grads["bias"], x.dense.bias.shape)
    # (A2')-(A1') Slopes and positions are constants.
    return grads
