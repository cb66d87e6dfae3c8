"""Routing attention (the Routing Transformer) on CPU: Numba kernels.

The "numba" backend of routing attention: ``forward(x)`` and ``vjp(x,
cotangents)`` over the checked inputs of
:func:`refattn.routing.inputs.check_routing_inputs` (the registry checks them
once, whichever backend runs), computing the function of
:mod:`refattn.routing.reference` with the step numbers (1)-(11), (11')-(1') of
spec/routing.md, in O(N·W) memory (W = ``cluster_size``): no (N, N) array and
no (B, H, K, W, M + W) score array ever exists; a cluster's (W, M + W) tile is
the largest thing a work item holds.

Forward
-------
* ``_route_kernel``, steps (1)-(5), parallel over (b, h) (one contiguous run
  of heads per thread, with its scratch): each token's prescaled, normalised
  routing vector (kept only where attention uses it); the similarities of a
  block of ``CENTROID_BLOCK`` centroids to every token (``np.dot``); each
  token's first argmax centroid; and each centroid's ``cluster_size`` members.
  The members are exactly the reference's stable ``argsort(-S)[:cluster_size]``:
  with ``t`` the ``cluster_size``-th largest similarity, a centroid keeps every
  token above ``t`` and then the tokens equal to ``t`` in ascending position
  until it has ``cluster_size``. ``t`` is found by ``np.partition`` among the
  tokens at or above a threshold estimated from a strided sample (every
  token when fewer than ``cluster_size`` reach it), so a centroid costs one pass
  over the row. Scanning the candidates in position order gives the members
  in position order; ``order="similarity"`` re-sorts them by descending
  similarity with a stable merge sort, so ties stay in position order, as
  in the reference.
* ``_attend_kernel``, steps (6)-(10), parallel over (b, h, cluster): the
  cluster's query slots, and its memory then member key/value slots, are
  gathered into tiles; the scores are one ``np.dot`` into a key-major
  (M + W, W) tile, the layout of the shared tile library
  (refattn/core/tiles.py); step (8) sets excluded entries to -inf and
  replaced ones to their constant (marked, for the backward) by the
  reference's rules, self rule included; step (9) is one step of the
  library's online softmax (the tile holds every key of its query slots,
  so one step is the whole softmax); step (10) one more ``np.dot``, and the
  library's ``finish_rows`` divides by the sums and writes each slot's output
  and lse. Each work item writes only its own slots.
* ``_scatter_add_kernel``, step (11), parallel over (b, h): the slots'
  outputs are added into their tokens' rows in (cluster, slot) order, the
  order of the reference's ``np.add.at``; then NumPy divides each row by
  ``count + scatter_eps`` (counts from one ``np.bincount``).

The clusters go through these two kernels ``group`` at a time (:func:`_group`:
as many as fill a buffer of ``SLOT_BUFFER_BYTES``, but enough work items to
keep every thread busy), so the slot buffer between them is (B, H, group,
W, Dv), not (B, H, K, W, Dv): race-free without atomics (each token row
belongs to one (b, h) work item of the scatter), and the memory beyond
inputs and outputs stays that buffer, a few tiles per thread, the routing
vectors attention uses, and the (B, H, K, W) memberships and slot lse.

Backward
--------
The routing is recomputed (the VJP takes no saved state) and held fixed.
``_attend_vjp_kernel``, steps (11')-(7'), parallel over (b, h, cluster),
recomputes the cluster's weights with the forward's own tile code, so its
``P`` is the forward's, and follows the reference's algebra (key-major,
``ᵀ`` as the tiles hold them): ``dP = V dOᵀ``, ``dZ = P (dP - Σ_t P dP)``
(the library's ``score_grad``), zero on constant logits (``hold_constants``),
``dQ = scale dZᵀ K``, ``dK = scale dZ Q``, ``dV = P dO``, into per-slot buffers of one
group of clusters. ``_scatter_add_kernel`` (6') adds them into the tokens'
rows in (cluster, slot) order; the memory slots' gradients are summed over
the batch. ``_normalize_vjp_kernel``, (2')-(1'), takes the queries' and keys'
gradients through the normalisation and the prescale where attention used
routing vectors.

Precision: float64 inputs run in float64; float32, float16 and bfloat16 in
float32 (routing vectors, similarities, tiles, softmax statistics and
accumulators), as the dense kernels. Routing in float32 makes the float64
decisions whenever they have the margins the conformance inputs are drawn
with (:mod:`refattn.routing.problems`). Replaced logits (``mask_value``,
``self_mask_value``) are rounded once to the compute dtype. ``exp`` is the
shared tile library's vectorisable ``exp_nonpositive`` (refattn/core/tiles.py), which flushes weights
below exp(-87) to 0 in float32. The tile products are ``np.dot`` (BLAS)
called from Numba's threads: with tiles of 128 rows and more, set
``OPENBLAS_NUM_THREADS=1`` so that OpenBLAS does not start threads of its
own inside them. Kernels compile on first call (``cache=True`` keeps them
between sessions); importing this module compiles nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from ..core import tiles
from ..core.results import Cotangents, Grads, Result
from ..core.tiles import compute_dtype, frozen
from .inputs import RoutingInputs

# ``query_padding`` as the kernels take it.
QUERY_PADDING_CODES = {"mask_row": 0, "mask_window": 1, "none": 2}
MASK_ROW, NO_QUERY_PADDING = QUERY_PADDING_CODES["mask_row"], QUERY_PADDING_CODES["none"]
#: Codes of step (8)'s rule for masked logits: excluded, replaced by ``mask_value``, or ``mask_value`` added.
EXCLUDE_MASKED, REPLACE_MASKED, ADD_MASKED = 0, 1, 2

# Step (5): the sample that estimates a centroid's selection threshold has this many
# entries per rank of the cluster's share of the row, and the threshold is taken
# CANDIDATE_FACTOR times as far down it (about that many times `cluster_size` candidates).
SAMPLE_PER_RANK = 16
CANDIDATE_FACTOR = 2
CENTROID_BLOCK = 32  # centroids whose similarities to every token are held at once

# The attention kernels take the clusters in groups whose slot buffers fit in
# SLOT_BUFFER_BYTES each, but of at least GROUP_ITEMS (b, h, cluster) work items, so that
# every launch keeps the threads busy and small problems take one launch.
SLOT_BUFFER_BYTES = 16 << 20
GROUP_ITEMS = 64

# --------------------------------------------------------------------------
# The backend: forward and VJP over checked inputs (refattn/core/registry.py).
# --------------------------------------------------------------------------


def forward(x: RoutingInputs) -> Result:
    """Steps (1)-(11), per-cluster tiles: ``out`` (B, H, N, Dv) in the compute dtype (float32 for
    float32/float16/bfloat16 ``q``, float64 otherwise), ``lse`` None, and the reference's ``aux``:
    ``slot_lse`` (B, H, K, W) in the compute dtype, ``membership``, ``key_membership`` (B, H, K, W),
    ``assignment``, ``key_assignment``, ``counts`` (B, H, N) int64 and ``unrouted`` (B, H, N) bool."""
    a = _Arrays.build(x)
    # (1)-(5) Routing vectors, nearest centroids, balanced memberships.
    routed = _route(x, a)
    b, h, n, dv = a.v.shape
    clusters, dtype, size = a.centroids.shape[1], a.q.dtype, x.cluster_size
    out = np.zeros((b, h, n, dv), dtype)  # (B, H, N, Dv): sums of slot outputs, then their means
    slot_lse = np.empty((b, h, clusters, size), dtype)  # (B, H, K, W)
    membership, key_membership = frozen(routed.membership), frozen(routed.key_membership)
    group = _group(b * h, clusters, size * dv * dtype.itemsize)
    slot_out = np.empty((b, h, group, size, dv), dtype)  # (B, H, group, W, Dv)
    for first in range(0, clusters, group):
        count = min(group, clusters - first)
        # (6)-(10) Attention inside clusters first ... first + count.
        _attend_kernel(routed.attend_q, routed.attend_k, a.v, a.mem_k, a.mem_v, membership, key_membership,
                       *a.logits(), first, count, slot_out, slot_lse)  # fmt: skip
        # (11) Scatter back: each token's slots summed ...
        _scatter_add_kernel(frozen(slot_out), membership, first, count, 0, out)
    # ... over count + scatter_eps; unrouted tokens stay 0.
    counts = _counts(routed.membership, n)
    np.divide(out, (counts + x.scatter_eps).astype(dtype)[..., None], out=out, where=counts[..., None] > 0)
    aux = dict(
        membership=routed.membership, key_membership=routed.key_membership, assignment=routed.assignment,
        key_assignment=routed.key_assignment, counts=counts, unrouted=counts == 0, slot_lse=slot_lse,
    )  # fmt: skip
    return Result(out=out, lse=None, aux=aux)


def vjp(x: RoutingInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (11')-(1'), routing recomputed and held fixed: ``q``, ``k``, ``v``, and ``mem_k``, ``mem_v``
    when given, in the compute dtype. ``saved`` is not used: the backward recomputes each cluster's
    weights with the forward's tile code, which is cheaper than keeping them."""
    a = _Arrays.build(x)
    b, h, n, dv = a.v.shape
    clusters, size = a.centroids.shape[1], x.cluster_size
    dtype, d, memory = a.q.dtype, a.q.shape[3], a.mem_k.shape[2]
    # (1)-(5) The routing, recomputed and held fixed.
    routed = _route(x, a)
    membership, key_membership = frozen(routed.membership), frozen(routed.key_membership)
    counts = frozen(_counts(routed.membership, n))  # (B, H, N)
    dout = _contiguous(cotangents.dout, dtype)  # (B, H, N, Dv)
    dq, dk, d_v = np.zeros((b, h, n, d), dtype), np.zeros((b, h, n, d), dtype), np.zeros((b, h, n, dv), dtype)
    d_mem_k = np.empty((h, clusters, memory, d), dtype)  # (H, K, M, D)
    d_mem_v = np.empty((h, clusters, memory, dv), dtype)
    group = _group(b * h, clusters, (memory + size) * max(d, dv) * dtype.itemsize)
    d_q_slots = np.empty((b, h, group, size, d), dtype)  # (B, H, group, W, D)
    d_k_slots = np.empty((b, h, group, memory + size, d), dtype)  # (B, H, group, M + W, D)
    d_v_slots = np.empty((b, h, group, memory + size, dv), dtype)  # (B, H, group, M + W, Dv)
    for first in range(0, clusters, group):
        count = min(group, clusters - first)
        # (11')-(7') The slots' gradients in clusters first ... first + count.
        _attend_vjp_kernel(
            routed.attend_q, routed.attend_k, a.v, a.mem_k, a.mem_v, membership, key_membership,
            *a.logits(), dout, counts, a.real(x.scatter_eps), first, count, d_q_slots, d_k_slots, d_v_slots,
        )  # fmt: skip
        # (6') The gathers' adjoints: scatter-adds into the tokens' rows; memory is shared by the batch.
        _scatter_add_kernel(frozen(d_q_slots), membership, first, count, 0, dq)
        _scatter_add_kernel(frozen(d_k_slots), key_membership, first, count, memory, dk)
        _scatter_add_kernel(frozen(d_v_slots), key_membership, first, count, memory, d_v)
        d_mem_k[:, first : first + count] = d_k_slots[:, :, :count, :memory].sum(axis=0)
        d_mem_v[:, first : first + count] = d_v_slots[:, :, :count, :memory].sum(axis=0)
    # (2')-(1') Through the normalisation and the prescale, where attention used routing vectors.
    layer, eps = x.routing_norm == "layer", a.real(x.norm_eps)
    if x.attend_on == "normalized":
        _normalize_vjp_kernel(dq, routed.r_q, routed.q_stat, layer, eps, a.real(x.query_prescale))
    if x.normalized_keys:
        _normalize_vjp_kernel(dk, routed.r_k, routed.k_stat, layer, eps, a.real(x.key_prescale))
    grads = Grads(q=dq, k=dk, v=d_v)
    if x.mem_k is not None:
        grads.update(mem_k=d_mem_k, mem_v=d_mem_v)
    return grads


def _group(heads: int, clusters: int, slot_bytes: int) -> int:
    """Clusters per launch of the attention kernels, for ``heads`` = B·H and a cluster's slots
    taking ``slot_bytes`` in a buffer (``SLOT_BUFFER_BYTES``, ``GROUP_ITEMS``)."""
    return min(clusters, max(SLOT_BUFFER_BYTES // (heads * slot_bytes), -(-GROUP_ITEMS // heads)))


# --------------------------------------------------------------------------
# What the kernels are given.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arrays:
    """Checked inputs in the compute dtype, and the logit rules of steps (7)-(8).

    Arrays are C-contiguous and read-only (one Numba type per dtype). Absent
    memory is an (H, K, 0, ·) array; an absent padding mask a (1, 1)
    placeholder with ``has_valid`` False; an absent ``mask_value`` a 0 with
    ``mask_rule`` EXCLUDE_MASKED, an absent ``self_mask_value`` a 0 with ``has_self_value`` False.
    """

    q: np.ndarray  # (B, H, N, D)
    k: np.ndarray  # (B, H, N, D)
    v: np.ndarray  # (B, H, N, Dv)
    centroids: np.ndarray  # (H, K, D)
    mem_k: np.ndarray  # (H, K, M, D), M >= 0
    mem_v: np.ndarray  # (H, K, M, Dv)
    scale: np.floating
    causal: bool
    by_slot: bool
    has_valid: bool
    valid: np.ndarray  # (B, N) bool, True = real token
    query_padding: int
    self_mask: bool
    mask_rule: int
    mask_value: np.floating
    has_self_value: bool
    self_value: np.floating

    @staticmethod
    def build(x: RoutingInputs) -> _Arrays:
        dtype = compute_dtype(x.q)
        real = dtype.type
        heads, clusters, head_dim = x.centroids.shape
        no_memory = x.mem_k is None
        return _Arrays(
            q=_contiguous(x.q, dtype),
            k=_contiguous(x.k, dtype),
            v=_contiguous(x.v, dtype),
            centroids=_contiguous(x.centroids, dtype),
            mem_k=_contiguous(np.zeros((heads, clusters, 0, head_dim)) if no_memory else x.mem_k, dtype),
            mem_v=_contiguous(np.zeros((heads, clusters, 0, x.v.shape[3])) if no_memory else x.mem_v, dtype),
            scale=real(x.scale),
            causal=x.causal,
            by_slot=x.causal_by == "slot",
            has_valid=x.key_padding_mask is not None,
            valid=_contiguous(np.ones((1, 1), np.bool_) if x.key_padding_mask is None else x.key_padding_mask, np.bool_),
            query_padding=QUERY_PADDING_CODES[x.query_padding],
            self_mask=x.shared_qk and x.self_mask,
            mask_rule=EXCLUDE_MASKED if x.mask_value is None else (ADD_MASKED if x.mask_mode == "add" else REPLACE_MASKED),
            mask_value=real(0.0 if x.mask_value is None else x.mask_value),
            has_self_value=x.self_mask_value is not None,
            self_value=real(0.0 if x.self_mask_value is None else x.self_mask_value),
        )

    def real(self, value: float) -> np.floating:
        """``value`` in the compute dtype."""
        return self.q.dtype.type(value)

    def logits(self) -> tuple:
        """Arguments of steps (7)-(8), in the kernels' order."""
        return (self.scale, self.causal, self.by_slot, self.has_valid, self.valid, self.query_padding, self.self_mask,
                self.mask_rule, self.mask_value, self.has_self_value, self.self_value)  # fmt: skip


def _contiguous(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` as a read-only C-contiguous array of ``dtype`` (no copy when it already is one)."""
    return frozen(np.ascontiguousarray(x, dtype=dtype))


@dataclass(frozen=True)
class _Routing:
    """Steps (1)-(6) of one call: decisions (writable, as ``aux`` returns them), and the vectors
    attention uses (read-only).

    ``r_q``, ``q_stat`` (``r_k``, ``k_stat``) are the routing vectors and their
    statistic, 1/sqrt(var + eps) (layer) or max(|x|, eps) (l2), where attention
    uses them, else (1, 1, 1, 1) and (1, 1, 1) placeholders.
    """

    r_q: np.ndarray  # (B, H, N, D)
    q_stat: np.ndarray  # (B, H, N)
    r_k: np.ndarray  # (B, H, N, D)
    k_stat: np.ndarray  # (B, H, N)
    membership: np.ndarray  # (B, H, K, W) int64
    key_membership: np.ndarray  # (B, H, K, W) int64; membership itself under shared-QK
    assignment: np.ndarray  # (B, H, N) int64
    key_assignment: np.ndarray  # (B, H, N) int64
    attend_q: np.ndarray  # (B, H, N, D): r_q or q
    attend_k: np.ndarray  # (B, H, N, D): r_k or k


def _route(x: RoutingInputs, a: _Arrays) -> _Routing:
    """Steps (1)-(5), and the choice of step (6) of what attention uses."""
    b, h, n, d = a.q.shape
    clusters, dtype = a.centroids.shape[1], a.q.dtype
    keep_q, keep_k = x.attend_on == "normalized", x.normalized_keys

    def vectors(keep: bool):
        return (np.empty((b, h, n, d), dtype), np.empty((b, h, n), dtype)) if keep else \
            (np.empty((1, 1, 1, 1), dtype), np.empty((1, 1, 1), dtype))  # fmt: skip

    (r_q, q_stat), (r_k, k_stat) = vectors(keep_q), vectors(keep_k)
    membership = np.empty((b, h, clusters, x.cluster_size), np.int64)
    assignment = np.empty((b, h, n), np.int64)
    # Under shared-QK the keys are routed by the queries: one set of decisions.
    key_membership = membership if x.shared_qk else np.empty_like(membership)
    key_assignment = assignment if x.shared_qk else np.empty_like(assignment)
    lanes = min(numba.get_num_threads(), b * h)
    _route_kernel(
        a.q, a.k, a.centroids, a.real(x.query_prescale), a.real(x.key_prescale), x.routing_norm == "layer",
        a.real(x.norm_eps), x.shared_qk, x.cluster_size, x.order == "similarity", keep_q, keep_k, lanes,
        r_q, q_stat, r_k, k_stat, membership, assignment, key_membership, key_assignment,
    )  # fmt: skip
    r_q, r_k = frozen(r_q), frozen(r_k)
    return _Routing(
        r_q=r_q, q_stat=frozen(q_stat), r_k=r_k, k_stat=frozen(k_stat), membership=membership,
        key_membership=key_membership, assignment=assignment, key_assignment=key_assignment,
        attend_q=r_q if keep_q else a.q, attend_k=r_k if keep_k else a.k,
    )  # fmt: skip


def _counts(membership: np.ndarray, length: int) -> np.ndarray:
    """How many query lists hold each token, (B, H, N) int64."""
    b, h = membership.shape[:2]
    flat = membership.reshape(b * h, -1) + (np.arange(b * h, dtype=np.int64) * length)[:, None]
    return np.bincount(flat.ravel(), minlength=b * h * length).astype(np.int64).reshape(b, h, length)


# --------------------------------------------------------------------------
# Routing: steps (1)-(5).
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _route_kernel(
    q, k, centroids, q_prescale, k_prescale, layer, eps, shared_qk, cluster_size, by_similarity, keep_q, keep_k, lanes,
    r_q, q_stat, r_k, k_stat, membership, assignment, key_membership, key_assignment,
):  # fmt: skip
    """Routing vectors and their statistics (written where ``keep_*``), nearest centroids and
    memberships; parallel over (b, h) in ``lanes`` contiguous runs, each with its own scratch
    (a head's routing vectors when nobody keeps them, a block of similarities, selection buffers).
    Under ``shared_qk`` the key decisions are not written (the caller passes the query arrays)."""
    batch, heads, length, dim = q.shape
    items, dtype = batch * heads, q.dtype
    for lane in prange(lanes):
        vectors = np.empty((length, dim), dtype)  # routing vectors nobody keeps, and their statistic
        vector_stat = np.empty(length, dtype)
        similarity = np.empty((min(CENTROID_BLOCK, centroids.shape[1]), length), dtype)
        best, values, positions = np.empty(length, dtype), np.empty(length, dtype), np.empty(length, np.int64)
        for item in range(lane * items // lanes, (lane + 1) * items // lanes):
            b, h = item // heads, item % heads
            # (1)-(5) for the queries, then the keys (routed by the queries under shared-QK).
            r, stat = (r_q[b, h], q_stat[b, h]) if keep_q else (vectors, vector_stat)
            _normalize_rows(q[b, h], q_prescale, layer, eps, r, stat)
            _assign(r, centroids[h], cluster_size, by_similarity, membership[b, h], assignment[b, h],
                    similarity, best, values, positions)  # fmt: skip
            if keep_k or not shared_qk:
                r, stat = (r_k[b, h], k_stat[b, h]) if keep_k else (vectors, vector_stat)
                _normalize_rows(k[b, h], k_prescale, layer, eps, r, stat)
                if not shared_qk:
                    _assign(r, centroids[h], cluster_size, by_similarity, key_membership[b, h], key_assignment[b, h],
                            similarity, best, values, positions)  # fmt: skip


@njit(cache=True)
def _normalize_rows(x, prescale, layer, eps, r, stat):
    """Steps (1)-(2) on the rows of ``x`` (N, D): ``r = normalize(prescale · x)`` and its statistic (N,)."""
    length, dim = x.shape
    real = r.dtype.type
    zero, count = real(0.0), real(dim)
    scaled = np.empty(dim, r.dtype)
    for n in range(length):
        for e in range(dim):
            scaled[e] = prescale * x[n, e]
        if layer:
            # r = (x - mean) / sqrt(var + eps), biased variance; statistic 1 / sqrt(var + eps).
            total = zero
            for e in range(dim):
                total += scaled[e]
            mean = total / count
            squares = zero
            for e in range(dim):
                centred = scaled[e] - mean
                squares += centred * centred
            inv_std = real(1.0) / math.sqrt(squares / count + eps)
            for e in range(dim):
                r[n, e] = (scaled[e] - mean) * inv_std
            stat[n] = inv_std
        else:
            # r = x / max(|x|, eps); statistic max(|x|, eps).
            squares = zero
            for e in range(dim):
                squares += scaled[e] * scaled[e]
            denominator = max(math.sqrt(squares), eps)
            for e in range(dim):
                r[n, e] = scaled[e] / denominator
            stat[n] = denominator


@njit(cache=True)
def _assign(r, centroids, cluster_size, by_similarity, members, nearest, similarity, best, values, positions):
    """Steps (3)-(5) for one head: ``r`` (N, D), ``centroids`` (K, D); writes ``members`` (K, W) and
    ``nearest`` (N,). Centroids are taken ``CENTROID_BLOCK`` at a time into ``similarity``
    (CENTROID_BLOCK, N); ``best``, ``values`` (N,) and ``positions`` (N,) int64 are scratch."""
    length = r.shape[0]
    clusters = centroids.shape[0]
    best[:] = -np.inf
    for c0 in range(0, clusters, CENTROID_BLOCK):
        block = min(CENTROID_BLOCK, clusters - c0)
        # (3) Similarities S[c, n] = r_n · μ_c, one row per centroid.
        np.dot(centroids[c0 : c0 + block], r.T, similarity[:block])
        for j in range(block):
            row = similarity[j]
            # (4) Nearest centroid: a strictly larger similarity moves it, so ties go to the lower index.
            for n in range(length):
                better = row[n] > best[n]
                best[n] = row[n] if better else best[n]
                nearest[n] = c0 + j if better else nearest[n]
            # (5) The centroid's top-`cluster_size`, in `order`.
            _top_members(row, cluster_size, by_similarity, members[c0 + j], values, positions)


@njit(cache=True)
def _top_members(row, cluster_size, by_similarity, out, values, positions):
    """The ``cluster_size`` tokens of largest ``row`` (N,), ties to the lower position, into ``out`` (W,).

    The reference's stable ``argsort(-row)[:cluster_size]``: with ``t`` the
    ``cluster_size``-th largest value, every token above ``t`` and the first tokens
    equal to ``t``; in ascending position, or by descending similarity
    (stable: ties keep position order). ``t`` is found among candidates
    (:func:`_candidates`), every token at or above a threshold that at least
    ``cluster_size`` tokens reach, so ``t`` and every token at or above it are among
    them; ``values`` and ``positions`` (N,) are scratch.
    """
    count = _candidates(row, cluster_size, values, positions)
    threshold = np.partition(values[:count], count - cluster_size)[count - cluster_size]
    above = 0
    for i in range(count):
        if values[i] > threshold:
            above += 1
    ties_left = cluster_size - above
    filled = 0
    for i in range(count):
        if values[i] > threshold or (values[i] == threshold and ties_left > 0):
            if values[i] == threshold:
                ties_left -= 1
            out[filled] = positions[i]
            filled += 1
    if by_similarity:
        negated = np.empty(cluster_size, row.dtype)
        for s in range(cluster_size):
            negated[s] = -row[out[s]]
        ranked = out[np.argsort(negated, kind="mergesort")]
        out[:] = ranked


@njit(cache=True)
def _candidates(row, cluster_size, values, positions):
    """The tokens of ``row`` (N,) at or above an estimated threshold, in position order, into
    ``values``/``positions``; returns their count, at least ``cluster_size``.

    The threshold is the value ``CANDIDATE_FACTOR`` times as far down a strided sample as
    ``cluster_size`` is down the row, so about that many times ``cluster_size`` tokens reach it; one pass
    then collects them. Where fewer than ``cluster_size`` do, or the cluster is a large part of
    the row, every token is a candidate: the result is exact either way.
    """
    length = row.shape[0]
    sample_size = SAMPLE_PER_RANK * length // cluster_size
    count = 0
    if sample_size * 2 <= length:
        stride = length // sample_size
        sample = row[::stride].copy()
        rank = min(sample.shape[0], CANDIDATE_FACTOR * SAMPLE_PER_RANK)
        estimate = np.partition(sample, sample.shape[0] - rank)[sample.shape[0] - rank]
        for n in range(length):
            if row[n] >= estimate:
                values[count] = row[n]
                positions[count] = n
                count += 1
    if count < cluster_size:
        for n in range(length):
            values[n] = row[n]
            positions[n] = n
        count = length
    return count


# --------------------------------------------------------------------------
# Attention inside a cluster: steps (6)-(10), shared by forward and backward.
# --------------------------------------------------------------------------


@njit(cache=True)
def _gather(x, b, h, tokens, tile, first):
    """Rows ``tokens`` of ``x[b, h]`` into ``tile[first:]``."""
    for s in range(tokens.shape[0]):
        tile[first + s] = x[b, h, tokens[s]]


@njit(cache=True)
def _mask_tile(
    logits_t, constant_t, members, key_members, n_memory, b,
    causal, by_slot, has_valid, valid, query_padding, self_mask, mask_rule, mask_value, has_self_value, self_value,
):  # fmt: skip
    """Step (8) in place on a cluster's key-major (M + W, W) tile of scores: excluded entries become
    -inf, replaced ones their constant, marked in ``constant_t``; returns whether any was replaced.

    Window key ``t`` of query slot ``s`` is masked when causal (a later position,
    or ``t > s`` by slot), when its token is padded, or when the query is padded
    and ``query_padding`` is not "none"; memory keys only for a padded query under
    "mask_row". Masked entries are excluded, replaced by ``mask_value``, or get it added (``mask_rule``). The
    self key (``self_mask``) gets ``self_value`` after every other mask, or, by
    the Reformer rule, is excluded when the row has another real logit.
    """
    constant_t[:] = False
    if not (causal or has_valid or self_mask):
        return False
    neg_inf = logits_t.dtype.type(-np.inf)
    replaced = False
    cluster_size = members.shape[0]
    for s in range(cluster_size):
        query = members[s]
        query_real = valid[b, query] if has_valid else True
        self_slot = -1
        has_other = False
        for t in range(n_memory + cluster_size):
            if t < n_memory:
                masked = has_valid and not query_real and query_padding == MASK_ROW
            else:
                key = key_members[t - n_memory]
                masked = causal and ((t - n_memory > s) if by_slot else (key > query))
                if has_valid and (not valid[b, key] or (not query_real and query_padding != NO_QUERY_PADDING)):
                    masked = True
                if self_mask and key == query:
                    self_slot = t
            if not masked:
                has_other = has_other or t != self_slot
            elif mask_rule == ADD_MASKED:
                logits_t[t, s] += mask_value
            elif mask_rule == REPLACE_MASKED:
                logits_t[t, s] = mask_value
                constant_t[t, s] = replaced = True
            else:
                logits_t[t, s] = neg_inf
        if self_slot >= 0:
            if has_self_value:
                logits_t[self_slot, s] = self_value
                constant_t[self_slot, s] = replaced = True
            elif has_other:
                logits_t[self_slot, s] = neg_inf
                constant_t[self_slot, s] = False
    return replaced


@njit(cache=True)
def _cluster_weights(
    attend_q, attend_k, v, mem_k, mem_v, membership, key_membership, b, h, c,
    scale, causal, by_slot, has_valid, valid, query_padding, self_mask, mask_rule, mask_value,
    has_self_value, self_value, state,
):  # fmt: skip
    """Steps (6)-(9) for cluster ``c`` of (b, h): its query, key and value tiles, unnormalised weights and
    replaced logits. The tile holds every key of its query slots, so one step of the online softmax
    (refattn/core/tiles.py) is the whole softmax: ``state`` (a fresh ``tiles.softmax_state(W)``)
    ends with each slot's maximum ``m`` and sum ``l``, and the weights are ``exp(z - m)``.

    Returns
    -------
    queries (W, D), keys (M + W, D), values (M + W, Dv), weights_t (M + W, W) key-major,
    constant_t (M + W, W) bool, and whether any entry is constant.
    """
    members, key_members = membership[b, h, c], key_membership[b, h, c]
    cluster_size, n_memory = members.shape[0], mem_k.shape[2]
    dtype = attend_q.dtype
    # (6) Gather: memory slots first on the key axis.
    queries = np.empty((cluster_size, attend_q.shape[3]), dtype)
    keys = np.empty((n_memory + cluster_size, attend_k.shape[3]), dtype)
    values = np.empty((n_memory + cluster_size, v.shape[3]), dtype)
    _gather(attend_q, b, h, members, queries, 0)
    keys[:n_memory] = mem_k[h, c]
    values[:n_memory] = mem_v[h, c]
    _gather(attend_k, b, h, key_members, keys, n_memory)
    _gather(v, b, h, key_members, values, n_memory)
    # (7) Scores, scaled (no soft-cap: the second tile, its derivative, is not written).
    weights_t = np.dot(keys, queries.T)  # (M + W, W)
    tiles.scale_and_cap(weights_t, weights_t, True, cluster_size, n_memory + cluster_size, scale, 0)
    # (8) Masks; (9) softmax.
    constant_t = np.empty((n_memory + cluster_size, cluster_size), np.bool_)
    replaced = _mask_tile(
        weights_t, constant_t, members, key_members, n_memory, b,
        causal, by_slot, has_valid, valid, query_padding, self_mask, mask_rule, mask_value, has_self_value, self_value,
    )  # fmt: skip
    tiles.online_softmax(weights_t, n_memory + cluster_size, state)
    return queries, keys, values, weights_t, constant_t, replaced


@njit(parallel=True, cache=True, fastmath=False)
def _attend_kernel(
    attend_q, attend_k, v, mem_k, mem_v, membership, key_membership,
    scale, causal, by_slot, has_valid, valid, query_padding, self_mask, mask_rule, mask_value,
    has_self_value, self_value,
    first, count, slot_out, slot_lse,
):  # fmt: skip
    """Steps (6)-(10) for clusters ``first ... first + count``: their slots' outputs into
    ``slot_out[:, :, :count]`` (B, H, group, W, Dv) and their rows of ``slot_lse`` (B, H, K, W);
    parallel over (b, h, cluster)."""
    batch, heads, _, cluster_size = membership.shape
    one = slot_out.dtype.type(1.0)
    for item in prange(batch * heads * count):
        b, h, j = item // (heads * count), (item // count) % heads, item % count
        state = tiles.softmax_state(cluster_size, slot_out.dtype)
        _, _, values, weights_t, _, _ = _cluster_weights(
            attend_q, attend_k, v, mem_k, mem_v, membership, key_membership, b, h, first + j,
            scale, causal, by_slot, has_valid, valid, query_padding, self_mask, mask_rule, mask_value,
            has_self_value, self_value, state,
        )  # fmt: skip
        # (10) Weighted values: vᵀ exp(z - m), over l; lse = m + log l (a slot without keys: 0 and -inf).
        acc_t = np.dot(values.T, weights_t)  # (Dv, W)
        tiles.finish_rows(acc_t, state, cluster_size, one, b, h, 0, slot_out[:, :, j], slot_lse[:, :, first + j])


@njit(parallel=True, cache=True)
def _scatter_add_kernel(slots, tokens, first, count, skip, target):
    """Steps (11) and (6'): ``target[b, h, tokens[b, h, first + j, s]] += slots[b, h, j, skip + s]`` for
    ``j < count``, in (cluster, slot) order; parallel over (b, h), which own their rows of ``target``."""
    batch, heads, _, cluster_size = tokens.shape
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        for j in range(count):
            for s in range(cluster_size):
                row, slot = target[b, h, tokens[b, h, first + j, s]], slots[b, h, j, skip + s]
                for e in range(row.shape[0]):
                    row[e] += slot[e]


# --------------------------------------------------------------------------
# Backward: steps (11')-(1').
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _attend_vjp_kernel(
    attend_q, attend_k, v, mem_k, mem_v, membership, key_membership,
    scale, causal, by_slot, has_valid, valid, query_padding, self_mask, mask_rule, mask_value,
    has_self_value, self_value,
    dout, counts, eps, first, count, d_q_slots, d_k_slots, d_v_slots,
):  # fmt: skip
    """Steps (11')-(7') for clusters ``first ... first + count``, parallel over (b, h, cluster):
    the gradients of their query slots into ``d_q_slots[:, :, :count]`` (B, H, group, W, D), and
    of their memory and member key/value slots into ``d_k_slots``, ``d_v_slots`` (B, H, group, M + W, ·)."""
    batch, heads, _, cluster_size = membership.shape
    dtype = dout.dtype
    no_keep, no_strides, one = np.zeros(1, np.bool_), (0, 0, 0, 0), dtype.type(1.0)  # routing has no dropout
    for item in prange(batch * heads * count):
        b, h, j = item // (heads * count), (item // count) % heads, item % count
        c = first + j
        members = membership[b, h, c]
        state = tiles.softmax_state(cluster_size, dtype)
        queries, keys, values, weights_t, constant_t, replaced = _cluster_weights(
            attend_q, attend_k, v, mem_k, mem_v, membership, key_membership, b, h, c,
            scale, causal, by_slot, has_valid, valid, query_padding, self_mask, mask_rule, mask_value,
            has_self_value, self_value, state,
        )  # fmt: skip
        n_keys = weights_t.shape[0]
        _normalize_columns(weights_t, state)  # P (M + W, W)
        # (11') Each slot receives its token's cotangent over count + eps (count >= 1).
        d_slot_out = np.empty((cluster_size, dout.shape[3]), dtype)
        for s in range(cluster_size):
            token = members[s]
            denominator = dtype.type(counts[b, h, token]) + eps
            for e in range(dout.shape[3]):
                d_slot_out[s, e] = dout[b, h, token, e] / denominator
        # (10') dV = P dO, dP = V dOᵀ (key-major).
        np.dot(weights_t, d_slot_out, d_v_slots[b, h, j])
        d_scores_t = np.dot(values, d_slot_out.T)  # (M + W, W): dP, then dZ
        # (9') dZ = P (dP - Σ_t P dP); (8') none through replaced logits.
        rows = tiles.backward_row_buffer(cluster_size, dtype)
        rows[:] = 0  # no dLSE (routing returns no lse)
        delta = rows[tiles.DELTA]
        for t in range(n_keys):
            for s in range(cluster_size):
                delta[s] += weights_t[t, s] * d_scores_t[t, s]
        tiles.score_grad(d_scores_t, weights_t, True, cluster_size, n_keys, b, h, 0, 0, rows,
                         False, no_keep, no_strides, one)  # fmt: skip
        if replaced:
            tiles.hold_constants(d_scores_t, constant_t, n_keys, cluster_size)
        # (7') dQ = scale dZᵀ K, dK = scale dZ Q.
        d_q, d_k = d_q_slots[b, h, j], d_k_slots[b, h, j]
        np.dot(d_scores_t.T, keys, d_q)
        np.dot(d_scores_t, queries, d_k)
        for s in range(d_q.shape[0]):
            for d in range(d_q.shape[1]):
                d_q[s, d] = scale * d_q[s, d]
        for t in range(d_k.shape[0]):
            for d in range(d_k.shape[1]):
                d_k[t, d] = scale * d_k[t, d]


@njit(cache=True)
def _normalize_columns(weights_t, state):
    """Step (9), finished: ``P = exp(z - m) / l`` in place, on a key-major tile that holds every key
    of its query slots (``state`` from its one online-softmax step); a slot without keys stays 0."""
    inverse = np.zeros(weights_t.shape[1], weights_t.dtype)
    for s in range(weights_t.shape[1]):
        if state[tiles.SUM, s] > 0:
            inverse[s] = 1 / state[tiles.SUM, s]
    for t in range(weights_t.shape[0]):
        for s in range(weights_t.shape[1]):
            weights_t[t, s] *= inverse[s]


@njit(parallel=True, cache=True)
def _normalize_vjp_kernel(dx, r, stat, layer, eps, prescale):
    """Steps (2')-(1') in place on ``dx`` (B, H, N, D), holding ``dr``: ``dx = prescale · normalize_vjp(dr)``;
    parallel over (b, h).

    Layer norm: ``s (dr - mean(dr) - r mean(dr r))``; L2: ``(dr - r (r · dr)) / |x|``, or
    ``dr / eps`` where the norm was clamped.
    """
    batch, heads, length, dim = dx.shape
    real = dx.dtype.type
    zero, count = real(0.0), real(dim)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        for n in range(length):
            row, vector, s = dx[b, h, n], r[b, h, n], stat[b, h, n]
            along = zero
            for e in range(dim):
                along += row[e] * vector[e]
            if layer:
                total = zero
                for e in range(dim):
                    total += row[e]
                mean, along = total / count, along / count
                for e in range(dim):
                    row[e] = prescale * (s * (row[e] - mean - vector[e] * along))
            else:
                if s <= eps:
                    along = zero
                for e in range(dim):
                    row[e] = prescale * ((row[e] - vector[e] * along) / s)
