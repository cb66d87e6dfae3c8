"""The tolerance policy of the conformance vectors, in one place.

An implementation's result ``x`` for an output whose expected value is
``ref`` is compared by its **normwise relative error**

    error(x, ref) = ‖x − ref‖∞ / max(‖ref‖∞, tiny)

(:func:`normwise_error`), except that the log-sum-exp is divided by
``max(‖ref‖∞, 1)`` (:func:`error`): it is a logarithm, so an absolute error
in it is a relative error of the softmax normaliser, and rows whose ``lse``
is near 0 must not turn an ordinary absolute error into a huge relative one.
An output passes when ``error <= budget``. The budgets
are computed once, at export, per case, per output and per precision, and
stored in the manifest, so a consumer in any language only compares:

* **float64**: ``FLOAT64_BUDGET = 1e-10``, or the float64 :func:`floor`
  where that is larger. The reference's own float64 rounding error on the
  small cases is around 1e-15; 1e-10 leaves room for any summation order,
  fused multiply-adds and vendor ``exp``, yet catches every semantic
  mistake, which changes results by far more. The floor, ``4 u (1 + R)``
  with ``u = 2⁻⁵³``, exceeds it only where logits reach about 2·10⁵
  (xPos with a small ``scale_base`` far from position 0): there a kernel
  that recomputes ``exp(s − lse)`` is legitimately off by ``u |s|``. Nor
  does 1e-10 hold for an ill-conditioned output, one that is mostly
  cancellation (a gradient of 1e-13 summed from terms of order 1, which a
  mechanism without a log-sum-exp to scale it by can have): there the
  float64 budget is at least ``c × e_32 × u_64 / u_32``, the float32
  reference error (below) scaled to float64's roundoff, the error a float64
  evaluation that rounds elsewhere makes (:func:`conditioned_float64_budget`).
* **float32, float16, bfloat16**: ``c × e_p + floor``, where ``e_p`` is
  the error of the reference itself evaluated in that precision (the same
  algorithm storing every step in the precision and computing in float32,
  refattn/core/precision.py): the largest over the plain evaluation and
  :data:`ROUNDING_TRIALS` evaluations with randomised rounding, since one
  evaluation's error can be small by luck where a correct kernel that rounds
  elsewhere is not, ``c`` is :data:`C_REFERENCE`, and the floor is
  :data:`FLOOR_ROUNDOFFS` unit roundoffs ``u`` of the precision, plus what
  rounding the logits in another order legitimately adds to the output and,
  for gradients, what a FlashAttention-style backward adds
  (:func:`floor`, :func:`sensitivities`). This is how
  FlashAttention and PyTorch's SDPA tests judge their kernels: against the
  error a straightforward implementation makes in that precision, not
  against a fixed number that is too loose for some inputs and too tight for
  ill-conditioned ones.
* **tie cases** (flag ``EXACT_TIES``, ``Case.exact_ties``) have decisions
  exactly on ties between duplicated tokens. Randomised rounding moves the two
  copies apart and so decides the tie by chance (a routing tie case's float32
  budget came out at 1.8 that way). Their trials instead move the inputs by
  :func:`tie_preserving_inputs`: by a relative amount of at most one unit
  roundoff that is a function of the value itself, so bit-identical inputs stay
  bit-identical and the ties stay ties, and then evaluate plainly in the
  precision. Their ``e_p`` is the largest over the plain evaluation and
  :data:`ROUNDING_TRIALS` such deterministic trials.

Infinities (a fully masked row's log-sum-exp is ``-inf``) must match
exactly: an equal infinity contributes 0 to the error, any other value
there (or an infinity or NaN where the reference is finite) makes the error
infinite. Integer and boolean outputs (bucket ids, memberships) must be
equal: their error is 0 or infinite, and their budget is 0.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..core.precision import PRECISIONS, STORAGE_DTYPES, numerics

#: Budget of a float64 output (larger only where its floor is; see :func:`budget`).
FLOAT64_BUDGET = 1e-10

#: ``c``, the factor on the reference's own error ``e_p``, for every output.
#: A correct kernel rounds at other points and sums in other orders than the
#: reference; its error is of the same size as ``e_p`` but not bounded by it
#: (the largest entry of one evaluation's error against another's). Measured
#: with the Numba kernel on 1500 random dense problems (the distribution of
#: tests/test_dense_numba_agreement.py, value scales up to 30, every option)
#: in float32, the largest factor needed above the floor was 0.8 for ``out``,
#: 2.2 for gradients and 3.3 for ``lse``; 4 covers them all.
C_REFERENCE = 4.0

#: The floor is this many unit roundoffs of the precision (plus a term for
#: gradients, see :func:`floor`). Where the reference's own error happens to
#: vanish (an output that is 0 or exactly a rounded input, such as a fully
#: masked row or a single key), a correct implementation still legitimately
#: rounds at other points than the reference does: its inputs, the softmax
#: normaliser, the final result. Each costs up to one unit roundoff normwise;
#: four covers them with room to spare and stays far below any semantic error.
FLOOR_ROUNDOFFS = 4.0

#: Evaluations with randomised rounding (refattn.core.precision.jittered) whose
#: errors join the plain evaluation's in ``e_p``. With the plain evaluation
#: alone, the Numba kernel needed factors of up to 15 on softcapped gradients
#: in the measurement above, where the plain evaluation's error was small by luck.
ROUNDING_TRIALS = 4

#: Multiplier and increment of the hash that keys a tie case's trial perturbations to values (SplitMix64's).
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

#: Lower precisions that get a budget of the form c × e_p + floor.
LOWER_PRECISIONS = tuple(p for p in PRECISIONS if p != "float64")

#: Smallest denominator of the normwise error (an all-zero reference).
TINY = float(np.finfo(np.float64).tiny)
#: An input whose gradient is below this fraction of the problem's largest gradient has, in exact
#: arithmetic, none: its computed value is rounding noise (:func:`gradient_scales`).
VANISHING_GRADIENT = 1e-6

#: The ceiling on budgets (:func:`ceiling`) allows a reference error ``e_p`` of
#: this many unit roundoffs ``u + u_c``: the committed suite reaches a quarter of
#: it (rope/large_positions' gradients in float32, whose large positions the
#: logit scale does not show), and a budget may move by a factor of 4 between
#: machines (refattn.conformance.export.REEXPORT_BUDGET_RTOL).
CEILING_ROUNDOFFS = 8192.0
#: ... and a sensitivity of this many times ``1 + 2L``: the policy's ``R`` is
#: ``L`` for outputs and ``2L`` plus a small response term for gradients, and
#: the reference's own error grows like ``u_c L`` where logits are large.
CEILING_SENSITIVITY = 8.0


def unit_roundoff(precision: str) -> float:
    """Unit roundoff ``u = eps / 2`` of a precision: 2⁻⁵³, 2⁻²⁴, 2⁻¹¹ (float16), 2⁻⁸ (bfloat16)."""
    return float(ml_dtypes.finfo(STORAGE_DTYPES[precision]).eps) / 2.0


def tie_preserving_inputs(arrays: dict, precision: str, trial: int) -> dict:
    """A tie case's rounding trial: every floating-point array moved by a value-keyed relative amount.

    Each entry ``x`` becomes ``x (1 + u t)`` with ``u`` the unit roundoff of
    ``precision`` and ``t`` in [-1, 1) a hash of ``x``'s float64 bits and of
    ``trial`` (SplitMix64's finaliser). Like randomised rounding, this moves
    each input so that it may round to a neighbouring value; unlike it, equal
    entries move alike, wherever they are, so duplicated tokens stay
    bit-identical and a case's exact ties stay exact. Zeros, infinities and
    integer or boolean arrays are unchanged.
    """
    u = unit_roundoff(precision)
    moved = {}
    for name, x in arrays.items():
        x = np.asarray(x)
        moved[name] = x * (1.0 + u * _value_hash(x, trial)) if x.dtype.kind == "f" else x
    return moved


def _value_hash(x: np.ndarray, trial: int) -> np.ndarray:
    """A number in [-1, 1) for each entry of ``x``, a function of its float64 bits and ``trial`` only."""
    with np.errstate(over="ignore"):
        h = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64) + _GOLDEN_GAMMA * np.uint64(trial + 1)
        h = (h ^ (h >> np.uint64(30))) * _MIX_1
        h = (h ^ (h >> np.uint64(27))) * _MIX_2
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0


def is_log_sum_exp(output: str) -> bool:
    """Whether ``output`` is a log-sum-exp (``lse``, ``aux.slot_lse``...): a logarithm, ``-inf`` where no key is."""
    return output.endswith("lse")


def error(output: str, x, ref, scale: float = TINY) -> float:
    """The error of ``output`` that its budget bounds: :func:`normwise_error`, with the denominator at
    least 1 for a log-sum-exp (:func:`is_log_sum_exp`; an absolute error below magnitude 1) and at
    least ``scale`` otherwise: a gradient part's :func:`gradient_scales`."""
    return normwise_error(x, ref, smallest_denominator=1.0 if is_log_sum_exp(output) else scale)


def gradient_scales(grads: dict) -> dict[str, float]:
    """The denominator of each gradient part's error: the larger norm of the input's two parts.

    ``grads`` maps ``grad_dout.<input>`` and ``grad_dlse.<input>`` to their
    values. One part may vanish where the other does not (with a single key,
    ``dout`` alone moves neither q nor k): its error is then measured against
    the size of the input's gradient, not against zero, which no rounding could meet.
    Where both parts vanish (below :data:`VANISHING_GRADIENT` of the problem's largest
    gradient: with a single key, q and k of a mechanism without ``lse``; U and W of
    normalised low-rank attention over one key), the error is measured against the
    problem's largest gradient.
    """
    largest: dict[str, float] = {}
    for name, value in grads.items():
        input_name = name.split(".", 1)[1]
        largest[input_name] = max(largest.get(input_name, 0.0), float(np.max(np.abs(value), initial=0.0)))
    overall = max(largest.values(), default=0.0)
    scale = {name: overall if size < VANISHING_GRADIENT * overall else size for name, size in largest.items()}
    return {name: max(scale[name.split(".", 1)[1]], TINY) for name in grads}


def normwise_error(x, ref, smallest_denominator: float = TINY) -> float:
    """Normwise relative error ``‖x − ref‖∞ / max(‖ref‖∞, smallest_denominator)``.

    Parameters
    ----------
    x : array_like
        The implementation's result (any real dtype; it is compared in float64).
    ref : array_like
        The expected value, of the same shape.

    Returns
    -------
    float
        0 for empty arrays. For integer or boolean ``ref``: 0 if every value
        equals, else ``inf``. Otherwise the ratio above over the entries
        where ``ref`` is finite, and ``inf`` if ``x`` is NaN anywhere,
        infinite where ``ref`` is finite, or differs from ``ref`` where
        ``ref`` is infinite.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    x, ref = np.asarray(x), np.asarray(ref)
    if x.shape != ref.shape:
        raise ValueError(f"shape {x.shape} differs from the expected {ref.shape}")
    if ref.size == 0:
        return 0.0
    if ref.dtype.kind in "biu":
        return 0.0 if np.array_equal(x, ref) else float("inf")
    x, ref = x.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(ref)
    if np.any(x[~finite] != ref[~finite]) or not np.all(np.isfinite(x[finite])):
        return float("inf")
    if not np.any(finite):
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        numerator = np.max(np.abs(x[finite] - ref[finite]))
    denominator = max(float(np.max(np.abs(ref[finite]))), smallest_denominator)
    return float(numerator / denominator) if np.isfinite(numerator) else float("inf")


def logit_scale(lse) -> float:
    """``L``, the largest finite ``|lse|``: the size of the logits that carry weight.

    An implementation that forms the logits in another order than the
    reference (its own tiling of ``q·k``, the scale folded into ``q``, fused
    multiply-adds, ``exp2`` with ``log2 e`` folded in) rounds each logit ``s``
    differently by about ``u_c |s|``; the weights that matter have ``s`` within
    a few units of the row's ``lse``, so every weight moves by up to ``u_c L``
    relative, and with it the output and the gradients.
    """
    lse = np.asarray(lse, dtype=np.float64)
    finite = lse[np.isfinite(lse)]
    return float(np.max(np.abs(finite))) if finite.size else 0.0


def recomputation_sensitivity(grad: np.ndarray, lse, delta_response: np.ndarray | None, scale: float = TINY) -> float:
    """``R`` of one gradient: how far a FlashAttention-style backward may move it, per unit ``u_c``.

    The reference's backward keeps the softmax weights P it computed. A
    backward that recomputes them from the stored log-sum-exp instead (the
    FlashAttention backward, refattn's Numba kernel) makes two errors the
    reference does not make, and so that its own error cannot show:

    * ``P = exp(s - lse)`` with ``s`` and ``lse`` each rounded, separately:
      every weight that matters is off by a relative ``u_c (|s| + |lse|)``,
      so the gradient by up to ``2 u_c L`` relative (:func:`logit_scale`);
    * ``delta = rowsum(dout * out)`` in place of ``sum_k P dP`` (equal in exact
      arithmetic; in the reference the cancellation ``dP - delta`` is exact when
      a row has a single or one dominant key): ``delta`` is off by about
      ``u_c rowsum(|dout * out|)``, which acts on the gradients exactly as the
      same error in the cotangent ``dlse`` does. ``delta_response`` is that
      gradient: the float64 VJP with ``dout = 0`` and
      ``dlse = rowsum(|dout * out|)``.

    Returns ``2 L + ‖delta_response‖∞ / max(‖grad‖∞, scale)`` (``scale``: the
    gradient part's :func:`gradient_scales`).
    """
    result = 2.0 * logit_scale(lse)
    if delta_response is not None and delta_response.size:
        result += float(np.max(np.abs(delta_response))) / max(float(np.max(np.abs(grad), initial=0.0)), scale)
    return result


def sensitivities(
    vjp, arguments: dict, dout: np.ndarray | None, result, grads: dict, scales: dict | None = None
) -> dict[str, float]:
    """``R`` of the output and of every gradient of one problem: ``{"out": L, "grad_dout.q": R, ...}``.

    Parameters
    ----------
    vjp : callable
        The mechanism's ``vjp(dout, **arguments, dlse=...)``, evaluated in float64.
    arguments : dict
        Every argument of the forward: arrays and keyword parameters.
    dout : ndarray or None
        The cotangent of ``out``; None when the case has no gradients.
    result : Result
        The float64 forward result (``out``, ``lse``).
    grads : dict
        The float64 gradients, keyed by output name ``<part>.<input>``
        (``grad_dout.q``, ``grad_dlse.q``), or by input name for the
        gradient for both cotangents (``q``, reported as ``grad.q``); empty
        without gradients.
    scales : dict, optional
        Their :func:`gradient_scales`, by the same keys (default: tiny).

    Returns
    -------
    dict
        ``out`` gets :func:`logit_scale`, each gradient its
        :func:`recomputation_sensitivity` (the same response for both parts:
        an implementation computes them in one backward). Empty for mechanisms without a
        log-sum-exp of one value per output row (``lse`` of ``out``'s shape
        less its last axis): their outputs get the plain floor.
    """
    if result.lse is None or result.lse.shape != result.out.shape[:-1]:
        return {}
    found = {"out": logit_scale(result.lse)}
    if grads:
        delta_error = np.sum(np.abs(dout * result.out), axis=-1)  # per row, in units of u_c
        response = vjp(np.zeros_like(dout), **arguments, dlse=delta_error)
        for name, grad in grads.items():
            scale = (scales or {}).get(name, TINY)
            output = name if "." in name else f"grad.{name}"
            found[output] = recomputation_sensitivity(grad, result.lse, response[name.split(".")[-1]], scale)
    return found


def floor(output: str, precision: str, sensitivity: float = 0.0) -> float:
    """The rounding floor of an output at a precision: ``4 u + 4 u_c R``.

    ``u`` is the precision's unit roundoff and ``u_c`` that of its compute
    precision (float32 for every lower precision, as in
    refattn.core.precision: kernels keep the softmax statistics in float32).
    ``R`` is the output's sensitivity (:func:`sensitivities`): for mechanisms
    with a log-sum-exp, :func:`logit_scale` for ``out`` and
    :func:`recomputation_sensitivity` for gradients; 0 otherwise. The floor is
    then ``4 u`` plus a few ``u_c`` for ordinary logits, and about ``u_c |s|``
    where the logits ``s`` are large.
    """
    return FLOOR_ROUNDOFFS * (unit_roundoff(precision) + compute_roundoff(precision) * sensitivity)


def compute_roundoff(precision: str) -> float:
    """Unit roundoff of the precision kernels compute in: 2⁻⁵³ for float64, 2⁻²⁴ otherwise."""
    return float(np.finfo(numerics(precision).compute).eps) / 2.0


def budget(output: str, precision: str, reference_error: float, sensitivity: float = 0.0) -> float:
    """The budget of ``output`` at ``precision``: ``c × reference_error + floor``.

    ``reference_error`` is ``error(output, reference at precision, reference
    in float64)`` and ``sensitivity`` the ``R`` of :func:`floor`. For
    float64 the budget is :data:`FLOAT64_BUDGET`, or the floor where that is
    larger (logits of 10⁵ and more), and ``reference_error`` is ignored.
    """
    if precision == "float64":
        return max(FLOAT64_BUDGET, floor(output, precision, sensitivity))
    if not np.isfinite(reference_error):
        raise ValueError(f"{output}: the reference itself is not finite in {precision}; the case needs smaller values")
    return C_REFERENCE * reference_error + floor(output, precision, sensitivity)


def ceiling(output: str, precision: str, logit_scale_of_case: float, exact: bool = False) -> float:
    """The largest budget this policy can give ``output`` at ``precision`` in a case whose ``lse`` reaches ``L``.

    Every budget :func:`budget` makes is ``c e_p + 4u + 4u_c R`` (float64:
    ``max(1e-10, 4u(1 + R))``), with ``R`` about ``2L`` at most and ``e_p``
    some unit roundoffs, more where logits are large. So it is bounded by

        CEILING_ROUNDOFFS × 4(u + u_c) + CEILING_SENSITIVITY × 4u_c(1 + 2L)

    (and by 1e-10 in float64, whichever is larger). A loader refuses a larger
    budget: a suite whose budgets were raised to let a wrong implementation
    pass is not one this policy wrote. For float64 and float32 this ceiling
    is far below 1 unless ``L`` is in the thousands, so an implementation
    returning zeros cannot pass; in float16 and bfloat16 the reference's own
    error can legitimately be tens of percent (cancellation in
    differential attention's λ gradients), and so can the ceiling. Integer
    outputs (``exact``), which must match exactly, have a ceiling of 0; a
    floating-point intermediate (routing's ``aux.slot_lse``) has an output's.
    """
    if exact:
        return 0.0
    sensitivity = FLOOR_ROUNDOFFS * compute_roundoff(precision) * (1.0 + 2.0 * logit_scale_of_case)
    bound = CEILING_ROUNDOFFS * floor(output, precision) + CEILING_SENSITIVITY * sensitivity
    return max(FLOAT64_BUDGET, bound) if precision == "float64" else bound


def budgets(
    output: str, expected: np.ndarray, at_precision: dict[str, list], sensitivity: float = 0.0, scale: float = TINY
) -> dict:
    """Budgets of one output at float64 and at every precision in ``at_precision``.

    Parameters
    ----------
    output : str
        Its name: ``"out"``, ``"lse"``, ``"grad.q"``, ``"aux.buckets"``...
    expected : ndarray
        The float64 (or integer) expected value.
    at_precision : dict
        Precision name -> the reference's results evaluated in that precision:
        the plain evaluation and the jittered ones (an array or a list of arrays).
    sensitivity : float
        ``R`` of the output (:func:`sensitivities`; 0 where it has none).
    scale : float
        The smallest denominator of its error (:func:`error`).

    Returns
    -------
    dict
        ``{"float64": 1e-10, "float32": ..., ...}``; every budget is 0 for
        integer and boolean outputs, which must match exactly.
    """
    precisions = ("float64", *at_precision)
    if expected.dtype.kind in "biu":
        return {p: 0.0 for p in precisions}
    result = {"float64": budget(output, "float64", 0.0, sensitivity)}
    for precision, value in at_precision.items():
        evaluations = value if isinstance(value, list) else [value]
        reference_error = max(error(output, x, expected, scale) for x in evaluations)
        result[precision] = budget(output, precision, reference_error, sensitivity)
        if precision == "float32":
            result["float64"] = max(result["float64"], conditioned_float64_budget(reference_error))
    return result


def conditioned_float64_budget(float32_error: float) -> float:
    """``c × e_32 × u_64 / u_32``: the float32 reference error of an output scaled to float64's roundoff.

    A well-conditioned output has ``e_32`` of a few ``u_32`` and this is a few
    ``u_64``, far below :data:`FLOAT64_BUDGET`; an output that is mostly
    cancellation has a large ``e_32``, and a float64 evaluation that sums in
    another order is off by the same multiple of ``u_64``.
    """
    return C_REFERENCE * float32_error * unit_roundoff("float64") / unit_roundoff("float32")
