"""Dense attention on CPU: tiled online-softmax kernels in Numba.

The same function as :mod:`refattn.dense.reference`, with the same names,
parameters and step numbers (1)-(7), computed the way FlashAttention does it
(Dao et al. 2022, "FlashAttention"; Dao 2023, "FlashAttention-2"), written
plainly: no score-sized array is ever allocated. Queries are cut into blocks
of ``BLOCK_Q`` rows, keys into blocks of ``BLOCK_K``; a (BLOCK_K, BLOCK_Q)
tile of scores is the largest thing that exists, so memory is O(N), never
O(Nq * Nk). A mask, bias or keep-mask is read where it lies, in its own
shape, through strides that are 0 along the axes it is broadcast along (see
``_flat``); a full (Nq, Nk) one is read one tile at a time.

Position biases that depend only on the distance ``d = k_pos[j] - q_pos[i]``
and the head (ALiBi, T5) come through a hook,
:func:`attention_with_distance_bias`: a table (Hq, Nd) with one bias per
head and distance, read inside each tile at step (3), so even a bias that
differs for every (i, j) costs O(Nq + Nk) memory, not O(Nq * Nk).

Forward: the online softmax
---------------------------
For each query row ``i`` keep a running maximum ``m``, a running sum ``l`` and
an unnormalised output ``acc`` (starting at -inf, 0, 0). For each key tile,
with logits ``s_j`` (steps (1)-(4): scale, soft-cap, bias, mask)::

    m_new = max(m, max_j s_j)
    alpha = exp(m - m_new)              # rescales what was summed under the old max
    p_j   = exp(s_j - m_new)
    l     = alpha * l + sum_j p_j                   # (5)
    acc   = alpha * acc + sum_j p_j * z_j * v_j     # (6), (7)
    m     = m_new

and after the last tile ``out = acc / l`` and ``lse = m + log l``, which is
exactly softmax-then-dropout-then-``· v`` (``z_j = keep_j / (1 - p)``, or 1
without dropout; ``l`` sums the weights *before* dropout, as the reference's
softmax does). A row that has seen no allowed key has ``m = -inf``; it is
shifted by 0 instead of by ``m_new`` so that ``-inf - (-inf)`` = NaN is never
formed (exp(-inf) = 0 removes masked keys exactly). A row whose every key is
masked ends with ``l = 0``: its output is 0 and its lse is -inf.

Backward (FlashAttention-2)
---------------------------
With ``P = exp(s - lse)`` recomputed tile by tile from the forward's lse, and
``delta_i = sum_j P_ij dW_ij = dout_i · out_i`` computed once::

    dW_ij     = z_ij * (dout_i · v_j)                          (7'), (6')
    dS_ij     = P_ij * (dW_ij - delta_i) + P_ij * dlse_i       (5')
    dbias     = dS summed over the axes the bias was broadcast along  (3')
    dtable[h, d] = sum of dS[b, h, i, j] over b and k_pos[j] - q_pos[i] = d  (3')
    dscore_ij = dS_ij * sech^2(s_ij / c)                        (2')  soft-cap
    dq_i = scale * sum_j dscore_ij k_j,  dk_j = scale * sum_i dscore_ij q_i,
    dv_j = sum_i P_ij z_ij dout_i                              (1'), (7')

Two kernels, neither with atomics: ``_dq_kernel`` runs in parallel over
(batch, query head, query block) and sweeps key tiles, accumulating dq;
``_dkv_kernel`` runs in parallel over (batch, kv head, key block) and sweeps
the query heads of its GQA group and their query tiles, accumulating dk, dv
(already summed over the group), dbias and, one slice per thread, dtable.
The VJP takes no saved state, so it first runs the forward kernel again for
``out`` and ``lse``. Fully masked rows have lse = -inf; the kernels use
+inf in its place so that their ``P`` is exactly 0 and every gradient they
feed is 0.

Tiles and bounds
----------------
Causal masks and windows bound the keys a query block can see (and the
queries a key block is seen by); tiles outside the bounds are skipped, so
causal attention costs about half. Inside a tile the bounds are applied per
row as an interval of columns. Equivalently to refattn/core/masks.py, with
the aligned query position ``i' = i + offset``, key ``j`` is allowed iff
``i' - left <= j <= i' + right``, where causal sets ``right <= 0`` and an
unbounded side is given as a distance larger than any sequence.

Precision: float64 inputs run in float64; float32, float16 and bfloat16
inputs run in float32 (tiles, running statistics and accumulators alike, as
FlashAttention keeps its softmax statistics in float32). ``exp`` is a
Cody-Waite range reduction and a Taylor polynomial (``_exp_nonpositive``),
accurate to about an ulp, because a loop calling the C library's ``exp``
cannot be vectorised; it flushes results below the smallest normal number
(exp(-87) in float32) to 0, far below any tolerance next to the exp(0) = 1
that every row's maximum contributes. Kernels compile on first call (``cache=True`` keeps
them between sessions); importing this module compiles nothing.

Tile layout: the forward and dq kernels hold score tiles key-major, (BLOCK_K,
BLOCK_Q), so that each query's running statistics update along contiguous
rows (a loop Numba vectorises without reassociating sums); the dk/dv kernel
holds them query-major, (BLOCK_Q, BLOCK_K), for the same reason. The tile
products (``k qᵀ``, ``vᵀ p``, ...) are ``np.dot`` on tiles, i.e. the BLAS
that SciPy ships; a 64 x 64 x 64 product is below OpenBLAS's threading
threshold, so each runs on the calling Numba thread. (With head dims above
64 OpenBLAS may start its own threads inside Numba's; set
``OPENBLAS_NUM_THREADS=1`` then.) Hand-written product loops reached about
half this speed: without ``fastmath`` LLVM keeps the accumulator tile in
memory.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from ..core import checks
from ..core.checks import cotangent, float_array
from ..core.errors import SpecError
from ..core.masks import query_offset
from ..core.results import Cotangents, Grads, Result
from ..core.tiles import compute_dtype, exp_nonpositive, frozen
from .inputs import DenseInputs, check_dense_inputs

BLOCK_Q = 64  # query rows per tile
BLOCK_K = 64  # key rows per tile

_compute_dtype = compute_dtype  # TRANSITIONAL
_exp_nonpositive = exp_nonpositive  # TRANSITIONAL
_frozen = frozen  # TRANSITIONAL


# --------------------------------------------------------------------------
# The backend: forward and VJP over checked inputs (refattn/core/registry.py).
# --------------------------------------------------------------------------


def forward(x: DenseInputs) -> Result:
    """Steps (1)-(7), tiled: ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) in the compute dtype
    (float32 for float32/float16/bfloat16 ``q``, float64 otherwise)."""
    args = _KernelArgs.build(x, _compute_dtype(x.q), (x.q, x.k, x.v))
    out, lse = _run_forward(args)
    return Result(out=out, lse=lse, aux={})


def vjp(x: DenseInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (7')-(1'), tiled: ``q``, ``k``, ``v`` and (with a bias) ``bias`` in its own shape, in the compute dtype.

    ``saved``, this backend's forward of the same inputs, spares running the forward again.
    """
    args = _KernelArgs.build(x, _compute_dtype(x.q), (x.q, x.k, x.v))
    grads, _ = _run_vjp(args, x, cotangents.dout, cotangents.dlse, saved)
    return grads


# --------------------------------------------------------------------------
# The distance-bias hook, for position encodings (refattn/position/).
#
# ALiBi and T5 add to each logit a bias that depends only on the query head
# and the distance d = k_positions[j] - q_positions[i]. The caller gives one
# row of biases per head over every distance that occurs, a table
# (Hq, Nd) whose column 0 is the distance ``d_min``; step (3) reads
# ``distance_table[h, d - d_min]`` inside each tile, so the (Nq, Nk) bias
# never exists. For contiguous positions Nd = Nq + Nk - 1: O(N) memory.
# --------------------------------------------------------------------------

#: A distance table may hold at most this many distances per query and key
#: (``distance_range`` refuses positions spread wider), but never fewer than
#: ``MIN_DISTANCE_SPAN_LIMIT``: the table replaces an (Nq, Nk) bias, and
#: positions scattered far apart would make it larger than what it replaces.
DISTANCE_SPAN_FACTOR = 16
MIN_DISTANCE_SPAN_LIMIT = 1 << 16


def distance_range(q_positions, k_positions) -> tuple[int, int]:
    """The distances a distance table must cover for these positions.

    Parameters
    ----------
    q_positions : int ndarray (Nq,)
    k_positions : int ndarray (Nk,)

    Returns
    -------
    d_min, n_distances : int
        ``d_min = min(k_positions) - max(q_positions)`` and ``n_distances =
        max(k_positions) - min(q_positions) - d_min + 1``: every distance
        ``k_positions[j] - q_positions[i]`` lies in ``[d_min, d_min +
        n_distances)``. Contiguous positions give ``n_distances = Nq + Nk - 1``.

    Raises
    ------
    SpecError
        If a position array is not a non-empty 1-D integer array, or if
        ``n_distances`` exceeds ``max(DISTANCE_SPAN_FACTOR * (Nq + Nk),
        MIN_DISTANCE_SPAN_LIMIT)``.
    """
    q_positions = checks.positions(q_positions, "q_positions", None)
    k_positions = checks.positions(k_positions, "k_positions", None)
    d_min = int(k_positions.min()) - int(q_positions.max())
    n_distances = int(k_positions.max()) - int(q_positions.min()) - d_min + 1
    limit = max(DISTANCE_SPAN_FACTOR * (q_positions.size + k_positions.size), MIN_DISTANCE_SPAN_LIMIT)
    if n_distances > limit:
        raise SpecError(
            "k_positions",
            f"positions spanning at most {limit} distances k - q together with q_positions "
            f"({DISTANCE_SPAN_FACTOR} per position; the kernel holds one bias per distance)",
            f"{n_distances} distances, from {d_min} to {d_min + n_distances - 1}",
        )
    return d_min, n_distances


def attention_with_distance_bias(
    x: DenseInputs, *, distance_table, d_min: int, q_positions, k_positions
) -> Result:
    """:func:`forward` with a position bias given per head and distance.

    The logits of step (3) are ``capped + (position_bias + bias)`` with
    ``position_bias[b, h, i, j] = distance_table[h, k_positions[j] -
    q_positions[i] - d_min]``, read tile by tile; masks, causality and
    windows stay index-based, as in :func:`forward`.

    Parameters
    ----------
    x : DenseInputs
        The checked dense arguments (q, k, v, mask, bias, causal, ...).
    distance_table : float ndarray (Hq, Nd)
        The bias of query head ``h`` at distance ``d_min + n`` is
        ``distance_table[h, n]``; it must cover every distance that occurs
        (see :func:`distance_range`).
    d_min : int
        The distance of column 0.
    q_positions : int ndarray (Nq,)
    k_positions : int ndarray (Nk,)
        The positions of the queries and keys.
    """
    dtype = _compute_dtype(x.q)
    distance = _DistanceBias.build(distance_table, d_min, q_positions, k_positions, x.shape, dtype)
    args = _KernelArgs.build(x, dtype, (x.q, x.k, x.v), distance)
    out, lse = _run_forward(args)
    return Result(out=out, lse=lse, aux={})


def attention_with_distance_bias_vjp(
    x: DenseInputs, cotangents: Cotangents, *, distance_table, d_min: int, q_positions, k_positions
) -> tuple[Grads, np.ndarray]:
    """Gradients of :func:`attention_with_distance_bias` for checked ``cotangents``.

    Returns
    -------
    grads : Grads
        As :func:`vjp`.
    d_distance_table : float64 ndarray (Hq, Nd)
        ``d_distance_table[h, n] = sum over b and over the (i, j) with
        k_positions[j] - q_positions[i] = d_min + n of dS[b, h, i, j]``, the
        gradient of the logits (3'). Accumulated in float64 whatever the
        compute dtype, because each entry sums up to B * Nq terms.
    """
    dtype = _compute_dtype(x.q)
    distance = _DistanceBias.build(distance_table, d_min, q_positions, k_positions, x.shape, dtype)
    args = _KernelArgs.build(x, dtype, (x.q, x.k, x.v), distance)
    return _run_vjp(args, x, cotangents.dout, cotangents.dlse)


# --------------------------------------------------------------------------
# What the kernels are given.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _DistanceBias:
    """The distance-bias hook, checked: the table in the compute dtype and the
    positions as int64, all read-only (see the hook's section above)."""

    table: np.ndarray  # (Hq, Nd)
    d_min: int
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64

    @staticmethod
    def build(distance_table, d_min, q_positions, k_positions, shape, dtype: np.dtype) -> "_DistanceBias":
        """Check the hook's arguments against the call's ``shape`` (an AttentionShape)."""
        q_positions = checks.positions(q_positions, "q_positions", shape.q_len)
        k_positions = checks.positions(k_positions, "k_positions", shape.kv_len)
        if isinstance(d_min, bool) or not isinstance(d_min, numbers.Integral):
            raise SpecError("d_min", "an int, the distance of the table's column 0", repr(d_min))
        table = float_array(distance_table, "distance_table")
        if table.ndim != 2 or table.shape[0] != shape.q_heads:
            raise SpecError("distance_table", f"shape (Hq, Nd) with Hq = {shape.q_heads}", f"shape {table.shape}")
        lowest = int(k_positions.min()) - int(q_positions.max())
        highest = int(k_positions.max()) - int(q_positions.min())
        if d_min > lowest or d_min + table.shape[1] - 1 < highest:
            raise SpecError(
                "distance_table",
                f"a column for every distance k_positions[j] - q_positions[i], {lowest} to {highest}",
                f"{table.shape[1]} columns from d_min = {d_min}",
            )
        return _DistanceBias(_read_only(table, table, dtype), int(d_min), _frozen(q_positions), _frozen(k_positions))


@dataclass(frozen=True)
class _KernelArgs:
    """Checked inputs in the form the kernels take them.

    ``mask``, ``bias`` and ``keep`` are each a read-only flat array holding
    the argument in its own shape, and the element strides by which
    (b, h, i, j) of the (B, Hq, Nq, Nk) broadcast reaches into it -- 0 on the
    axes it is broadcast along, as ``np.broadcast_to`` would make them. Nothing
    is copied to score size. An absent one is a single element with its
    ``has_*`` flag False; so is an absent distance bias (a 1 x 1 table and
    one position each). This one form, whatever the shapes, gives the kernels
    the same argument types every call, so each compiles once per dtype.
    ``left`` and ``right`` are the window sides with causality folded in
    (``right <= 0``) and an unbounded side replaced by ``Nq + Nk``.
    """

    q: np.ndarray  # (B, Hq, Nq, D), C-contiguous, compute dtype, read-only
    k: np.ndarray  # (B, Hkv, Nk, D)
    v: np.ndarray  # (B, Hkv, Nk, Dv)
    scale: np.floating
    softcap: np.floating
    has_dist: bool
    dist_table: np.ndarray  # (Hq, Nd), compute dtype
    d_min: int
    q_positions: np.ndarray  # (Nq,) int64
    k_positions: np.ndarray  # (Nk,) int64
    has_bias: bool
    bias: np.ndarray  # flat
    bias_strides: tuple
    bias_own_shape: tuple  # the bias's shape, as 4-D
    has_mask: bool
    mask: np.ndarray  # flat, bool
    mask_strides: tuple
    offset: int
    left: int
    right: int
    has_keep: bool
    keep: np.ndarray  # flat, bool
    keep_strides: tuple
    keep_scale: np.floating

    @staticmethod
    def build(x: DenseInputs, dtype: np.dtype, given: tuple, distance: _DistanceBias | None = None) -> "_KernelArgs":
        """From checked inputs ``x`` and hook ``distance``; ``given`` are the caller's
        q, k, v, used as they are when already C-contiguous in ``dtype`` (no copy)."""
        s = x.shape
        real = dtype.type
        bias, bias_strides = _flat(x.bias, dtype)
        bias_own_shape = (1, 1, 1, 1) if x.bias is None else (1,) * (4 - x.bias.ndim) + x.bias.shape
        mask, mask_strides = _flat(x.mask, np.bool_)
        keep, keep_strides = _flat(x.dropout_keep, np.bool_)
        has_dist = distance is not None
        if not has_dist:
            no_positions = _frozen(np.zeros(1, np.int64))
            distance = _DistanceBias(_frozen(np.zeros((1, 1), dtype)), 0, no_positions, no_positions)

        unbounded = s.q_len + s.kv_len
        left, right = unbounded, unbounded
        if x.window is not None:
            left = unbounded if x.window[0] is None else min(x.window[0], unbounded)
            right = unbounded if x.window[1] is None else min(x.window[1], unbounded)
        if x.causal:
            right = min(right, 0)

        return _KernelArgs(
            q=_read_only(given[0], x.q, dtype),
            k=_read_only(given[1], x.k, dtype),
            v=_read_only(given[2], x.v, dtype),
            scale=real(x.scale),
            softcap=real(x.softcap),
            has_dist=has_dist,
            dist_table=distance.table,
            d_min=distance.d_min,
            q_positions=distance.q_positions,
            k_positions=distance.k_positions,
            has_bias=x.bias is not None,
            bias=bias,
            bias_strides=bias_strides,
            bias_own_shape=bias_own_shape,
            has_mask=x.mask is not None,
            mask=mask,
            mask_strides=mask_strides,
            offset=query_offset(s.q_len, s.kv_len, x.causal_alignment),
            left=left,
            right=right,
            has_keep=x.dropout_keep is not None,
            keep=keep,
            keep_strides=keep_strides,
            keep_scale=real(1.0 / (1.0 - x.dropout_p)),
        )

    def logits(self) -> tuple:
        """Arguments of steps (1)-(4), in the kernels' order."""
        return (self.scale, self.softcap,
                self.has_dist, self.dist_table, self.d_min, self.q_positions, self.k_positions,
                self.has_bias, self.bias, self.bias_strides,
                self.has_mask, self.mask, self.mask_strides, self.offset, self.left, self.right)  # fmt: skip

    def dropout(self) -> tuple:
        """Arguments of step (6)."""
        return (self.has_keep, self.keep, self.keep_strides, self.keep_scale)

    def serial_axes(self) -> tuple[bool, bool, bool]:
        """Which of batch, kv head, key block ``_dkv_kernel`` must sweep serially.

        Work items that differ only along an axis the bias is broadcast along
        add into the same dbias entries; walking that axis inside one work
        item, instead of in parallel, makes every dbias entry owned by one
        thread (no atomics, deterministic sums).
        """
        if not self.has_bias:
            return (False, False, False)
        b, h, _, n = self.bias_own_shape
        return (b == 1, h == 1, n == 1)


def _read_only(given, checked, dtype) -> np.ndarray:
    """``given`` itself if it is C-contiguous in ``dtype``, else ``checked`` (its
    float64 copy) cast to ``dtype``; as a read-only view either way, so that
    the kernels always see one array type."""
    use = given if given.dtype == dtype and given.flags.c_contiguous else np.ascontiguousarray(checked, dtype=dtype)
    return _frozen(use)


def _flat(x, dtype) -> tuple[np.ndarray, tuple]:
    """A read-only flat array holding ``x``, and the strides (b, h, i, j) -> index into it.

    ``x`` broadcasts to (B, Hq, Nq, Nk) (checked); the strides are 0 along
    the axes where it has size 1, or where it is itself a zero-stride
    broadcast view (those axes are not copied out). ``None`` gives a single
    placeholder element.
    """
    if x is None:
        flat, strides = np.zeros(1, dtype), (0, 0, 0, 0)
    else:
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
        x = x[tuple(slice(0, 1) if step == 0 else slice(None) for step in x.strides)]
        flat = np.ascontiguousarray(x, dtype=dtype).reshape(-1)
        strides = tuple(int(np.prod(x.shape[axis + 1 :])) if x.shape[axis] > 1 else 0 for axis in range(4))
    return _frozen(flat), strides


def _run_forward(args: _KernelArgs) -> tuple[np.ndarray, np.ndarray]:
    batch, q_heads, q_len, _ = args.q.shape
    out = np.empty((batch, q_heads, q_len, args.v.shape[3]), args.q.dtype)
    lse = np.empty((batch, q_heads, q_len), args.q.dtype)
    _forward_kernel(args.q, args.k, args.v, *args.logits(), *args.dropout(), out, lse)
    return out, lse


def _run_vjp(args: _KernelArgs, x: DenseInputs, dout, dlse, saved: Result | None = None) -> tuple[Grads, np.ndarray | None]:
    """Grads of q, k, v (and the user bias), and the distance table's gradient (None without one).

    ``dout`` and ``dlse`` are checked cotangents. ``out`` and ``lse`` come from ``saved`` when given,
    else from the forward once more (out for delta, lse to recompute P tile by tile).
    """
    dtype = args.q.dtype
    if saved is not None and saved.out.dtype == dtype and saved.out.shape == dout.shape:
        out, lse = saved.out, saved.lse
    else:
        out, lse = _run_forward(args)
    dout = np.ascontiguousarray(dout, dtype=dtype)  # (B, Hq, Nq, Dv)
    dlse = np.zeros(lse.shape, dtype) if dlse is None else np.ascontiguousarray(dlse, dtype=dtype)
    delta = np.einsum("bhqe,bhqe->bhq", dout, out)  # (B, Hq, Nq): sum_j P_ij dW_ij
    lse_for_p = np.where(np.isneginf(lse), np.inf, lse).astype(dtype)  # P = exp(s - inf) = 0 on fully masked rows

    dq = np.empty(args.q.shape, dtype)
    _dq_kernel(args.q, args.k, args.v, dout, lse_for_p, delta, dlse, *args.logits(), *args.dropout(), dq)

    dk = np.empty(args.k.shape, dtype)
    dv = np.empty(args.v.shape, dtype)
    dbias = np.zeros(args.bias_own_shape, dtype)  # the bias's own shape, as 4-D
    # One float64 slice of the distance table's gradient per lane of work items (see _dkv_kernel).
    lanes = numba.get_num_threads() if args.has_dist else 1
    ddist = np.zeros((lanes, *args.dist_table.shape), np.float64)  # (lanes, Hq, Nd)
    serial = args.serial_axes()
    _dkv_kernel(
        args.q, args.k, args.v, dout, lse_for_p, delta, dlse, *args.logits(), *args.dropout(), *serial,
        dk, dv, dbias, ddist,
    )  # fmt: skip

    grads = Grads(q=dq, k=dk, v=dv)
    if x.bias is not None:
        grads["bias"] = dbias.reshape(x.bias.shape)
    return grads, ddist.sum(axis=0) if args.has_dist else None


# --------------------------------------------------------------------------
# Small pieces shared by the kernels.
# --------------------------------------------------------------------------


@njit(cache=True)
def _softcap_slope(x):
    """``1 - tanh²(x) = sech²(x) = 4 e^(-2|x|) / (1 + e^(-2|x|))²``, without the
    cancellation of ``1 - tanh²`` where the cap saturates (refattn/core/softcap.py)."""
    decay = math.exp(-2.0 * abs(x))
    return 4.0 * decay / ((1.0 + decay) * (1.0 + decay))


@njit(cache=True)
def _block_order(item, n_blocks):
    """(outer index, block) of work item ``item``, blocks ordered 0, n-1, 1, n-2, ...

    Numba splits a prange into one contiguous run of items per thread; under
    a causal mask late query blocks (early key blocks) cost more, and this
    order gives every run a fair share of both.
    """
    outer, r = item // n_blocks, item % n_blocks
    block = r // 2 if r % 2 == 0 else n_blocks - 1 - r // 2
    return outer, block


@njit(cache=True)
def _transposed(x, b, h, start, count, width):
    """Rows ``start : start + count`` of ``x[b, h]`` transposed into a (D, width) tile, zero-padded."""
    t = np.zeros((x.shape[3], width), x.dtype)
    for r in range(count):
        for d in range(x.shape[3]):
            t[d, r] = x[b, h, start + r, d]
    return t


@njit(cache=True)
def _at(strides, b, h, i, j):
    """Index into a flat broadcast argument (see ``_flat``) of element (b, h, i, j)."""
    return b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3]


@njit(cache=True)
def _logits_tile(
    t, dcap, key_major, n_q, n_k, b, h, i0, j0,
    scale, softcap, has_dist, dist_table, d_min, q_positions, k_positions, has_bias, bias, bias_strides,
    has_mask, mask, mask_strides, offset, left, right,
):  # fmt: skip
    """Steps (1)-(4) in place on a tile ``t`` of dot products ``q·k``.

    ``key_major``: ``t[r, c]`` is (query ``i0 + c``, key ``j0 + r``), else
    (query ``i0 + r``, key ``j0 + c``). ``n_q`` queries and ``n_k`` keys are
    real; padding columns become -inf, padding rows are not touched. With a
    soft-cap, ``dcap`` receives its derivative ``sech²(s / c)``.
    """
    neg_inf, zero = -np.inf, t.dtype.type(0.0)
    n_rows, n_cols = (n_k, n_q) if key_major else (n_q, n_k)
    for r in range(n_rows):
        # (1) Scaled scores.
        for c in range(t.shape[1]):
            t[r, c] *= scale
        # (2) Soft-capping c * tanh(s / c), before bias and mask.
        if softcap > 0:
            for c in range(n_cols):
                dcap[r, c] = _softcap_slope(t[r, c] / softcap)
                t[r, c] = softcap * math.tanh(t[r, c] / softcap)
        # (3) Additive bias: the position bias of the distance k_pos[j] - q_pos[i]
        #     from the distance table, with the user bias (read through its
        #     broadcast view) added to it.
        if has_dist or has_bias:
            for c in range(n_cols):
                i, j = (i0 + c, j0 + r) if key_major else (i0 + r, j0 + c)
                added = dist_table[h, k_positions[j] - q_positions[i] - d_min] if has_dist else zero
                if has_bias:
                    added += bias[_at(bias_strides, b, h, i, j)]
                t[r, c] += added
        # (4) Mask, exactly -inf. Position (causal, window): key j is allowed
        #     for query i iff i + offset - left <= j <= i + offset + right, an
        #     interval [lo, hi) of this row's columns.
        if key_major:
            j = j0 + r
            lo, hi = j - right - offset - i0, j + left - offset - i0 + 1
        else:
            aligned = i0 + r + offset
            lo, hi = aligned - left - j0, aligned + right - j0 + 1
        lo = min(max(lo, 0), n_cols)
        hi = max(min(hi, n_cols), lo)
        for c in range(lo):
            t[r, c] = neg_inf
        for c in range(hi, t.shape[1]):
            t[r, c] = neg_inf
        if has_mask:
            for c in range(lo, hi):
                i, j = (i0 + c, j0 + r) if key_major else (i0 + r, j0 + c)
                if not mask[_at(mask_strides, b, h, i, j)]:
                    t[r, c] = neg_inf


@njit(cache=True)
def _key_range(i_start, i_stop, offset, left, right, kv_len):
    """Keys [lo, hi) that any of the queries [i_start, i_stop) may attend to."""
    return max(0, i_start + offset - left), min(kv_len, i_stop - 1 + offset + right + 1)


@njit(cache=True)
def _query_range(j_start, j_stop, offset, left, right, q_len):
    """Queries [lo, hi) that may attend to any of the keys [j_start, j_stop)."""
    return max(0, j_start - right - offset), min(q_len, j_stop - 1 + left - offset + 1)


# --------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(
    q, k, v,
    scale, softcap, has_dist, dist_table, d_min, q_positions, k_positions,  # (1)-(3)
    has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (3)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    out, lse,
):  # fmt: skip
    """out (B, Hq, Nq, Dv), lse (B, Hq, Nq) by the online softmax; parallel over (b, h, query block)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    n_blocks = (q_len + BLOCK_Q - 1) // BLOCK_Q
    dtype = q.dtype
    for item in prange(batch * q_heads * n_blocks):
        bh, block = _block_order(item, n_blocks)
        b, h = bh // q_heads, bh % q_heads
        kvh = h // group  # GQA: query head h reads kv head h // group
        i0 = block * BLOCK_Q
        n_q = min(BLOCK_Q, q_len - i0)

        q_t = _transposed(q, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        s_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits, then weights; key-major
        dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)  # unused by the forward
        acc_t = np.zeros((value_dim, BLOCK_Q), dtype)  # unnormalised out, transposed
        pv_t = np.empty((value_dim, BLOCK_Q), dtype)  # this tile's v^T p
        m = np.full(BLOCK_Q, -np.inf, dtype)  # running max
        l = np.zeros(BLOCK_Q, dtype)  # running sum of exp(s - m)
        shift = np.empty(BLOCK_Q, dtype)
        alpha = np.empty(BLOCK_Q, dtype)

        key_lo, key_hi = _key_range(i0, i0 + n_q, offset, left, right, kv_len)
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            # (1)-(4) Logits of this tile.
            np.dot(k[b, kvh, j0 : j0 + n_k], q_t, s_t[:n_k])  # (n_k, BQ) = k q^T
            _logits_tile(
                s_t, dcap, True, n_q, n_k, b, h, i0, j0,
                scale, softcap, has_dist, dist_table, d_min, q_positions, k_positions, has_bias, bias, bias_strides,
                has_mask, mask, mask_strides, offset, left, right,
            )  # fmt: skip
            # (5) Online softmax: new maxima, rescale factors, exponentials, sums.
            for c in range(BLOCK_Q):
                shift[c] = m[c]
            for r in range(n_k):
                for c in range(BLOCK_Q):
                    shift[c] = max(shift[c], s_t[r, c])
            for c in range(BLOCK_Q):
                m_new = shift[c]
                if m_new == -np.inf:  # nothing allowed yet: shift by 0, never -inf - (-inf)
                    shift[c] = 0
                alpha[c] = _exp_nonpositive(m[c] - shift[c])
                m[c] = m_new
                l[c] *= alpha[c]
            for r in range(n_k):
                for c in range(BLOCK_Q):
                    p = _exp_nonpositive(s_t[r, c] - shift[c])
                    s_t[r, c] = p
                    l[c] += p
            # (6) Dropout: the keep-mask zeroes weights (1 / (1 - p) is applied at the end).
            if has_keep:
                for r in range(n_k):
                    for c in range(n_q):
                        if not keep[_at(keep_strides, b, h, i0 + c, j0 + r)]:
                            s_t[r, c] = 0
            # (7) acc = alpha * acc + v^T p
            np.dot(v[b, kvh, j0 : j0 + n_k].T, s_t[:n_k], pv_t)  # (Dv, BQ)
            for e in range(value_dim):
                for c in range(BLOCK_Q):
                    acc_t[e, c] = alpha[c] * acc_t[e, c] + pv_t[e, c]

        # Normalise: out = acc / l * 1/(1-p), lse = m + log l; a fully masked row has l = 0.
        for c in range(n_q):
            i = i0 + c
            if l[c] > 0:
                norm = keep_scale / l[c]
                for e in range(value_dim):
                    out[b, h, i, e] = acc_t[e, c] * norm
                lse[b, h, i] = m[c] + math.log(l[c])
            else:
                for e in range(value_dim):
                    out[b, h, i, e] = 0
                lse[b, h, i] = -np.inf


# --------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _dq_kernel(
    q, k, v, dout, lse, delta, dlse,
    scale, softcap, has_dist, dist_table, d_min, q_positions, k_positions,  # (1)-(3)
    has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (3)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    dq,
):  # fmt: skip
    """dq (B, Hq, Nq, D); parallel over (b, h, query block), sweeping key tiles.

    ``lse`` is the forward's, with +inf on fully masked rows.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    n_blocks = (q_len + BLOCK_Q - 1) // BLOCK_Q
    dtype = q.dtype
    for item in prange(batch * q_heads * n_blocks):
        bh, block = _block_order(item, n_blocks)
        b, h = bh // q_heads, bh % q_heads
        kvh = h // group
        i0 = block * BLOCK_Q
        n_q = min(BLOCK_Q, q_len - i0)

        q_t = _transposed(q, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        dout_t = _transposed(dout, b, h, i0, n_q, BLOCK_Q)  # (Dv, BQ)
        row_lse = np.full(BLOCK_Q, np.inf, dtype)  # padding queries: P = 0
        row_delta = np.zeros(BLOCK_Q, dtype)
        row_dlse = np.zeros(BLOCK_Q, dtype)
        for c in range(n_q):
            row_lse[c], row_delta[c], row_dlse[c] = lse[b, h, i0 + c], delta[b, h, i0 + c], dlse[b, h, i0 + c]
        p_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits, then P; key-major
        dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)
        ds_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # dW, then dS, then dscore
        dq_t = np.zeros((head_dim, BLOCK_Q), dtype)
        dq_tile = np.empty((head_dim, BLOCK_Q), dtype)  # this tile's k^T dscore

        key_lo, key_hi = _key_range(i0, i0 + n_q, offset, left, right, kv_len)
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            k_tile = k[b, kvh, j0 : j0 + n_k]  # (n_k, D), a view
            # (1)-(4) Logits, and (5) P = exp(s - lse).
            np.dot(k_tile, q_t, p_t[:n_k])
            _logits_tile(
                p_t, dcap, True, n_q, n_k, b, h, i0, j0,
                scale, softcap, has_dist, dist_table, d_min, q_positions, k_positions, has_bias, bias, bias_strides,
                has_mask, mask, mask_strides, offset, left, right,
            )  # fmt: skip
            for r in range(n_k):
                for c in range(BLOCK_Q):
                    p_t[r, c] = _exp_nonpositive(p_t[r, c] - row_lse[c])
            # (7') dP = v dout^T; (6') dW = z * dP.
            np.dot(v[b, kvh, j0 : j0 + n_k], dout_t, ds_t[:n_k])
            if has_keep:
                for r in range(n_k):
                    for c in range(n_q):
                        kept = keep[_at(keep_strides, b, h, i0 + c, j0 + r)]
                        ds_t[r, c] = ds_t[r, c] * keep_scale if kept else 0
            # (5') dS = P (dW - delta) + P dlse; (2') times the soft-cap's derivative.
            for r in range(n_k):
                for c in range(BLOCK_Q):
                    ds_t[r, c] = p_t[r, c] * (ds_t[r, c] - row_delta[c]) + p_t[r, c] * row_dlse[c]
            if softcap > 0:
                for r in range(n_k):
                    for c in range(BLOCK_Q):
                        ds_t[r, c] *= dcap[r, c]
            # (1') dq^T += k^T dscore  (scale applied once, below)
            np.dot(k_tile.T, ds_t[:n_k], dq_tile)
            for d in range(head_dim):
                for c in range(BLOCK_Q):
                    dq_t[d, c] += dq_tile[d, c]

        for c in range(n_q):
            for d in range(head_dim):
                dq[b, h, i0 + c, d] = scale * dq_t[d, c]


@njit(parallel=True, cache=True, fastmath=False)
def _dkv_kernel(
    q, k, v, dout, lse, delta, dlse,
    scale, softcap, has_dist, dist_table, d_min, q_positions, k_positions,  # (1)-(3)
    has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (3)-(4)
    has_keep, keep, keep_strides, keep_scale,  # (6)
    serial_batch, serial_heads, serial_blocks,
    dk, dv, dbias, ddist,
):  # fmt: skip
    """dk, dv (B, Hkv, Nk, ·), dbias (the bias's own shape, 4-D) and ddist
    (lanes, Hq, Nd); parallel over (b, kv head, key block).

    Each work item sweeps the query heads of its GQA group and their query
    tiles, so dk and dv come out summed over the group. ``serial_*`` name the
    axes along which the bias is broadcast (see ``_KernelArgs.serial_axes``):
    a work item then walks that whole axis itself, so no two threads ever add
    into the same dbias entry. Every key block and batch adds into the same
    distances of the distance table, so with one (``has_dist``) the work items
    are cut into ``lanes = ddist.shape[0]`` contiguous runs (one per thread),
    each walked by one thread adding into its own slice ``ddist[lane]``; the
    caller sums the slices. Without one, every lane is a single work item.
    """
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = q_heads // kv_heads
    n_blocks = (kv_len + BLOCK_K - 1) // BLOCK_K
    dtype = q.dtype
    items_b = 1 if serial_batch else batch
    items_h = 1 if serial_heads else kv_heads
    items_k = 1 if serial_blocks else n_blocks
    n_items = items_b * items_h * items_k
    lanes = min(ddist.shape[0], n_items) if has_dist else n_items
    full_b, full_h, full_q, full_k = dbias.shape[0] > 1, dbias.shape[1] > 1, dbias.shape[2] > 1, dbias.shape[3] > 1
    for lane in prange(lanes):
        s = np.empty((BLOCK_Q, BLOCK_K), dtype)  # logits, then P; query-major
        dcap = np.empty((BLOCK_Q, BLOCK_K), dtype)
        pz = np.empty((BLOCK_Q, BLOCK_K), dtype)  # dropped weights P * z
        ds = np.empty((BLOCK_Q, BLOCK_K), dtype)  # dW, then dS, then dscore
        dk_tile = np.empty((head_dim, BLOCK_K), dtype)  # one query tile's q^T dscore
        dv_tile = np.empty((value_dim, BLOCK_K), dtype)  # one query tile's dout^T (P z)
        for item in range(lane * n_items // lanes, (lane + 1) * n_items // lanes):
            outer, item_k = _block_order(item, items_k)
            item_b, item_h = outer // items_h, outer % items_h
            b_lo, b_hi = (0, batch) if serial_batch else (item_b, item_b + 1)
            h_lo, h_hi = (0, kv_heads) if serial_heads else (item_h, item_h + 1)
            k_lo, k_hi = (0, n_blocks) if serial_blocks else (item_k, item_k + 1)
            for b in range(b_lo, b_hi):
                for kvh in range(h_lo, h_hi):
                    for block in range(k_lo, k_hi):
                        j0 = block * BLOCK_K
                        n_k = min(BLOCK_K, kv_len - j0)
                        k_t = _transposed(k, b, kvh, j0, n_k, BLOCK_K)  # (D, BK)
                        v_t = _transposed(v, b, kvh, j0, n_k, BLOCK_K)  # (Dv, BK)
                        dk_t = np.zeros((head_dim, BLOCK_K), dtype)
                        dv_t = np.zeros((value_dim, BLOCK_K), dtype)
                        query_lo, query_hi = _query_range(j0, j0 + n_k, offset, left, right, q_len)
                        for h in range(kvh * group, (kvh + 1) * group):
                            for i0 in range(query_lo, query_hi, BLOCK_Q):
                                n_q = min(BLOCK_Q, query_hi - i0)
                                q_tile = q[b, h, i0 : i0 + n_q]  # (n_q, D), a view
                                dout_tile = dout[b, h, i0 : i0 + n_q]  # (n_q, Dv), a view
                                # (1)-(4) Logits, and (5) P = exp(s - lse), row by row.
                                np.dot(q_tile, k_t, s[:n_q])  # (n_q, BK) = q k^T
                                _logits_tile(
                                    s, dcap, False, n_q, n_k, b, h, i0, j0,
                                    scale, softcap, has_dist, dist_table, d_min, q_positions, k_positions,
                                    has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
                                )  # fmt: skip
                                for r in range(n_q):
                                    row_lse = lse[b, h, i0 + r]
                                    for c in range(BLOCK_K):
                                        s[r, c] = _exp_nonpositive(s[r, c] - row_lse)
                                # (6) Dropped weights P * z; (7') dv^T += dout^T (P z).
                                for r in range(n_q):
                                    for c in range(BLOCK_K):
                                        pz[r, c] = s[r, c]
                                    if has_keep:
                                        for c in range(n_k):
                                            kept = keep[_at(keep_strides, b, h, i0 + r, j0 + c)]
                                            pz[r, c] = pz[r, c] * keep_scale if kept else 0
                                np.dot(dout_tile.T, pz[:n_q], dv_tile)
                                for e in range(value_dim):
                                    for c in range(BLOCK_K):
                                        dv_t[e, c] += dv_tile[e, c]
                                # (7') dP = dout v^T; (6') dW = z * dP.
                                np.dot(dout_tile, v_t, ds[:n_q])
                                if has_keep:
                                    for r in range(n_q):
                                        for c in range(n_k):
                                            kept = keep[_at(keep_strides, b, h, i0 + r, j0 + c)]
                                            ds[r, c] = ds[r, c] * keep_scale if kept else 0
                                # (5') dS = P (dW - delta) + P dlse.
                                for r in range(n_q):
                                    row_delta, row_dlse = delta[b, h, i0 + r], dlse[b, h, i0 + r]
                                    for c in range(BLOCK_K):
                                        ds[r, c] = s[r, c] * (ds[r, c] - row_delta) + s[r, c] * row_dlse
                                # (3') dbias: dS summed over the bias's broadcast axes; the distance
                                #      table's gradient: dS summed over b and over (i, j) of each distance.
                                if has_bias:
                                    bb = b if full_b else 0
                                    bh = h if full_h else 0
                                    for r in range(n_q):
                                        bi = i0 + r if full_q else 0
                                        for c in range(n_k):
                                            dbias[bb, bh, bi, j0 + c if full_k else 0] += ds[r, c]
                                if has_dist:
                                    for r in range(n_q):
                                        column_of_query = q_positions[i0 + r] + d_min
                                        for c in range(n_k):
                                            ddist[lane, h, k_positions[j0 + c] - column_of_query] += ds[r, c]
                                # (2') Soft-cap derivative; (1') dk^T += q^T dscore.
                                if softcap > 0:
                                    for r in range(n_q):
                                        for c in range(BLOCK_K):
                                            ds[r, c] *= dcap[r, c]
                                np.dot(q_tile.T, ds[:n_q], dk_tile)
                                for d in range(head_dim):
                                    for c in range(BLOCK_K):
                                        dk_t[d, c] += dk_tile[d, c]

                        for c in range(n_k):
                            for d in range(head_dim):
                                dk[b, kvh, j0 + c, d] = scale * dk_t[d, c]
                            for e in range(value_dim):
                                dv[b, kvh, j0 + c, e] = dv_t[e, c]
