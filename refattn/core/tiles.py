"""The shared Numba tile library: the pieces of every tiled attention kernel.

Dense attention and the mechanisms built on it (position encodings, the
dilution diagnostics) are computed on CPU the way FlashAttention does it
(Dao et al. 2022, "FlashAttention"; Dao 2023, "FlashAttention-2"), written
plainly: no score-sized array is ever allocated. Queries are cut into blocks
of ``BLOCK_Q`` rows, keys into blocks of ``BLOCK_K``; a (BLOCK_K, BLOCK_Q)
tile of scores is the largest thing that exists, so memory is O(N), never
O(Nq * Nk). A mask, bias or keep-mask is read where it lies, in its own
shape, through strides that are 0 along the axes it is broadcast along (see
:func:`flat`); a full (Nq, Nk) one is read one tile at a time.

This module holds what every such kernel does the same way, as ``@njit``
functions that a kernel calls inside its loops: the logits of a tile (steps
(1)-(4): scale, soft-cap, bias, mask), the online-softmax update and the
finishing of rows (5)-(7), the softmax's backward on a tile (7')-(5'), (2'),
the bias gradient (3'), and the accumulation of tile products. What is
particular to a mechanism (a position term added to the raw scores, a
distance-bias read, a relative-value term added to the output; LSH's sorted
chunks and routing's clusters, gathered into tiles whose rows are written
back one by one with :func:`finish_row` and read with :func:`load_row`) is a
short loop of its own around these. Step numbers are those of spec/dense.md.

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
masked ends with ``l = 0``: its output is 0 and its lse is -inf, never NaN
(:func:`online_softmax`, :func:`finish_rows`).

Backward (FlashAttention-2)
---------------------------
With ``P = exp(s - lse)`` recomputed tile by tile from the forward's lse, and
``delta_i = sum_j P_ij dW_ij = dout_i · out_i`` computed once
(:func:`backward_rows`, read per query tile by :func:`load_rows`)::

    dW_ij     = z_ij * (dout_i · v_j)                          (7'), (6')
    dS_ij     = P_ij * (dW_ij - delta_i) + P_ij * dlse_i       (5')
    dbias     = dS summed over the axes the bias was broadcast along  (3')
    dscore_ij = dS_ij * sech^2(s_ij / c)                        (2')  soft-cap
    dq_i = scale * sum_j dscore_ij k_j,  dk_j = scale * sum_i dscore_ij q_i,
    dv_j = sum_i P_ij z_ij dout_i                              (1'), (7')

The forward's ``out`` and ``lse`` are what the backward needs beyond the
inputs; a backend's VJP takes them as ``saved`` (the forward's Result) and
runs the forward again only without them. Fully masked rows have lse = -inf;
the backward uses +inf in its place so that their ``P`` is exactly 0 and
every gradient they feed is 0.

Tiles and bounds
----------------
Causal masks and windows bound the keys a query block can see
(:func:`key_range`) and the queries a key block is seen by
(:func:`query_range`); tiles outside the bounds are skipped, so causal
attention costs about half. Inside a tile the bounds are applied per row as
an interval of columns. Equivalently to refattn/core/masks.py, with the
aligned query position ``i' = i + offset``, key ``j`` is allowed iff
``i' - left <= j <= i' + right``, where causal sets ``right <= 0`` and an
unbounded side is given as a distance larger than any sequence.

A tile is held either key-major, ``t[r, c]`` = (query ``i0 + c``, key
``j0 + r``), shape (BLOCK_K, BLOCK_Q), or query-major, ``t[r, c]`` = (query
``i0 + r``, key ``j0 + c``), shape (BLOCK_Q, BLOCK_K): every function taking
a tile takes the flag ``key_major``. Kernels that sweep keys for a block of
queries (the forward) hold it key-major, so that each query's running
statistics update along contiguous rows (a loop Numba vectorises without
reassociating sums); kernels that sweep queries for a block of keys hold it
query-major, for the same reason. Real entries are the first ``n_q``
queries and ``n_k`` keys; padding columns are set to -inf by the logits and
stay out of every result.

Precision and speed
-------------------
float64 inputs run in float64; float32, float16 and bfloat16 inputs run in
float32 (tiles, running statistics and accumulators alike, as FlashAttention
keeps its softmax statistics in float32; :func:`compute_dtype`). ``exp`` is a
Cody-Waite range reduction and a Taylor polynomial (:func:`exp_nonpositive`),
accurate to about an ulp, because a loop calling the C library's ``exp``
cannot be vectorised; it flushes results below the smallest normal number
(exp(-87) in float32) to 0, far below any tolerance next to the exp(0) = 1
that every row's maximum contributes. Kernels compile on first call
(``cache=True`` keeps them between sessions); importing compiles nothing.
Numba's cache is keyed on the file that defines each kernel, not on the
functions it calls: after editing this module, delete the kernel modules'
cached ``__pycache__/*.nbi`` and ``*.nbc`` files (or point
``NUMBA_CACHE_DIR`` at a fresh folder), or they keep running the old pieces.

The tile products (``k qᵀ``, ``vᵀ p``, ...) are ``np.dot`` on tiles, i.e. the
BLAS that SciPy ships; a 64 x 64 x 64 product is below OpenBLAS's threading
threshold, so each runs on the calling Numba thread. (With head dims above
64 OpenBLAS may start its own threads inside Numba's; set
``OPENBLAS_NUM_THREADS=1`` then.) Hand-written product loops reached about
half this speed: without ``fastmath`` LLVM keeps the accumulator tile in
memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, types
from numba.extending import overload

from .masks import query_offset

BLOCK_Q = 64  # query rows per tile
BLOCK_K = 64  # key rows per tile

_FLOAT32_COMPUTED = (np.dtype(np.float32), np.dtype(np.float16))  # and bfloat16

# Rows of a softmax state (see ``softmax_state``) and of backward rows (``load_rows``).
MAX, SUM, SHIFT, ALPHA = 0, 1, 2, 3
LSE, DELTA, DLSE = 0, 1, 2


# --------------------------------------------------------------------------
# Arguments: what every kernel is given, built once per call in Python.
# --------------------------------------------------------------------------


def compute_dtype(q) -> np.dtype:
    """float32 for float32, float16 and bfloat16 inputs; float64 otherwise."""
    dtype = getattr(q, "dtype", None)
    if dtype in _FLOAT32_COMPUTED or (dtype is not None and dtype.name == "bfloat16"):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def frozen(x: np.ndarray) -> np.ndarray:
    """A read-only view of ``x``."""
    view = x.view()
    view.flags.writeable = False
    return view


def read_only(given, checked, dtype) -> np.ndarray:
    """``given`` itself if it is C-contiguous in ``dtype``, else ``checked`` (its
    checked copy) cast to ``dtype``; as a read-only view either way, so that
    the kernels always see one array type."""
    use = given if given.dtype == dtype and given.flags.c_contiguous else np.ascontiguousarray(checked, dtype=dtype)
    return frozen(use)


def flat(x, dtype) -> tuple[np.ndarray, tuple]:
    """A read-only flat array holding ``x``, and the strides (b, h, i, j) -> index into it.

    ``x`` broadcasts to (B, Hq, Nq, Nk) (checked); the strides are 0 along
    the axes where it has size 1, or where it is itself a zero-stride
    broadcast view (those axes are not copied out). ``None`` gives a single
    placeholder element.
    """
    if x is None:
        flat_x, strides = np.zeros(1, dtype), (0, 0, 0, 0)
    else:
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
        x = x[tuple(slice(0, 1) if step == 0 else slice(None) for step in x.strides)]
        flat_x = np.ascontiguousarray(x, dtype=dtype).reshape(-1)
        strides = tuple(int(np.prod(x.shape[axis + 1 :])) if x.shape[axis] > 1 else 0 for axis in range(4))
    return frozen(flat_x), strides


@dataclass(frozen=True)
class TileArgs:
    """Checked dense inputs (refattn/dense/inputs.py: ``DenseInputs``) in the form the kernels take them.

    ``mask``, ``bias`` and ``keep`` are each a read-only flat array holding
    the argument in its own shape, and the element strides by which
    (b, h, i, j) of the (B, Hq, Nq, Nk) broadcast reaches into it -- 0 on the
    axes it is broadcast along, as ``np.broadcast_to`` would make them. Nothing
    is copied to score size. An absent one is a single element with its
    ``has_*`` flag False. This one form, whatever the shapes, gives the
    kernels the same argument types every call, so each compiles once per
    dtype. ``left`` and ``right`` are the window sides with causality folded
    in (``right <= 0``) and an unbounded side replaced by ``Nq + Nk``.
    """

    q: np.ndarray  # (B, Hq, Nq, D), C-contiguous, compute dtype, read-only
    k: np.ndarray  # (B, Hkv, Nk, D)
    v: np.ndarray  # (B, Hkv, Nk, Dv)
    scale: np.floating
    softcap: np.floating
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
    def build(x, dtype: np.dtype, given: tuple) -> "TileArgs":
        """From checked dense inputs ``x``; ``given`` are the caller's q, k, v,
        used as they are when already C-contiguous in ``dtype`` (no copy)."""
        s = x.shape
        real = dtype.type
        bias, bias_strides = flat(x.bias, dtype)
        mask, mask_strides = flat(x.mask, np.bool_)
        keep, keep_strides = flat(x.dropout_keep, np.bool_)
        unbounded = s.q_len + s.kv_len
        left, right = unbounded, unbounded
        if x.window is not None:
            left = unbounded if x.window[0] is None else min(x.window[0], unbounded)
            right = unbounded if x.window[1] is None else min(x.window[1], unbounded)
        if x.causal:
            right = min(right, 0)
        return TileArgs(
            q=read_only(given[0], x.q, dtype),
            k=read_only(given[1], x.k, dtype),
            v=read_only(given[2], x.v, dtype),
            scale=real(x.scale),
            softcap=real(x.softcap),
            has_bias=x.bias is not None,
            bias=bias,
            bias_strides=bias_strides,
            bias_own_shape=(1, 1, 1, 1) if x.bias is None else (1,) * (4 - x.bias.ndim) + x.bias.shape,
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
        """Arguments of steps (1)-(4) (:func:`logits_tile`), in the kernels' order."""
        return (self.scale, self.softcap, self.has_bias, self.bias, self.bias_strides,
                self.has_mask, self.mask, self.mask_strides, self.offset, self.left, self.right)  # fmt: skip

    def dropout(self) -> tuple:
        """Arguments of step (6)."""
        return (self.has_keep, self.keep, self.keep_strides, self.keep_scale)

    def serial_axes(self) -> tuple[bool, bool, bool]:
        """Which of batch, kv head, key block a kernel parallel over key blocks must sweep serially.

        Work items that differ only along an axis the bias is broadcast along
        add into the same dbias entries; walking that axis inside one work
        item, instead of in parallel, makes every dbias entry owned by one
        thread (no atomics, deterministic sums).
        """
        if not self.has_bias:
            return (False, False, False)
        b, h, _, n = self.bias_own_shape
        return (b == 1, h == 1, n == 1)

    def bias_grad(self, dbias: np.ndarray, x) -> dict:
        """``{"bias": dbias}`` in the bias's own shape when ``x`` (the checked inputs) had one, else ``{}``."""
        return {} if x.bias is None else {"bias": dbias.reshape(x.bias.shape)}


def forward_outputs(q: np.ndarray, value_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) for queries ``q`` (B, Hq, Nq, D)."""
    batch, q_heads, q_len, _ = q.shape
    return np.empty((batch, q_heads, q_len, value_dim), q.dtype), np.empty((batch, q_heads, q_len), q.dtype)


def reusable(saved, dtype: np.dtype, out_shape: tuple) -> bool:
    """Whether ``saved`` (a backend forward's Result, or None) holds ``out`` and ``lse`` in ``dtype``."""
    return saved is not None and saved.out.dtype == dtype and saved.out.shape == out_shape and saved.lse is not None


def backward_rows(dout, dlse, out, lse, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The backward's per-row inputs: ``dout`` (B, Hq, Nq, Dv) C-contiguous in ``dtype``, and
    ``lse_for_p``, ``delta``, ``dlse`` (B, Hq, Nq).

    ``delta = sum_e dout * out = sum_j P_ij dW_ij``; ``lse_for_p`` is ``lse``
    with +inf on fully masked rows, so that ``P = exp(s - inf) = 0`` there;
    ``dlse`` is 0 when not given.
    """
    dout = np.ascontiguousarray(dout, dtype=dtype)
    dlse = np.zeros(lse.shape, dtype) if dlse is None else np.ascontiguousarray(dlse, dtype=dtype)
    delta = np.einsum("bhqe,bhqe->bhq", dout, out).astype(dtype)
    lse_for_p = np.where(np.isneginf(lse), np.inf, lse).astype(dtype)
    return dout, lse_for_p, delta, dlse


# --------------------------------------------------------------------------
# Scalars and small pieces.
# --------------------------------------------------------------------------


def exp_nonpositive(x):
    """``exp(x)`` for ``x <= 0`` (and -inf), vectorisable; results below the
    smallest normal number are flushed to 0. For Numba code only: its float32
    and float64 implementations follow."""
    raise NotImplementedError("exp_nonpositive is compiled by Numba; call it from a kernel")


@overload(exp_nonpositive, jit_options={"fastmath": False})
def _exp_nonpositive_impl(x):
    # exp(x) = 2**n * exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split
    # in two so that n * ln2_hi is exact: Cody & Waite 1980), |r| <= ln(2)/2,
    # exp(r) by its Taylor polynomial (error < 1/2 ulp before rounding), and
    # 2**n built from its exponent bits.
    if isinstance(x, types.Float) and x.bitwidth == 32:
        f32 = np.float32
        log2e, ln2_hi, ln2_lo = f32(1.4426950408889634), f32(0.693359375), f32(-2.12194440e-4)
        lowest, half, zero = f32(-87.0), f32(0.5), f32(0.0)
        c2, c3, c4, c5, c6, c7 = (f32(1.0 / math.factorial(n)) for n in range(2, 8))
        one = f32(1.0)

        def exp32(x):
            xc = max(x, lowest)
            n = np.floor(xc * log2e + half)  # a float: math.floor would give an int64 and stop vectorisation
            r = xc - n * ln2_hi - n * ln2_lo
            p = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + one) * r + one
            two_n = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
            return zero if x < lowest else p * two_n

        return exp32
    if isinstance(x, types.Float) and x.bitwidth == 64:
        ln2_hi, ln2_lo = 6.93147180369123816490e-01, 1.90821492927058770002e-10
        log2e, lowest = 1.4426950408889634, -708.0
        c = tuple(1.0 / math.factorial(n) for n in range(14))
        c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13 = c[2:]

        def exp64(x):
            xc = max(x, lowest)
            n = np.floor(xc * log2e + 0.5)
            r = xc - n * ln2_hi - n * ln2_lo
            p = c13 * r + c12
            p = p * r + c11
            p = p * r + c10
            p = p * r + c9
            p = p * r + c8
            p = p * r + c7
            p = p * r + c6
            p = p * r + c5
            p = p * r + c4
            p = p * r + c3
            p = p * r + c2
            p = (p * r + 1.0) * r + 1.0
            two_n = np.int64((np.int64(n) + np.int64(1023)) << np.int64(52)).view(np.float64)
            return 0.0 if x < lowest else p * two_n

        return exp64
    return None


@njit(cache=True)
def softcap_slope(x):
    """``1 - tanh²(x) = sech²(x) = 4 e^(-2|x|) / (1 + e^(-2|x|))²``, without the
    cancellation of ``1 - tanh²`` where the cap saturates (refattn/core/softcap.py)."""
    decay = math.exp(-2.0 * abs(x))
    return 4.0 * decay / ((1.0 + decay) * (1.0 + decay))


@njit(cache=True)
def block_order(item, n_blocks):
    """(outer index, block) of work item ``item``, blocks ordered 0, n-1, 1, n-2, ...

    Numba splits a prange into one contiguous run of items per thread; under
    a causal mask late query blocks (early key blocks) cost more, and this
    order gives every run a fair share of both.
    """
    outer, r = item // n_blocks, item % n_blocks
    block = r // 2 if r % 2 == 0 else n_blocks - 1 - r // 2
    return outer, block


@njit(cache=True)
def transposed(x, b, h, start, count, width):
    """Rows ``start : start + count`` of ``x[b, h]`` transposed into a (D, width) tile, zero-padded."""
    t = np.zeros((x.shape[3], width), x.dtype)
    for r in range(count):
        for d in range(x.shape[3]):
            t[d, r] = x[b, h, start + r, d]
    return t


@njit(cache=True)
def at(strides, b, h, i, j):
    """Index into a flat broadcast argument (see :func:`flat`) of element (b, h, i, j)."""
    return b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3]


@njit(cache=True)
def key_range(i_start, i_stop, offset, left, right, kv_len):
    """Keys [lo, hi) that any of the queries [i_start, i_stop) may attend to."""
    return max(0, i_start + offset - left), min(kv_len, i_stop - 1 + offset + right + 1)


@njit(cache=True)
def query_range(j_start, j_stop, offset, left, right, q_len):
    """Queries [lo, hi) that may attend to any of the keys [j_start, j_stop)."""
    return max(0, j_start - right - offset), min(q_len, j_stop - 1 + left - offset + 1)


@njit(cache=True)
def pair(key_major, i0, j0, r, c):
    """(query, key) of entry ``[r, c]`` of a tile at queries ``i0``, keys ``j0``."""
    return (i0 + c, j0 + r) if key_major else (i0 + r, j0 + c)


@njit(cache=True)
def real_extent(key_major, n_q, n_k):
    """(real rows, real columns) of a tile with ``n_q`` queries and ``n_k`` keys."""
    return (n_k, n_q) if key_major else (n_q, n_k)


@njit(cache=True)
def accumulate(acc, tile):
    """``acc += tile`` (same shape)."""
    for r in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            acc[r, c] += tile[r, c]


@njit(cache=True)
def write_rows(dst, b, h, start, count, acc_t, factor):
    """``dst[b, h, start + c, :] = factor * acc_t[:, c]`` for the ``count`` real columns of a transposed accumulator."""
    for c in range(count):
        for d in range(acc_t.shape[0]):
            dst[b, h, start + c, d] = factor * acc_t[d, c]


# --------------------------------------------------------------------------
# Steps (1)-(4): the logits of a tile.
# --------------------------------------------------------------------------


@njit(cache=True)
def scale_and_cap(t, dcap, key_major, n_q, n_k, scale, softcap):
    """Steps (1)-(2) in place on a tile ``t`` of raw scores: ``s = scale * t``,
    then the soft-cap ``c * tanh(s / c)`` (with ``softcap = c > 0``), whose
    derivative ``sech²(s / c)`` goes into ``dcap``. Padding rows are not touched."""
    n_rows, n_cols = real_extent(key_major, n_q, n_k)
    for r in range(n_rows):
        for c in range(t.shape[1]):
            t[r, c] *= scale
        if softcap > 0:
            for c in range(n_cols):
                dcap[r, c] = softcap_slope(t[r, c] / softcap)
                t[r, c] = softcap * math.tanh(t[r, c] / softcap)


@njit(cache=True)
def bias_and_mask(
    t, key_major, n_q, n_k, b, h, i0, j0,
    has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
):  # fmt: skip
    """Steps (3)-(4) in place: add the user bias (read through its broadcast
    view), then set masked entries to exactly -inf. Padding columns become
    -inf; padding rows are not touched.

    Position (causal, window): key ``j`` is allowed for query ``i`` iff
    ``i + offset - left <= j <= i + offset + right``, an interval [lo, hi)
    of each row's columns.
    """
    neg_inf = -np.inf
    n_rows, n_cols = real_extent(key_major, n_q, n_k)
    for r in range(n_rows):
        if has_bias:
            for c in range(n_cols):
                i, j = pair(key_major, i0, j0, r, c)
                t[r, c] += bias[at(bias_strides, b, h, i, j)]
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
                i, j = pair(key_major, i0, j0, r, c)
                if not mask[at(mask_strides, b, h, i, j)]:
                    t[r, c] = neg_inf


@njit(cache=True)
def logits_tile(
    t, dcap, key_major, n_q, n_k, b, h, i0, j0,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
):  # fmt: skip
    """Steps (1)-(4) in place on a tile ``t`` of raw scores (``q·k``, plus any
    term a mechanism adds before the scale): :func:`scale_and_cap`, then
    :func:`bias_and_mask`. A mechanism with a bias of its own calls the two
    halves and adds it in between."""
    scale_and_cap(t, dcap, key_major, n_q, n_k, scale, softcap)
    bias_and_mask(
        t, key_major, n_q, n_k, b, h, i0, j0,
        has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
    )  # fmt: skip


# --------------------------------------------------------------------------
# Steps (5)-(7): the online softmax, key-major tiles (BLOCK_K, BLOCK_Q).
# --------------------------------------------------------------------------


@njit(cache=True)
def softmax_state(width, dtype):
    """A fresh online-softmax state for ``width`` query rows: rows ``MAX`` (running
    maximum, -inf), ``SUM`` (running sum of exp(s - m), 0), and the scratch rows
    ``SHIFT`` and ``ALPHA`` (this tile's rescale factors)."""
    state = np.empty((4, width), dtype)
    reset_softmax_state(state)
    return state


@njit(cache=True)
def reset_softmax_state(state):
    """Start ``state`` afresh, for the next query block: maxima -inf, sums 0."""
    state[MAX, :] = -np.inf
    state[SUM, :] = 0


@njit(cache=True)
def online_softmax(s_t, n_k, state):
    """Step (5) on a key-major tile of logits: new maxima, the rescale factors
    ``alpha = exp(m - m_new)`` (into ``state[ALPHA]``), the weights ``p = exp(s - m_new)``
    in place of the logits, and ``l = alpha * l + sum p``.

    A row with no allowed key yet (``m_new = -inf``) is shifted by 0, never by
    -inf, so ``-inf - (-inf)`` is never formed and its weights are exactly 0.
    """
    m, l, shift, alpha = state[MAX], state[SUM], state[SHIFT], state[ALPHA]
    width = s_t.shape[1]
    for c in range(width):
        shift[c] = m[c]
    for r in range(n_k):
        for c in range(width):
            shift[c] = max(shift[c], s_t[r, c])
    for c in range(width):
        m_new = shift[c]
        if m_new == -np.inf:
            shift[c] = 0
        alpha[c] = exp_nonpositive(m[c] - shift[c])
        m[c] = m_new
        l[c] *= alpha[c]
    for r in range(n_k):
        for c in range(width):
            p = exp_nonpositive(s_t[r, c] - shift[c])
            s_t[r, c] = p
            l[c] += p


@njit(cache=True)
def keep_tile(t, key_major, n_q, n_k, b, h, i0, j0, has_keep, keep, keep_strides, factor):
    """Step (6) in place on the real entries: ``t * factor`` where the keep-mask
    keeps, 0 where it drops (nothing without a keep-mask)."""
    if not has_keep:
        return
    n_rows, n_cols = real_extent(key_major, n_q, n_k)
    for r in range(n_rows):
        for c in range(n_cols):
            i, j = pair(key_major, i0, j0, r, c)
            t[r, c] = t[r, c] * factor if keep[at(keep_strides, b, h, i, j)] else 0


@njit(cache=True)
def attend_tile(s_t, n_q, n_k, b, h, i0, j0, v_tile, state, acc_t, pv_t, has_keep, keep, keep_strides):
    """Steps (5)-(7) of one key-major tile of logits ``s_t`` against values ``v_tile`` (n_k, Dv):
    the online softmax, the keep-mask, and ``acc = alpha * acc + vᵀ p`` on the
    transposed accumulator ``acc_t`` (Dv, BLOCK_Q). ``s_t`` holds the dropped
    weights afterwards (a mechanism may add a term of its own to ``acc_t``)."""
    online_softmax(s_t, n_k, state)
    keep_tile(s_t, True, n_q, n_k, b, h, i0, j0, has_keep, keep, keep_strides, 1)  # 1 / (1 - p) at the end
    np.dot(v_tile.T, s_t[:n_k], pv_t)  # (Dv, BQ)
    alpha = state[ALPHA]
    for e in range(acc_t.shape[0]):
        for c in range(acc_t.shape[1]):
            acc_t[e, c] = alpha[c] * acc_t[e, c] + pv_t[e, c]


@njit(cache=True)
def finish_rows(acc_t, state, n_q, keep_scale, b, h, i0, out, lse):
    """``out = acc / l * 1/(1-p)`` and ``lse = m + log l`` of queries ``i0 .. i0 + n_q``;
    a row that saw no allowed key (``l = 0``) gets ``out = 0`` and ``lse = -inf``."""
    for c in range(n_q):
        finish_row(acc_t, state, c, keep_scale, b, h, i0 + c, out, lse)


@njit(cache=True)
def finish_row(acc_t, state, c, keep_scale, b, h, i, out, lse):
    """:func:`finish_rows` for one column ``c`` of ``acc_t``, written to row ``i`` of ``out``
    and ``lse``: what a kernel that scatters its rows (a gathered query tile) calls."""
    m, l = state[MAX], state[SUM]
    if l[c] > 0:
        norm = keep_scale / l[c]
        for e in range(acc_t.shape[0]):
            out[b, h, i, e] = acc_t[e, c] * norm
        lse[b, h, i] = m[c] + math.log(l[c])
    else:
        for e in range(acc_t.shape[0]):
            out[b, h, i, e] = 0
        lse[b, h, i] = -np.inf


# --------------------------------------------------------------------------
# The backward on a tile: (7')-(5'), (3'), (2').
# --------------------------------------------------------------------------


@njit(cache=True)
def backward_row_buffer(width, dtype):
    """A (3, width) buffer for :func:`load_rows`."""
    return np.empty((3, width), dtype)


@njit(cache=True)
def load_rows(rows, lse, delta, dlse, b, h, i0, n_q):
    """Fill ``rows`` (3, width) with the rows ``LSE``, ``DELTA``, ``DLSE`` of queries
    ``i0 .. i0 + n_q``, padded (lse +inf on padding, so that P = 0 there)."""
    for c in range(n_q):
        load_row(rows, c, lse, delta, dlse, b, h, i0 + c)
    pad_rows(rows, n_q)


@njit(cache=True)
def load_row(rows, c, lse, delta, dlse, b, h, i):
    """Column ``c`` of ``rows`` (:func:`load_rows`) from query ``i``: what a kernel that
    gathers its query tile calls, then :func:`pad_rows`."""
    rows[LSE, c], rows[DELTA, c], rows[DLSE, c] = lse[b, h, i], delta[b, h, i], dlse[b, h, i]


@njit(cache=True)
def pad_rows(rows, n_q):
    """Columns ``n_q`` on of ``rows``: lse +inf (so that P = 0 there), delta and dlse 0."""
    for c in range(n_q, rows.shape[1]):
        rows[LSE, c], rows[DELTA, c], rows[DLSE, c] = np.inf, 0, 0


@njit(cache=True)
def probabilities(t, key_major, n_q, n_k, rows):
    """Step (5) again: ``P = exp(s - lse)`` in place on the real rows of a tile of
    logits, ``rows`` from :func:`load_rows`."""
    row_lse = rows[LSE]
    if key_major:
        for r in range(n_k):
            for c in range(t.shape[1]):
                t[r, c] = exp_nonpositive(t[r, c] - row_lse[c])
    else:
        for r in range(n_q):
            shift = row_lse[r]
            for c in range(t.shape[1]):
                t[r, c] = exp_nonpositive(t[r, c] - shift)


@njit(cache=True)
def dropped_weights(pz, p, key_major, n_q, n_k, b, h, i0, j0, has_keep, keep, keep_strides, keep_scale):
    """Step (6): ``pz = P * z`` (``z = keep / (1 - p)``) on the real rows of a tile, for (7') ``dv += doutᵀ pz``."""
    n_rows, _ = real_extent(key_major, n_q, n_k)
    for r in range(n_rows):
        for c in range(p.shape[1]):
            pz[r, c] = p[r, c]
    keep_tile(pz, key_major, n_q, n_k, b, h, i0, j0, has_keep, keep, keep_strides, keep_scale)


@njit(cache=True)
def score_grad(ds, p, key_major, n_q, n_k, b, h, i0, j0, rows, has_keep, keep, keep_strides, keep_scale):
    """Steps (6')-(5') in place on a tile ``ds`` holding ``dP`` (``dout · v``, plus any
    term of the mechanism): ``dW = z * dP``, then ``dS = P (dW - delta) + P dlse``."""
    keep_tile(ds, key_major, n_q, n_k, b, h, i0, j0, has_keep, keep, keep_strides, keep_scale)
    delta, dlse = rows[DELTA], rows[DLSE]
    if key_major:
        for r in range(n_k):
            for c in range(ds.shape[1]):
                ds[r, c] = p[r, c] * (ds[r, c] - delta[c]) + p[r, c] * dlse[c]
    else:
        for r in range(n_q):
            row_delta, row_dlse = delta[r], dlse[r]
            for c in range(ds.shape[1]):
                ds[r, c] = p[r, c] * (ds[r, c] - row_delta) + p[r, c] * row_dlse


@njit(cache=True)
def hold_constants(ds, fixed, n_rows, n_cols):
    """``ds = 0`` on the real entries where ``fixed`` (a tile of the same layout) is True: logits
    that a mechanism replaced by a constant (LSH's and routing's self and mask values), which
    no gradient reaches."""
    for r in range(n_rows):
        for c in range(n_cols):
            if fixed[r, c]:
                ds[r, c] = 0


@njit(cache=True)
def softcap_grad(ds, dcap, key_major, n_q, n_k, softcap):
    """Step (2'): ``dscore = dS * sech²(s / c)`` in place on the real entries, with a soft-cap
    (``dcap`` holds nothing on padding, where ``dS`` is 0 and stays 0)."""
    if softcap > 0:
        n_rows, n_cols = real_extent(key_major, n_q, n_k)
        for r in range(n_rows):
            for c in range(n_cols):
                ds[r, c] *= dcap[r, c]


@njit(cache=True)
def add_bias_grad(dbias, ds, n_q, n_k, b, h, i0, j0):
    """Step (3') on a query-major tile: ``dS`` summed into ``dbias`` (the bias's own
    shape, 4-D) over the axes the bias is broadcast along."""
    full_b, full_h, full_q, full_k = dbias.shape[0] > 1, dbias.shape[1] > 1, dbias.shape[2] > 1, dbias.shape[3] > 1
    bb = b if full_b else 0
    bh = h if full_h else 0
    for r in range(n_q):
        bi = i0 + r if full_q else 0
        for c in range(n_k):
            dbias[bb, bh, bi, j0 + c if full_k else 0] += ds[r, c]


@njit(cache=True)
def key_block_items(batch, kv_heads, n_blocks, serial_batch, serial_heads, serial_blocks):
    """(items along batch, along kv heads, along key blocks) of a kernel parallel over
    key blocks; 1 along each axis it must sweep serially (``TileArgs.serial_axes``)."""
    return 1 if serial_batch else batch, 1 if serial_heads else kv_heads, 1 if serial_blocks else n_blocks


@njit(cache=True)
def item_ranges(item_b, item_h, item_k, batch, kv_heads, n_blocks, serial_batch, serial_heads, serial_blocks):
    """The batch, kv head and key block ranges [lo, hi) that work item (item_b, item_h, item_k) walks."""
    b_lo, b_hi = (0, batch) if serial_batch else (item_b, item_b + 1)
    h_lo, h_hi = (0, kv_heads) if serial_heads else (item_h, item_h + 1)
    k_lo, k_hi = (0, n_blocks) if serial_blocks else (item_k, item_k + 1)
    return b_lo, b_hi, h_lo, h_hi, k_lo, k_hi


@njit(cache=True)
def query_blocks(q):
    """Number of work items (b, h, query block) of a kernel parallel over query blocks of ``q`` (B, Hq, Nq, D)."""
    return q.shape[0] * q.shape[1] * ((q.shape[2] + BLOCK_Q - 1) // BLOCK_Q)


@njit(cache=True)
def query_block(item, q, kv_heads):
    """(b, h, kv head, i0, n_q) of work item ``item`` of a kernel parallel over query blocks
    (in :func:`block_order`); query head h reads kv head ``h // (Hq / Hkv)`` (GQA)."""
    q_heads, q_len = q.shape[1], q.shape[2]
    bh, block = block_order(item, (q_len + BLOCK_Q - 1) // BLOCK_Q)
    b, h = bh // q_heads, bh % q_heads
    i0 = block * BLOCK_Q
    return b, h, h // (q_heads // kv_heads), i0, min(BLOCK_Q, q_len - i0)


@njit(cache=True)
def pair_grads(
    s, pz, ds, dv_t, dv_tile, dout_tile, n_q, n_k, b, h, i0, j0, rows,
    has_bias, dbias, has_keep, keep, keep_strides, keep_scale,
):  # fmt: skip
    """Steps (5)-(3') of one query-major (query tile, key block) pair, given its logits in
    ``s`` and ``dP`` (``dout vᵀ``, plus any term of the mechanism) in ``ds``.

    ``P = exp(s - lse)`` into ``s``; (7') ``dv_t += doutᵀ (P z)`` (``dv_t`` (Dv,
    BLOCK_K) transposed, ``dout_tile`` (n_q, Dv); ``pz`` holds ``P z`` with a
    keep-mask); (6')-(5') ``dS`` into ``ds``; (3') ``dS`` into ``dbias``.
    :func:`pair_products` finishes the pair.
    """
    probabilities(s, False, n_q, n_k, rows)
    if has_keep:
        dropped_weights(pz, s, False, n_q, n_k, b, h, i0, j0, has_keep, keep, keep_strides, keep_scale)
        np.dot(dout_tile.T, pz[:n_q], dv_tile)
    else:
        np.dot(dout_tile.T, s[:n_q], dv_tile)
    accumulate(dv_t, dv_tile)
    score_grad(ds, s, False, n_q, n_k, b, h, i0, j0, rows, has_keep, keep, keep_strides, keep_scale)
    if has_bias:
        add_bias_grad(dbias, ds, n_q, n_k, b, h, i0, j0)


@njit(cache=True)
def pair_products(ds, dcap, dk_t, dk_tile, q_tile, n_q, n_k, softcap):
    """(2') ``dscore = dS sech²`` in place, and (1') ``dk_t += q_tileᵀ dscore`` (unscaled),
    for a query-major pair after :func:`pair_grads`."""
    softcap_grad(ds, dcap, False, n_q, n_k, softcap)
    np.dot(q_tile.T, ds[:n_q], dk_tile)
    accumulate(dk_t, dk_tile)


@njit(cache=True)
def forward_buffers(value_dim, dtype):
    """One query block's buffers for the forward: a key-major tile ``s_t`` (logits, then
    weights), its soft-cap derivative ``dcap`` (unused by a forward), the transposed
    unnormalised output ``acc_t`` (Dv, BLOCK_Q) = 0, this tile's ``pv_t`` = vᵀ p, and a
    fresh :func:`softmax_state`."""
    s_t = np.empty((BLOCK_K, BLOCK_Q), dtype)
    dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)
    acc_t = np.zeros((value_dim, BLOCK_Q), dtype)
    pv_t = np.empty((value_dim, BLOCK_Q), dtype)
    return s_t, dcap, acc_t, pv_t, softmax_state(BLOCK_Q, dtype)


@njit(cache=True)
def pair_buffers(head_dim, value_dim, dtype):
    """One thread's buffers for query-major pairs (:func:`pair_grads`, :func:`pair_products`):
    tiles ``s`` (logits, then P), ``dcap``, ``pz`` (P z), ``ds`` (dP, then dS, then dscore),
    one pair's products ``dk_tile`` (D, BLOCK_K) and ``dv_tile`` (Dv, BLOCK_K), and the
    query tile's rows (:func:`load_rows`)."""
    s = np.empty((BLOCK_Q, BLOCK_K), dtype)
    dcap = np.empty((BLOCK_Q, BLOCK_K), dtype)
    pz = np.empty((BLOCK_Q, BLOCK_K), dtype)
    ds = np.empty((BLOCK_Q, BLOCK_K), dtype)
    dk_tile = np.empty((head_dim, BLOCK_K), dtype)
    dv_tile = np.empty((value_dim, BLOCK_K), dtype)
    return s, dcap, pz, ds, dk_tile, dv_tile, backward_row_buffer(BLOCK_Q, dtype)


@njit(cache=True)
def key_block(k, v, b, kvh, block):
    """Key block ``block`` of kv head ``kvh``: its first key ``j0``, its size ``n_k``, its keys
    and values transposed and zero-padded, ``k_t`` (D, BLOCK_K) and ``v_t`` (Dv, BLOCK_K),
    and zeroed accumulators ``dk_t``, ``dv_t`` of the same shapes."""
    j0 = block * BLOCK_K
    n_k = min(BLOCK_K, k.shape[2] - j0)
    k_t = transposed(k, b, kvh, j0, n_k, BLOCK_K)
    v_t = transposed(v, b, kvh, j0, n_k, BLOCK_K)
    return j0, n_k, k_t, v_t, np.zeros_like(k_t), np.zeros_like(v_t)
