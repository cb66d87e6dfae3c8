"""Scalable-Softmax (SSMax) attention: the executable specification.

Nakanishi 2025, "Scalable-Softmax Is Superior for Attention" (arXiv
2501.19399). Softmax over ``n`` entries flattens as ``n`` grows (its largest
weight tends to 0), so SSMax replaces ``softmax(z)`` by

    SSMax(z)_j = n^(s z_j) / Σ_j' n^(s z_j') = softmax((s · log n) · z)_j

with a learned scalar ``s`` per head (and, in the paper's variant with a bias
``b``, the factor ``s · log n + b``; refattn calls that bias ``s_bias``, since
``b`` is the batch letter of the einsum legend). In attention this is
"multiply the query by ``s · log n``" (the paper's section 3), which is how
refattn computes it.

**Which n.** ``n`` is the size of the vector the softmax runs over: for query
row ``i`` that is ``n_i``, the number of keys the row actually attends to
after the user mask, causality and the window (:func:`attended_counts`).
Under a causal mask ``n_i`` grows along the rows (``i + 1`` for ``Nq = Nk``);
with key padding it is the unpadded length of the row's sequence. Many
unofficial implementations use the padded or full key length ``Nk`` (the
size of the score tensor's last axis), or the query length, for every row;
that is a different function whenever a causal, window or padding mask is
present. A dropout keep-mask does not change ``n_i``: dropout acts after the
softmax.

**Where the factor enters.** The factor ``f_i = s_h · log n_i + s_bias_h``
multiplies the *scaled scores* at dense step (1), before the soft-cap and
before any bias:

    s_ij = f_i · scale · q_i · k_j = scale · (f_i q_i) · k_j

so it folds into the query, ``q'_i = f_i q_i``, and everything after is
dense attention on ``q'``, which this module calls rather than repeats. The
user ``bias`` (position biases included) is added after the soft-cap and is
*not* multiplied by ``f_i``.

**Edge cases.** A row with ``n_i = 0`` is fully masked: output 0, lse -inf,
gradient 0, whatever ``f_i`` would be (``log 0`` is never formed; refattn
sets ``f_i = 0`` there). A row with ``n_i = 1`` has ``log 1 = 0``, so its
factor is ``s_bias_h`` alone (0 without it): its output is the single value
it attends to, as for any softmax over one entry, and its lse is
``cap(s_bias_h · scale · q_i · k_j) + bias_ij``.

**Parameters.** ``s`` must be positive: SSMax is the base-``n`` exponential
``n^(s z)``, whose point is that the factor grows with ``n``; ``s = 0``
removes ``n`` altogether (a plain softmax at temperature ``1 / s_bias``) and
``s < 0`` flattens attention faster than softmax does. ``s_bias`` may be any
finite number, so the factor itself may be 0 or negative for small ``n``
(the paper does not constrain it).

Equations and their numbers are in spec/dilution.md (SSMax); the step
numbers below match: (S1)-(S3), then dense attention's steps (1)-(7) of
spec/dense.md.

Einsum letters: b batch, h query head, q query position, d head dim.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...dense import reference as dense_reference
from ...dense.inputs import DenseInputs, check_dense_inputs

# --- checked inputs -----------------------------------------------------------


@dataclass(frozen=True)
class SSMaxInputs:
    """Checked SSMax arguments: the dense ones, and ``s``, ``s_bias`` as given (a number or an (Hq,) array)."""

    dense: DenseInputs
    s: float | np.ndarray  # > 0
    s_bias: float | np.ndarray
    n_rule: str  # "attended" (canonical) or "axis_length"

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: dense attention's."""
        return self.dense.cotangent_shapes()


def per_head_parameter(x, name: str, num_heads: int, *, positive: bool) -> float | np.ndarray:
    """A finite number (the same for every head) or a finite array of shape (Hq,); positive if asked.

    Raises :class:`SpecError` naming ``name`` otherwise. Returns ``x`` itself
    (an array keeps its dtype; it is converted by the caller's precision).
    """
    sign = "positive " if positive else ""
    wanted = f"a finite {sign}number, or an array of shape (Hq,) = ({num_heads},) of them, one per query head"
    if isinstance(x, np.ndarray):
        checks.float_array(x, name)
        if x.shape != (num_heads,):
            raise SpecError(name, wanted, f"shape {x.shape}")
        values = x
    elif isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):
        if not math.isfinite(x):
            raise SpecError(name, wanted, checks.summary(x))
        values = np.asarray(x)
    else:
        raise SpecError(name, wanted, f"{type(x).__name__} {x!r}")
    bad = np.flatnonzero(values.ravel() <= 0) if positive else ()
    if len(bad):
        index = "" if values.ndim == 0 else f"[{bad[0]}]"
        reason = "SSMax is n^(s z): its factor s log n + s_bias must grow with n; s <= 0 is not scalable-softmax"
        raise SpecError(
            name, f"{name} > 0 for every head ({reason})", f"{name}{index} = {float(values.ravel()[bad[0]])!r}"
        )
    return x


#: Values of ``n_rule``: which n the factor's log takes.
N_RULES = ("attended", "axis_length")


def check_ssmax_inputs(q, k, v, *, s, s_bias, n_rule, **dense_arguments) -> SSMaxInputs:
    """Check every argument of :func:`ssmax_attention`; raise :class:`SpecError` on the first bad one.

    ``dense_arguments`` are :func:`refattn.dense_attention`'s keywords, checked by its own check.
    """
    dense = check_dense_inputs(q, k, v, **dense_arguments)
    heads = dense.shape.q_heads
    inputs = SSMaxInputs(
        dense=dense,
        s=per_head_parameter(s, "s", heads, positive=True),
        s_bias=per_head_parameter(s_bias, "s_bias", heads, positive=False),
        n_rule=checks.choice(n_rule, "n_rule", N_RULES),
    )
    # (S3) q' = f_i · q with |f_i| <= max s · log Nk + max |s_bias| (n_i <= Nk).
    checks.scores_within_range(dense.q, dense.k, dense.scale, q_factor=np.max(np.abs(np.asarray(inputs.s, np.float64)))
                               * np.log(dense.shape.kv_len) + np.max(np.abs(np.asarray(inputs.s_bias, np.float64))))  # fmt: skip
    return inputs


# --- the steps ------------------------------------------------------------------


def counts_of(x: DenseInputs) -> np.ndarray:
    """Step (S1): ``n_i``, the number of keys row ``i`` may attend to, (B, Hq, Nq) int64.

    The allowed keys are dense attention's own (:meth:`DenseInputs.allowed`:
    the user mask AND causality AND the window); the keep-mask plays no part.
    """
    allowed = x.allowed()  # broadcastable to (B, Hq, Nq, Nk), or None
    if allowed is None:
        return np.full(x.shape.scores[:3], x.shape.kv_len, dtype=np.int64)
    return np.broadcast_to(allowed, x.shape.scores).sum(axis=-1, dtype=np.int64)


def row_counts(x: SSMaxInputs) -> np.ndarray:
    """Step (S1) by ``x.n_rule``: ``n_i`` (:func:`counts_of`), or ``Nk`` on every row for
    ``"axis_length"`` (the ``ScalableSoftmax`` package's ``x.size(dim)``), (B, Hq, Nq) int64."""
    if x.n_rule == "axis_length":
        return np.full(x.dense.shape.scores[:3], x.dense.shape.kv_len, dtype=np.int64)
    return counts_of(x.dense)


def log_counts(counts: np.ndarray, dtype) -> np.ndarray:
    """``log n_i`` in ``dtype``, with 0 in place of ``log 0`` on fully masked rows (never used there)."""
    return np.log(np.maximum(counts, 1).astype(dtype))


def _as_heads(x, num: Numerics) -> np.ndarray:
    """A per-head parameter as this precision sees it, shaped to broadcast over (B, Hq, Nq)."""
    x = num.load(np.asarray(x, dtype=np.float64))
    return x[:, None] if x.ndim == 1 else x  # (Hq, 1) or ()


def factor_of(x: SSMaxInputs, counts: np.ndarray, num: Numerics) -> np.ndarray:
    """Step (S2): ``f_i = s_h · log n_i + s_bias_h`` (0 where ``n_i = 0``), (B, Hq, Nq), stored in ``num``'s precision."""
    factor = _as_heads(x.s, num) * log_counts(counts, num.compute) + _as_heads(x.s_bias, num)  # (B, Hq, Nq)
    return num.store(np.where(counts > 0, factor, 0.0))


def _scaled_query(factor: np.ndarray, q: np.ndarray, num: Numerics) -> np.ndarray:
    """Step (S3): ``q'_i = f_i · q_i``, (B, Hq, Nq, D)."""
    return num.store(factor[..., None] * num.load(q))


# --- the mechanism ------------------------------------------------------------


def attended_counts(q, k, *, mask=None, causal=False, causal_alignment="bottom_right", window=None) -> np.ndarray:
    """``n_i``: how many keys each query row attends to, the ``n`` of SSMax's ``log n``.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
    mask, causal, causal_alignment, window
        As :func:`refattn.dense_attention`; combined by AND.

    Returns
    -------
    ndarray (B, Hq, Nq), int64
        0 on fully masked rows; ``Nk`` everywhere when nothing is masked.
    """
    x = check_dense_inputs(
        q, k, k, mask=mask, bias=None, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0,
    )  # fmt: skip
    return counts_of(x)


def ssmax_attention(
    q, k, v, *,
    s, s_bias=0.0, n_rule="attended",
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Scalable-Softmax attention: dense attention whose scaled scores of row ``i`` are multiplied by
    ``s_h · log n_i + s_bias_h``, ``n_i`` the number of keys the row attends to.

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
    s : float > 0, or ndarray (Hq,) of them
        The learned slope of each query head. An array is differentiated; a
        number is a constant, the same for every head.
    s_bias : float or ndarray (Hq,)
        The paper's optional bias ``b`` inside the factor, added to
        ``s_h · log n_i``; default 0. Differentiated when an array.
    n_rule : {"attended", "axis_length"}
        ``"attended"`` (the paper's: n is the size of the vector the softmax
        runs over): ``n_i``, the keys row ``i`` attends to. ``"axis_length"``:
        ``Nk`` on every row, masked keys counted, as the ``ScalableSoftmax``
        package (``x.size(dim)``) computes it; ``aux["counts"]`` is then ``Nk``.
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As :func:`refattn.dense_attention`. The masks and the window decide
        ``n_i``; ``bias`` is added after the soft-cap and is not multiplied
        by the factor; the keep-mask does not change ``n_i``.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), float64 (lse of the
        logits with the factor); ``aux["counts"]``, ``n_i`` (B, Hq, Nq) int64.
    """
    return registry.call_forward("ssmax", locals())


def forward(x: SSMaxInputs, num: Numerics) -> Result:
    """The reference backend: steps (S1)-(S3), then dense (1)-(7) on ``q'``, in precision ``num``."""
    # (S1) How many keys each row attends to.
    counts = row_counts(x)  # (B, Hq, Nq)
    # (S2) The row's factor s_h log n_i + s_bias_h.
    factor = factor_of(x, counts, num)  # (B, Hq, Nq)
    # (S3) Folded into the query: scale · q'_i · k_j = f_i · scale · q_i · k_j.
    q_scaled = _scaled_query(factor, x.dense.q, num)  # (B, Hq, Nq, D)
    # Dense (1)-(7) on q'.
    result = dense_reference.forward(replace(x.dense, q=q_scaled), num)
    return Result(out=result.out, lse=result.lse, aux={"counts": counts})


ssmax_attention_vjp = registry.vjp_function(
    ssmax_attention, "ssmax", grads="""    ``q``, ``k``, ``v``; ``s`` and ``s_bias`` (Hq,) when they were given as
    arrays, and ``bias`` (its own shape) when a bias was given. A number
    given for ``s`` or ``s_bias`` is a constant, as ``scale`` is (pass
    ``np.full(Hq, value)`` and sum the gradient for a learned scalar
    shared by every head). The counts are integers: no gradient.""",
)


def vjp(x: SSMaxInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: dense (7')-(1') on ``q'``, then (S3')-(S1'), in precision ``num``."""
    counts = row_counts(x)  # (S1)
    factor = factor_of(x, counts, num)  # (S2)
    q_scaled = _scaled_query(factor, x.dense.q, num)  # (S3)

    # Dense (7')-(1') on q': dq', dk, dv and the bias's gradient.
    dense_grads = dense_reference.vjp(replace(x.dense, q=q_scaled), cotangents, num)
    d_q_scaled = num.load(dense_grads["q"])  # (B, Hq, Nq, D)
    grads = Grads(k=dense_grads["k"], v=dense_grads["v"])
    # (S3') q'_i = f_i q_i: dq_i = f_i dq'_i and df_i = <q_i, dq'_i> (0 on fully masked rows, where dq' = 0).
    grads["q"] = num.store(factor[..., None] * d_q_scaled).astype(np.float64)
    d_factor = num.store(np.einsum("bhqd,bhqd->bhq", num.load(x.dense.q), d_q_scaled, optimize=True))  # (B, Hq, Nq)
    # (S2') f_i = s_h log n_i + s_bias_h: ds_h sums log n_i df_i, ds_bias_h sums df_i, over the batch and the
    #       rows of head h.
    log_n = log_counts(counts, num.compute)  # (B, Hq, Nq)
    if isinstance(x.s, np.ndarray):
        grads["s"] = num.store(np.einsum("bhq,bhq->h", log_n, d_factor)).astype(np.float64)
    if isinstance(x.s_bias, np.ndarray):
        grads["s_bias"] = num.store(d_factor.sum(axis=(0, 2))).astype(np.float64)
    if x.dense.bias is not None:
        grads["bias"] = dense_grads["bias"]
    # (S1') The counts are integers.
    return grads
