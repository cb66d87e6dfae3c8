"""T5's bucketed relative position bias: the executable specification.

Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer" (JMLR), section 2.1: every head adds a learned
scalar to each logit, looked up by the *bucket* of the relative position
``r = p_j − p_i`` (key position minus query position, "memory minus query"):

    z[b, h, i, j] = cap(scale · q_i · k_j) + table[bucket(p_j − p_i), h] + bias[b, h, i, j]

Distances below ``max_exact`` get a bucket each; longer ones share
logarithmically wider buckets up to ``max_distance``, and every distance
beyond shares the last one. A bidirectional (encoder) bias gives keys after
the query their own half of the buckets; a unidirectional (decoder) bias
sends every key after the query to bucket 0.

The bucket function is exactly HF transformers'
``T5Attention._relative_position_bucket`` (itself Mesh TensorFlow's), which
computes its logarithmic branch in float32 and truncates toward zero. The
float32 rounding decides the bucket at distances where the exact value is an
integer (with 20 buckets and max_distance 160, distances 10, 20 and 80:
float32 gives one bucket more than float64), so :func:`relative_position_bucket`
evaluates that branch in float32, one correctly rounded operation at a time.

T5 itself uses ``scale = 1`` (its initialisation absorbs 1/sqrt(D)); refattn
keeps dense attention's default ``1/sqrt(D)``: pass ``scale=1.0`` for T5.
Everything after the bias (mask, softmax, dropout, values) is dense
attention, which this module calls rather than repeats.

Equations and their numbers are in spec/position.md (T5 bias); the step
numbers below match: (T1)-(T4), with the bucket function's (B1)-(B4), then dense
attention's steps (1)-(7) of spec/dense.md.
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



# --- the bucket function ------------------------------------------------------


@dataclass(frozen=True)
class Bucketing:
    """Checked bucket parameters and the sizes derived from them.

    ``side_buckets`` is the number of buckets for one direction: ``num_buckets``
    (unidirectional) or half of it (bidirectional); ``max_exact`` of them hold
    one distance each.
    """

    bidirectional: bool
    num_buckets: int
    max_distance: int

    @property
    def side_buckets(self) -> int:
        return self.num_buckets // 2 if self.bidirectional else self.num_buckets

    @property
    def max_exact(self) -> int:
        return self.side_buckets // 2


def check_bucketing(bidirectional, num_buckets, max_distance) -> Bucketing:
    """Check the bucket parameters; raise :class:`SpecError` for the ones HF's code mishandles.

    * ``num_buckets`` at least 2, and when bidirectional even and at least 4:
      HF halves it with ``//``, so an odd count leaves the table's last row
      unused, and 2 leaves no exact bucket (``max_exact = 0``, a division by 0).
    * ``max_distance > max_exact``: HF divides by ``log(max_distance / max_exact)``,
      which is 0 (infinite buckets) or negative (buckets that shrink with
      distance, or negative indices) otherwise.
    """
    bidirectional = checks.flag(bidirectional, "bidirectional")
    smallest = 4 if bidirectional else 2
    if not _is_int(num_buckets) or num_buckets < smallest or (bidirectional and num_buckets % 2):
        wanted = "an even integer >= 4 (bidirectional)" if bidirectional else "an integer >= 2"
        raise SpecError("num_buckets", wanted, checks.summary(num_buckets))
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if not _is_int(max_distance) or max_distance <= max_exact:
        wanted = f"an integer > max_exact = {max_exact} (the distances with a bucket each)"
        raise SpecError("max_distance", wanted, checks.summary(max_distance))
    return Bucketing(bidirectional, int(num_buckets), int(max_distance))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128) -> np.ndarray:
    """T5's bucket of each relative position ``r = p_j − p_i``, exactly as HF transformers computes it.

    Steps (B1)-(B4) of spec/position.md:

    * (B1) direction: bidirectional, ``r > 0`` (key after the query) adds
      ``num_buckets / 2`` and the distance is ``n = |r|``; unidirectional,
      ``n = max(−r, 0)`` (every key after the query has distance 0);
    * (B2) ``n < max_exact``: the bucket is ``n``;
    * (B3) otherwise ``max_exact + trunc(log(n / max_exact) / log(max_distance / max_exact)
      · (side_buckets − max_exact))`` in float32, as HF's ``relative_position.float()``;
    * (B4) at most ``side_buckets − 1``: every ``n >= max_distance`` shares the last bucket.

    Parameters
    ----------
    relative_position : int ndarray, any shape
        Key position minus query position.
    bidirectional : bool
        Encoder (True) or decoder (False) bucketing.
    num_buckets : int
        Rows of the bias table.
    max_distance : int
        Distance from which every relative position shares the last bucket of its side.

    Returns
    -------
    int64 ndarray, the shape of ``relative_position``, values in ``[0, num_buckets)``
    """
    if not isinstance(relative_position, np.ndarray):
        raise SpecError("relative_position", "an integer numpy array", type(relative_position).__name__)
    if relative_position.dtype.kind not in "iu":
        raise SpecError("relative_position", "an integer numpy array", f"dtype {relative_position.dtype}")
    return _buckets(relative_position.astype(np.int64), check_bucketing(bidirectional, num_buckets, max_distance))


def _buckets(relative_position: np.ndarray, bucketing: Bucketing) -> np.ndarray:
    """Steps (B1)-(B4) on checked input (int64 relative positions)."""
    # (B1) Direction: which half of the buckets, and the distance n >= 0.
    if bucketing.bidirectional:
        side = np.where(relative_position > 0, bucketing.side_buckets, 0)
        distance = np.abs(relative_position)
    else:
        side = np.zeros_like(relative_position)
        distance = np.maximum(-relative_position, 0)
    # (B2) Short distances have a bucket each.
    max_exact = bucketing.max_exact
    is_small = distance < max_exact
    # (B3) Longer ones share logarithmic buckets (only evaluated where n >= max_exact, so log(0) never appears).
    log_bucket = max_exact + _log_bucket_offset(np.where(is_small, max_exact, distance), bucketing)
    # (B4) Saturation: every distance from max_distance on shares the side's last bucket.
    log_bucket = np.minimum(log_bucket, bucketing.side_buckets - 1)
    return side + np.where(is_small, distance, log_bucket)


def _log_bucket_offset(distance: np.ndarray, bucketing: Bucketing) -> np.ndarray:
    """``trunc(log(n / max_exact) / log(max_distance / max_exact) · (side_buckets − max_exact))`` for n >= max_exact.

    Evaluated as HF evaluates it, one float32 operation at a time, each
    correctly rounded: the distance is converted to float32 (``.float()``),
    divided by ``max_exact``, its log taken, divided by the float32 rounding of
    the Python constant ``math.log(max_distance / max_exact)`` and multiplied
    by ``side_buckets − max_exact``; ``.to(torch.long)`` truncates toward zero.

    The log is taken in float64 and rounded to float32, which is the correctly
    rounded float32 log (checked against an 80-bit log for every ratio
    ``n / m``, n < 2**20, m <= 128). PyTorch's CPU ``log`` (SLEEF, within one
    unit in the last place) agrees with it at every distance of the tested
    configurations; see spec/position.md for the rare ones where it does not.
    """
    f32 = np.float32
    ratio = distance.astype(f32) / f32(bucketing.max_exact)  # (...) float32, >= 1
    log_ratio = np.log(ratio.astype(np.float64)).astype(f32)
    log_range = f32(math.log(bucketing.max_distance / bucketing.max_exact))
    scaled = log_ratio / log_range * f32(bucketing.side_buckets - bucketing.max_exact)
    return scaled.astype(np.int64)  # truncation toward zero (scaled >= 0)


# --- the bias -----------------------------------------------------------------



def check_table(table, bucketing: Bucketing, num_heads: int | None) -> np.ndarray:
    """A finite (num_buckets, H) table (HF's ``nn.Embedding(num_buckets, n_heads).weight``)."""
    table = checks.float_array(table, "table")
    heads = "H" if num_heads is None else f"Hq = {num_heads}"
    wanted = f"shape (num_buckets, {heads}) with num_buckets = {bucketing.num_buckets}"
    if table.ndim != 2 or table.shape[0] != bucketing.num_buckets:
        raise SpecError("table", wanted, f"shape {table.shape}")
    if num_heads is not None and table.shape[1] != num_heads:
        raise SpecError("table", wanted, f"shape {table.shape}")
    return table


def bucket_matrix(q_positions: np.ndarray, k_positions: np.ndarray, bucketing: Bucketing) -> np.ndarray:
    """Steps (T1)-(T2): ``bucket(p_j − p_i)`` for every query and key, (Nq, Nk) int64."""
    # (T1) Relative position: key (memory) position minus query position.
    relative_position = k_positions[None, :] - q_positions[:, None]  # (Nq, Nk)
    # (T2) Its bucket, (B1)-(B4).
    return _buckets(relative_position, bucketing)


def t5_bias(table, q_positions, k_positions, *, bidirectional=True, num_buckets=32, max_distance=128) -> np.ndarray:
    """The T5 bias ``table[bucket(p_j − p_i), h]``.

    Parameters
    ----------
    table : ndarray (num_buckets, H)
        One learned scalar per bucket and head.
    q_positions : int ndarray (Nq,)
    k_positions : int ndarray (Nk,)
    bidirectional, num_buckets, max_distance
        As :func:`relative_position_bucket`.

    Returns
    -------
    ndarray (H, Nq, Nk), float64
    """
    bucketing = check_bucketing(bidirectional, num_buckets, max_distance)
    table = check_table(table, bucketing, None)
    buckets = bucket_matrix(
        checks.positions(q_positions, "q_positions", None), checks.positions(k_positions, "k_positions", None), bucketing
    )
    return _gather(numerics(None).load(table), buckets)


def _gather(table: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """Step (T3): ``bias[h, i, j] = table[buckets[i, j], h]``, (H, Nq, Nk)."""
    return np.moveaxis(table[buckets], -1, 0)


# --- checked inputs -----------------------------------------------------------


@dataclass(frozen=True)
class T5Inputs:
    """Checked arguments of one ``t5_attention`` call."""

    dense: DenseInputs  # q (B, Hq, Nq, D), k, v and the dense parameters; ``bias`` is the user's
    table: np.ndarray  # (num_buckets, Hq), the caller's dtype
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64
    bucketing: Bucketing

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: those of dense attention's ``out`` and ``lse``."""
        return self.dense.cotangent_shapes()


def check_t5_inputs(q, k, v, *, table, q_positions, k_positions, bidirectional, num_buckets, max_distance,
                    **dense_arguments) -> T5Inputs:  # fmt: skip
    """Check every argument of ``t5_attention``; raise :class:`SpecError` on the first bad one.

    ``dense_arguments`` are dense attention's (``mask``, ``bias``, ``causal``, ...), checked by
    :func:`refattn.dense.inputs.check_dense_inputs`.
    """
    dense = check_dense_inputs(q, k, v, **dense_arguments)
    bucketing = check_bucketing(bidirectional, num_buckets, max_distance)
    return T5Inputs(
        dense=dense,
        table=check_table(table, bucketing, dense.shape.q_heads),
        q_positions=checks.positions(q_positions, "q_positions", dense.shape.q_len),
        k_positions=checks.positions(k_positions, "k_positions", dense.shape.kv_len),
        bucketing=bucketing,
    )


# --- the mechanism ------------------------------------------------------------


def t5_attention(
    q, k, v, *,
    table, q_positions, k_positions, bidirectional=True, num_buckets=32, max_distance=128,
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Dense attention whose logits get T5's learned bias ``table[bucket(p_j − p_i), h]``.

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
    table : ndarray (num_buckets, Hq)
        The learned bias of each bucket and query head (HF's
        ``relative_attention_bias.weight``). Differentiable.
    q_positions : int ndarray (Nq,)
        Position of each query (required; cached decoding passes ``Nk − Nq + arange(Nq)``).
    k_positions : int ndarray (Nk,)
        Position of each key.
    bidirectional : bool
        Encoder bucketing (True, keys after the query get their own buckets) or decoder (False).
    num_buckets : int
        Rows of ``table``; even and >= 4 when bidirectional, >= 2 otherwise.
    max_distance : int
        Distances from here on share the last bucket; more than ``max_exact``.
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As :func:`refattn.dense_attention`. ``bias`` is added to the T5 bias.
        T5 uses ``scale=1.0``; the default stays ``1/sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv), ``lse`` (B, Hq, Nq), float64, and
        ``aux["buckets"]``, the (Nq, Nk) int64 bucket of every (query, key).
    """
    return registry.call_forward("t5", locals())


t5_attention_vjp = registry.vjp_function(
    t5_attention, "t5", grads="""    ``q``, ``k``, ``v``, ``table`` (num_buckets, Hq): the bias gradient summed
    over the batch and over every (query, key) pair in each bucket, and
    ``bias`` (its own shape) when a bias was given. Buckets are held fixed.""",
)


def _logits_bias(x: T5Inputs, buckets: np.ndarray, num: Numerics) -> np.ndarray:
    """Steps (T3)-(T4): the table's bias plus the user's bias, (Hq, Nq, Nk) or broadcast to (B, Hq, Nq, Nk)."""
    # (T3) Gather each head's learned scalar for the bucket of every (query, key) pair.
    position_bias = _gather(num.load(x.table), buckets)  # (Hq, Nq, Nk)
    # (T4) The user's bias is added to it; both are added to the capped scores in dense step (3).
    if x.dense.bias is None:
        return position_bias
    return num.store(position_bias + num.load(x.dense.bias))


def forward(x: T5Inputs, num: Numerics) -> Result:
    """The reference backend: (T1)-(T4), then dense (1)-(7) with the summed bias, in precision ``num``."""
    buckets = bucket_matrix(x.q_positions, x.k_positions, x.bucketing)  # (Nq, Nk)
    result = dense_reference.forward(replace(x.dense, bias=_logits_bias(x, buckets, num)), num)
    return Result(out=result.out, lse=result.lse, aux={"buckets": buckets})


def vjp(x: T5Inputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: dense (7')-(1'), then (T4')-(T3'), in precision ``num``."""
    buckets = bucket_matrix(x.q_positions, x.k_positions, x.bucketing)  # (Nq, Nk)
    logits_bias = _logits_bias(x, buckets, num)
    # Dense (7')-(1'): dense attention's VJP gives q, k, v and, at its (3'), the summed bias's gradient.
    dense_grads = dense_reference.vjp(replace(x.dense, bias=logits_bias), cotangents, num)
    d_logits_bias = dense_grads["bias"].astype(num.compute)  # shape of logits_bias
    grads = Grads(q=dense_grads["q"], k=dense_grads["k"], v=dense_grads["v"])
    # (T4') The user's bias gets that gradient, summed over the axes it was broadcast along.
    if x.dense.bias is not None:
        grads["bias"] = sum_to_shape(dense_grads["bias"], x.dense.bias.shape)
    # (T3') The adjoint of the gather is a scatter-add: each (query, key) pair adds its
    #      gradient, summed over the batch, to its bucket's row of the table.
    d_position_bias = num.store(sum_to_shape(d_logits_bias, logits_bias.shape[-3:]))  # (Hq, Nq, Nk)
    d_table = np.zeros((x.bucketing.num_buckets, x.dense.shape.q_heads), dtype=num.compute)
    np.add.at(d_table, buckets, np.moveaxis(d_position_bias, 0, -1))
    grads["table"] = num.store(d_table).astype(np.float64)
    # (T2')-(T1') Buckets and positions are discrete: no gradient.
    return grads
