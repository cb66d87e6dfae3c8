"""LSH attention (Reformer) on CPU: Numba kernels.

The same function as :mod:`refattn.lsh.reference`, with its names and the
step numbers (1)-(12) of spec/lsh.md, computed in O(N·chunk_len) memory: no
(N, N) and no (chunks, L, window) array ever exists. The backend of
``lsh_attention(..., backend="numba")``: :func:`forward` and :func:`vjp` take
the inputs :func:`refattn.lsh.inputs.check_lsh_inputs` checked, so bad input is
rejected identically whichever backend runs.

Forward
-------
* ``_hash_kernel``, steps (1)-(3), parallel over (b, h, round, block of
  ``TOKEN_BLOCK`` tokens): the block's rotated vectors ``x · Rot_r`` are one
  ``np.dot``; each factor's bucket is the first argmax of ``[y, -y]``.
* ``_sort_kernel``, step (4), parallel over (b, h): a counting sort of the
  ``R·N`` items by bucket id, scanning items in order, is stable, so equal
  buckets keep item (= position) order; when the bucket ids far outnumber
  the items (huge factorised counts), a merge sort of the ids, also stable.
* ``_norm_kernel``, step (6): ``ρ`` of every token; keys ``u = x / ρ`` are
  formed as the tokens are gathered.
* ``_forward_kernel``, steps (5), (7)-(11), parallel over (b, h, run): a
  *run* is ``S`` consecutive chunks. Its work item gathers, once, the tokens
  of chunks ``c0 - before … c1 - 1 + after`` (modulo the number of chunks
  ``C``; a chunk that recurs in the window is gathered again) into tiles of
  raw ``x``, keys and values, since every window of the run lies in that
  range; then each query chunk meets the ``K = before + after + 1`` tiles of
  its window, in order, with FlashAttention's online softmax over (keys x
  queries) tiles: the shared tile library's ``attend_tile`` per tile and
  ``finish_row`` per query (refattn/core/tiles.py), around LSH's own logits
  (``_logits_tile``: self pairs, masks, the duplicate correction). Gathering once per
  run, in one tight loop, rather than ``2K + 1`` times per chunk between
  products, is what keeps random access to the (B, H, N, ·) inputs from
  dominating at long N. Each slot's output and log-sum-exp are written at
  its *item* ``r·N + n``: the unsort of step (11) is that scatter through a
  permutation, so no two work items write the same row.
* ``_combine_kernel``, step (12), parallel over (b, h, token block).

Backward
--------
The rounds' weights fold into the chunk softmax. With ``w_{r,i} =
exp(lse_{r,i} - LSE_i)`` (12') and ``P`` step (10)'s weights,
``w · P_{t t'} = exp(z_{ij} - LSE_i) =: P̃_{ij}``, and (10')-(12') become::

    dv_j += P̃_ij dout_i                         (every occurrence of j)
    ds_ij = P̃_ij (dout_i · v_j - dout_i · out_i + dLSE_i)   where z_ij is the score
    dq_i += scale ds_ij u_j,   du_j += scale ds_ij x_i

(the ``dout_i · o_r`` terms of ``dlse_r`` and of the softmax's row sum
cancel), so the backward needs only the combined ``out`` and ``LSE``: those
of ``saved`` (this backend's forward) when the caller passes it, otherwise
recomputed with the forward kernels. Hashing and sorting run again either way.

``_backward_kernel`` works per run as the forward does, with the tile
library's pieces on key-major tiles (``probabilities``, ``score_grad``,
``hold_constants`` for replaced logits, ``accumulate``), accumulating in its
tiles each query's ``dq``, each key's ``dv`` and its key gradient through
the normalisation (6') ``(du - u (u · du)) / ρ`` (linear in ``du``, so it
applies to each contribution; the common factor ``scale`` of ``dq`` and
``dx`` is applied once, at the end); at the end it adds every tile row into the
row of its item in (B, H, R·N, ·) buffers. A run touches chunks ``c0 -
before … c1 - 1 + after``, so neighbouring runs share up to ``K - 1``
chunks. Without atomics, runs that share a chunk must not run at once: with
``S ≥ K - 1``, runs two apart never share one, so the runs but the last two
run in two calls (even, odd), and the last two in one call each (the first
run wraps around to them). Then the rounds' rows of every token are summed:
``grad.qk = Σ_r`` (query and key roles together), ``grad.v = Σ_r``.

Precision: float64 inputs run in float64; float32, float16 and bfloat16 in
float32 (hashing, tiles, statistics and accumulators), as the dense kernels.
Hashing in float32 reproduces the float64 buckets whenever the decisions
have the margins the conformance inputs are drawn with
(:func:`refattn.lsh.bucket_margins`). Logits: the score in the compute
dtype, the constants (self value, mask value) added to it in float64 and
the sum rounded to the compute dtype, then ``-log n_ij`` likewise, as the
reference's ``astype`` rounds them (its add mode rounds after each
constant: an ulp of the constant apart). ``exp`` is the shared tile library's
vectorisable ``exp_nonpositive`` (refattn/core/tiles.py). Kernels compile on first call (``cache=True`` keeps
them between sessions).

Tiles are key-major (keys x queries) as in the dense kernels, so that each
query's running statistics update along contiguous rows; the tile products
are ``np.dot`` (BLAS) on tiles of ``min(chunk_len, R·N)`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..core import tiles
from ..core.results import Cotangents, Grads, Result
from ..core.tiles import compute_dtype, frozen
from .inputs import LSHInputs
from .reference import window_multiplicity

TOKEN_BLOCK = 64  # tokens per work item of the hashing and combining kernels
COUNTING_SORT_RATIO = 4  # counting sort while the bucket ids are at most this many times the items
RUN_ROWS = 512  # a run holds about this many sorted items (S·chunk_len): its tiles stay in a core's L2 cache

# --------------------------------------------------------------------------
# The backend: forward and VJP over checked inputs.
# --------------------------------------------------------------------------


def forward(x: LSHInputs) -> Result:
    """Steps (1)-(12) in the compute dtype.

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv) and ``lse`` (B, H, N) in the compute dtype:
        float32 for float32/float16/bfloat16 ``qk``, float64 otherwise.
        ``aux``: ``buckets`` (B, H, R, N) and ``permutation`` (B, H, R·N),
        int64 (none on the short-sequence path); with ``return_rounds``,
        ``round_out`` (B, H, R, N, Dv) and ``round_lse`` (B, H, R, N).
    """
    args = _Arrays.build(x)
    plan = _plan(x, args)
    round_out, round_lse = _attend(args, plan)
    out, lse = _combine(round_out, round_lse, plan.num_rounds)
    b, h, n, dv = out.shape
    aux = {} if plan.buckets is None else {"buckets": plan.buckets, "permutation": plan.permutation}
    if x.return_rounds:
        rounds = plan.num_rounds  # R'
        aux.update(round_out=round_out.reshape(b, h, rounds, n, dv), round_lse=round_lse.reshape(b, h, rounds, n))
    return Result(out=out, lse=lse, aux=aux)


def vjp(x: LSHInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (12')-(1'), buckets held fixed.

    ``saved``, the Result :func:`forward` returned for ``x``, spares
    recomputing ``out`` and ``lse``; hashing and sorting run again.

    Returns
    -------
    Grads
        ``qk`` (B, H, N, D), the query role plus the key role through the
        normalisation of step (6), and ``v`` (B, H, N, Dv), in the compute dtype.
    """
    b, h, n, dv = x.v.shape
    args = _Arrays.build(x)
    dtype = args.qk.dtype
    plan = _plan(x, args)
    if saved is None:  # the forward once more, for out and LSE
        out, lse = _combine(*_attend(args, plan), plan.num_rounds)
    else:
        out, lse = _contiguous(saved.out, dtype), _contiguous(saved.lse, dtype)
    # (12') folded into (10'): ds = P̃ (dout · v - dout · out) + P̃ dLSE; a token without keys has
    # P̃ = 0 (its LSE is +inf here). dout (B, H, N, Dv); LSE, delta = dout · out, dLSE (B, H, N).
    dout, lse_for_p, delta, dlse = tiles.backward_rows(cotangents.dout, cotangents.dlse, out, lse, dtype)
    d_items = np.zeros((b, h, plan.num_rounds * n, args.qk.shape[3]), dtype)  # (B, H, R'·N, D): dq and dx per item
    dv_items = np.zeros((b, h, plan.num_rounds * n, dv), dtype)  # (B, H, R'·N, Dv)
    for runs in _run_colours(plan.num_runs):
        _backward_kernel(
            args.qk, args.rho, args.projected, args.v, *plan.chunks(), runs, dout, lse_for_p, delta, dlse,
            *args.logits(), *plan.counts(), d_items, dv_items,
        )  # fmt: skip
    # (11')-(12') Each token's rounds, summed; (5')-(1') nothing flows through the discrete steps.
    d_qk = d_items.reshape(b, h, plan.num_rounds, n, -1).sum(axis=2)
    d_v = dv_items.reshape(b, h, plan.num_rounds, n, dv).sum(axis=2)
    return Grads(qk=d_qk, v=d_v)


# --------------------------------------------------------------------------
# What the kernels are given.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arrays:
    """Checked inputs in the compute dtype, the norms of step (6), and the logit rules of step (8).

    Arrays are C-contiguous and read-only (one Numba type per dtype); an
    absent padding mask is a (1, 1) placeholder with ``has_valid`` False, an
    absent ``mask_value`` a 0 with ``has_mask_value`` False.
    """

    qk: np.ndarray  # (B, H, N, D)
    v: np.ndarray  # (B, H, N, Dv)
    rho: np.ndarray  # (B, H, N): ρ of step (6), u = x / ρ
    projected: np.ndarray  # (B, H, N) bool: du/dx projects out u (all but l2 keys with |x| <= eps)
    rotations: np.ndarray  # (B or 1, H, R, D, P)
    scale: np.floating
    causal: bool
    has_valid: bool
    valid: np.ndarray  # (B, N) bool, True = real token
    mask_padded_queries: bool
    replace: bool
    self_value: np.floating
    has_mask_value: bool
    mask_value: np.floating
    negated_marks: bool

    @staticmethod
    def build(x: LSHInputs) -> "_Arrays":
        dtype = compute_dtype(x.qk)
        real = dtype.type
        qk = _contiguous(x.qk, dtype)
        # (6) Key norms.
        rho = np.empty(qk.shape[:3], dtype)
        projected = np.empty(qk.shape[:3], np.bool_)
        _norm_kernel(qk, x.key_norm == "rms", real(x.key_norm_eps), rho, projected)
        rotations = x.rotations[:1] if x.rotations.strides[0] == 0 else x.rotations  # undo the batch broadcast
        return _Arrays(
            qk=qk,
            v=_contiguous(x.v, dtype),
            rho=frozen(rho),
            projected=frozen(projected),
            rotations=_contiguous(rotations, dtype),
            scale=real(x.scale),
            causal=x.causal,
            has_valid=x.valid is not None,
            valid=_contiguous(np.ones((1, 1), np.bool_) if x.valid is None else x.valid, np.bool_),
            mask_padded_queries=x.mask_padded_queries,
            replace=x.mask_mode == "replace",
            self_value=real(x.self_mask_value),
            has_mask_value=x.mask_value is not None,
            mask_value=real(0.0 if x.mask_value is None else x.mask_value),
            negated_marks=x.padding_marks == "negated_positions",
        )

    def logits(self) -> tuple:
        """Arguments of steps (7)-(8), in the kernels' order."""
        return (self.scale, self.causal, self.has_valid, self.valid, self.mask_padded_queries, self.replace,
                self.self_value, self.has_mask_value, self.mask_value, self.negated_marks)  # fmt: skip


def _contiguous(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` as a read-only C-contiguous array of ``dtype`` (no copy when it already is one)."""
    return frozen(np.ascontiguousarray(x, dtype=dtype))


@dataclass(frozen=True)
class _Plan:
    """The discrete part of one call, held fixed by the VJP, and how the chunks are cut into runs.

    On the short-sequence path (S): one round, the identity order, and one
    chunk whose window is itself once, without buckets.
    """

    buckets: np.ndarray | None  # (B, H, R, N) int64
    permutation: np.ndarray  # (B, H, R'·N) int64: slot -> item r·N + n
    num_rounds: int  # R', the rounds combined in step (12): num_hashes, or 1 on the short path
    chunk_len: int
    num_chunks: int  # C
    before: int
    after: int
    run_len: int  # S chunks per run, at least before + after
    dup_correction: bool
    item_chunk: np.ndarray  # (B, H, R'·N) int64: the chunk of each item (a placeholder without (9))
    multiplicity: np.ndarray  # (C,) int64: m[δ] of step (9)
    same_round: bool  # step (9) counts same-round windows only (dup_count="reformer_pytorch")

    @property
    def num_runs(self) -> int:
        return -(-self.num_chunks // self.run_len)

    def chunks(self) -> tuple:
        """Arguments of step (5), in the kernels' order."""
        return (self.permutation, self.chunk_len, self.before, self.after, self.run_len)

    def counts(self) -> tuple:
        """Arguments of step (9), in the kernels' order."""
        return (self.dup_correction, self.item_chunk, self.multiplicity, self.same_round)


def _plan(x: LSHInputs, args: _Arrays) -> _Plan:
    b, h, n, _ = args.qk.shape
    no_counts = frozen(np.zeros((1, 1, 1), np.int64))
    if x.short:
        # (S) One dense round: every token attends to every token once.
        identity = frozen(np.ascontiguousarray(np.broadcast_to(np.arange(n, dtype=np.int64), (b, h, n))))
        return _Plan(None, identity, 1, x.chunk_len, 1, 0, 0, 1, False, no_counts, np.ones(1, np.int64), False)
    # (1)-(3) Buckets, round offsets included.
    padding = x.has_padding_bucket
    buckets_per_round = x.num_buckets + 1 if padding else x.num_buckets  # F'
    buckets = np.empty((b, h, x.num_hashes, n), np.int64)
    factors = np.array(x.factors, np.int64)
    _hash_kernel(args.qk, args.rotations, factors, x.num_buckets, buckets_per_round, padding, args.valid, buckets)
    # (4) Stable sort of the R·N items by bucket.
    num_items = x.num_hashes * n
    permutation = np.empty((b, h, num_items), np.int64)
    inverse = np.empty((b, h, num_items), np.int64)
    _sort_kernel(buckets, x.num_hashes * buckets_per_round, permutation, inverse)
    # (5) Chunks over the concatenated rounds; windows wrap modulo C.
    num_chunks = -(-num_items // x.chunk_len)
    run_len = max(RUN_ROWS // x.chunk_len, x.num_chunks_before + x.num_chunks_after, 1)
    # (9) What the duplicate count needs: the chunk of every item and the window multiplicities.
    multiplicity = window_multiplicity(num_chunks, x.num_chunks_before, x.num_chunks_after)
    item_chunk = frozen(inverse // x.chunk_len) if x.dup_correction else no_counts
    return _Plan(buckets, frozen(permutation), x.num_hashes, x.chunk_len, num_chunks, x.num_chunks_before,
                 x.num_chunks_after, run_len, x.dup_correction, item_chunk, multiplicity,
                 x.dup_count == "reformer_pytorch")  # fmt: skip


def _attend(args: _Arrays, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """Steps (5), (7)-(11): each round's output and log-sum-exp per item, (B, H, R'·N, Dv) and (B, H, R'·N)."""
    b, h, num_items = plan.permutation.shape
    round_out = np.empty((b, h, num_items, args.v.shape[3]), args.qk.dtype)
    round_lse = np.empty((b, h, num_items), args.qk.dtype)
    _forward_kernel(args.qk, args.rho, args.v, *plan.chunks(), *args.logits(), *plan.counts(), round_out, round_lse)
    return round_out, round_lse


def _combine(round_out: np.ndarray, round_lse: np.ndarray, num_rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Step (12): ``out`` (B, H, N, Dv) and ``lse`` (B, H, N) from the rounds' results per item."""
    b, h, num_items, dv = round_out.shape
    out = np.empty((b, h, num_items // num_rounds, dv), round_out.dtype)
    lse = np.empty((b, h, num_items // num_rounds), round_out.dtype)
    _combine_kernel(round_out, round_lse, num_rounds, out, lse)
    return out, lse


def _run_colours(num_runs: int) -> list[np.ndarray]:
    """Groups of runs that share no chunk: even and odd runs but the last two, then each of those.

    Run ``i`` touches chunks ``i·S - before … (i+1)·S - 1 + after`` (mod C).
    With ``S ≥ before + after``, runs two apart are disjoint; only the first
    run wraps around, onto the last two.
    """
    paired = max(num_runs - 2, 0)
    colours = [np.arange(p, paired, 2, dtype=np.int64) for p in range(min(2, paired))]
    return colours + [np.array([i], np.int64) for i in range(paired, num_runs)]


# --------------------------------------------------------------------------
# Hashing, sorting, norms: steps (1)-(4), (6).
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _hash_kernel(qk, rotations, factors, num_buckets, buckets_per_round, padding_bucket, valid, buckets):
    """Steps (1)-(3): ``buckets`` (B, H, R, N); parallel over (b, h, round, token block)."""
    batch, heads, length, _ = qk.shape
    num_hashes, half = rotations.shape[2], rotations.shape[4]
    n_blocks = (length + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    for work in prange(batch * heads * num_hashes * n_blocks):
        bhr, block = work // n_blocks, work % n_blocks
        b, h, r = bhr // (heads * num_hashes), (bhr // num_hashes) % heads, bhr % num_hashes
        n0 = block * TOKEN_BLOCK
        count = min(TOKEN_BLOCK, length - n0)
        # (1) Rotate: y = x · Rot_r for the block's tokens.
        rotated = np.empty((count, half), qk.dtype)
        np.dot(qk[b, h, n0 : n0 + count], rotations[b if rotations.shape[0] > 1 else 0, h, r], rotated)
        for t in range(count):
            if padding_bucket and not valid[b, n0 + t]:
                bucket = num_buckets  # (3) the padding bucket
            else:
                # (2) Per factor, the first argmax of [y, -y] over its columns; first factor least significant.
                bucket, base, start = 0, 1, 0
                for factor in factors:
                    best, best_value = 0, rotated[t, start]
                    for a in range(1, factor):
                        value = rotated[t, start + a] if a < factor // 2 else -rotated[t, start + a - factor // 2]
                        if value > best_value:
                            best, best_value = a, value
                    bucket += base * best
                    base, start = base * factor, start + factor // 2
            # (3) Round offsets.
            buckets[b, h, r, n0 + t] = r * buckets_per_round + bucket


@njit(parallel=True, cache=True)
def _sort_kernel(buckets, n_ids, permutation, inverse):
    """Step (4): the stable order of the R·N items by bucket id; ``permutation`` slot -> item, ``inverse`` item -> slot."""
    batch, heads, num_hashes, length = buckets.shape
    num_items = num_hashes * length
    for bh in prange(batch * heads):
        b, h = bh // heads, bh % heads
        ids = buckets[b, h].reshape(num_items)  # item t = r·N + n
        order = permutation[b, h]
        if n_ids <= COUNTING_SORT_RATIO * num_items:
            # Counting sort: items scanned in order, so equal ids keep item order.
            start = np.zeros(n_ids + 1, np.int64)
            for t in range(num_items):
                start[ids[t] + 1] += 1
            for i in range(n_ids):
                start[i + 1] += start[i]
            for t in range(num_items):
                order[start[ids[t]]] = t
                start[ids[t]] += 1
        else:
            order[:] = np.argsort(ids, kind="mergesort")  # stable
        for s in range(num_items):
            inverse[b, h, order[s]] = s


@njit(parallel=True, cache=True)
def _norm_kernel(qk, rms, eps, rho, projected):
    """Step (6): ``ρ = sqrt(|x|² + D·eps)`` (rms) or ``max(|x|, eps)`` (l2), per token."""
    batch, heads, length, head_dim = qk.shape
    for bhn in prange(batch * heads * length):
        b, h, n = bhn // (heads * length), (bhn // length) % heads, bhn % length
        squared = qk.dtype.type(0.0)
        for d in range(head_dim):
            squared += qk[b, h, n, d] * qk[b, h, n, d]
        if rms:
            rho[b, h, n] = math.sqrt(squared + head_dim * eps)
            projected[b, h, n] = True
        else:
            rho[b, h, n] = max(math.sqrt(squared), eps)
            projected[b, h, n] = math.sqrt(squared) > eps


# --------------------------------------------------------------------------
# Runs: the tiles of the chunks a run's windows cover.
# --------------------------------------------------------------------------


@njit(cache=True)
def _run_tiles(qk, rho, v, permutation, b, h, run, run_len, before, after, chunk_len, item_chunk, dup_correction):
    """Step (5) for one run of (b, h): its query chunks ``c0 … c1 - 1`` and the tiles of every
    chunk its windows cover, ``c0 - before … c1 - 1 + after`` (mod C).

    Tile ``u`` holds chunk ``(c0 - before + u) mod C``: ``counts[u]`` items, in slot order
    (``items``, (tiles, width)), their tokens (``positions``), raw ``x`` (the queries; ``x_rows``,
    (tiles, width, D)), keys ``x / ρ`` (step (6); ``key_rows``), values (``v_rows``, (tiles,
    width, Dv)) and, for step (9), each round's chunk of each token (``round_chunks``, (tiles,
    R', width); R' = 0 without the duplicate correction). Rows past a chunk's count are 0 (so
    are the columns they give in a product).

    Returns
    -------
    c0, c1, counts, items, positions, x_rows, key_rows, v_rows, round_chunks
    """
    length, head_dim = qk.shape[2], qk.shape[3]
    num_items = permutation.shape[2]
    num_chunks = (num_items + chunk_len - 1) // chunk_len
    width = min(chunk_len, num_items)  # tile rows and columns
    c0 = run * run_len
    c1 = min(c0 + run_len, num_chunks)
    n_tiles = c1 - c0 + before + after
    count_rounds = num_items // length if dup_correction else 0
    dtype = qk.dtype
    counts = np.empty(n_tiles, np.int64)
    items, positions = np.empty((n_tiles, width), np.int64), np.empty((n_tiles, width), np.int64)
    x_rows = np.zeros((n_tiles, width, head_dim), dtype)
    key_rows = np.zeros((n_tiles, width, head_dim), dtype)
    v_rows = np.zeros((n_tiles, width, v.shape[3]), dtype)
    round_chunks = np.empty((n_tiles, count_rounds, width), np.int64)
    for u in range(n_tiles):
        start = ((c0 - before + u) % num_chunks) * chunk_len
        counts[u] = min(chunk_len, num_items - start)
        for r in range(counts[u]):
            item = permutation[b, h, start + r]
            n = item % length
            items[u, r], positions[u, r] = item, n
            for d in range(head_dim):
                x_rows[u, r, d] = qk[b, h, n, d]
                key_rows[u, r, d] = qk[b, h, n, d] / rho[b, h, n]
            for e in range(v.shape[3]):
                v_rows[u, r, e] = v[b, h, n, e]
            for rr in range(count_rounds):
                round_chunks[u, rr, r] = item_chunk[b, h, rr * length + n]
    return c0, c1, counts, items, positions, x_rows, key_rows, v_rows, round_chunks


@njit(cache=True)
def _logits_tile(
    t, fixed, n_k, n_q, b, pos_k, pos_q, chunk_k, chunk_q,
    scale, causal, has_valid, valid, mask_padded_queries, replace, self_value, has_mask_value, mask_value,
    negated_marks, dup_correction, multiplicity, same_round,
):  # fmt: skip
    """Steps (7)-(9) in place on a key-major tile ``t[r, c]`` = u_j · x_i (key row r: token j, query column c: token i).

    Excluded pairs become -inf; ``fixed[r, c]`` says whether the logit is
    not the score (no gradient reaches it). Only the ``n_k`` x ``n_q`` real
    entries are touched.
    """
    neg_inf = -np.inf
    self64, mask64 = np.float64(self_value), np.float64(mask_value)
    for r in range(n_k):
        j = pos_k[r]
        key_ok = valid[b, j] if has_valid else True
        for c in range(n_q):
            i = pos_q[c]
            # (7) The score, in the compute dtype.
            score = scale * t[r, c]
            # (8) By original positions: allowed (causality, key padding, query padding), self (same token).
            #     The constants join in float64 and the sum is rounded once, on the store (the reference's astype).
            if negated_marks and not key_ok:  # trax's marks: padded key j has info 1 - j (reference._trax_marks)
                allowed, is_self = j < 2, i == j and j == 0
            else:
                allowed, is_self = key_ok and not (causal and j > i), i == j
            if mask_padded_queries and has_valid:
                allowed = allowed and valid[b, i]
            if replace:  # masked -> mask_value (or excluded), then self -> self_value
                z = np.float64(score) if allowed else (mask64 if has_mask_value else neg_inf)
                t[r, c] = self64 if is_self else z
                fixed[r, c] = is_self or not allowed
            else:  # add: s + self_value·[self] + mask_value·[masked] (excluded when mask_value is None)
                z = np.float64(score) + self64 if is_self else np.float64(score)
                t[r, c] = z if allowed else (z + mask64 if has_mask_value else neg_inf)
                fixed[r, c] = not (allowed or has_mask_value)
    # (9) Duplicate correction: z - log n_ij, n_ij = Σ_r Σ_r' m[(c_r'(j) - c_r(i)) mod C], rounded once more;
    #     same_round (reformer-pytorch): r' = r only, and log(n'_ij + 1e-9) rounded to float32.
    if dup_correction:
        num_chunks = multiplicity.shape[0]
        for r in range(n_k):
            for c in range(n_q):
                count = 0
                for ra in range(chunk_q.shape[0]):
                    for rb in range(chunk_k.shape[0]):
                        if rb == ra or not same_round:
                            count += multiplicity[(chunk_k[rb, r] - chunk_q[ra, c]) % num_chunks]
                if same_round:
                    log_count = np.float64(np.float32(math.log(np.float64(np.float32(count) + np.float32(1e-9)))))
                else:
                    log_count = math.log(count)
                t[r, c] = np.float64(t[r, c]) - log_count


# --------------------------------------------------------------------------
# Forward: steps (5), (7)-(11), and (12).
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(
    qk, rho, v, permutation, chunk_len, before, after, run_len,  # (5), (6)
    scale, causal, has_valid, valid, mask_padded_queries, replace, self_value, has_mask_value, mask_value,  # (7)-(8)
    negated_marks, dup_correction, item_chunk, multiplicity, same_round,  # (8)-(9)
    round_out, round_lse,
):  # fmt: skip
    """Per slot's item: output (B, H, R'·N, Dv) and log-sum-exp (B, H, R'·N); parallel over (b, h, run)."""
    batch, heads = qk.shape[:2]
    value_dim, num_items = v.shape[3], permutation.shape[2]
    num_runs = (-(-num_items // chunk_len) + run_len - 1) // run_len
    width = min(chunk_len, num_items)  # tile rows and columns
    dtype = qk.dtype
    no_keep, no_strides, one = np.zeros(1, np.bool_), (0, 0, 0, 0), dtype.type(1.0)  # LSH has no dropout
    for work in prange(batch * heads * num_runs):
        bh, run = work // num_runs, work % num_runs
        b, h = bh // heads, bh % heads
        c0, c1, counts, items, positions, x_rows, key_rows, v_rows, round_chunks = _run_tiles(
            qk, rho, v, permutation, b, h, run, run_len, before, after, chunk_len, item_chunk, dup_correction
        )
        s_t = np.empty((width, width), dtype)  # logits, then weights; key-major
        fixed = np.empty((width, width), np.bool_)  # unused by the forward
        acc_t = np.empty((value_dim, width), dtype)  # unnormalised output, transposed
        pv_t = np.empty((value_dim, width), dtype)
        state = tiles.softmax_state(width, dtype)
        for c in range(c0, c1):
            qt = c - c0 + before  # the query chunk's tile; its window's tiles are qt - before ... qt + after
            n_q = counts[qt]
            tiles.reset_softmax_state(state)
            acc_t[:] = 0
            for kt in range(qt - before, qt + after + 1):
                n_k = counts[kt]
                # (7)-(9) Logits of the tile; columns from n_q on stay 0 (their query rows are 0).
                np.dot(key_rows[kt, :n_k], x_rows[qt].T, s_t[:n_k])  # (n_k, width) = u x^T
                _logits_tile(
                    s_t, fixed, n_k, n_q, b, positions[kt], positions[qt], round_chunks[kt], round_chunks[qt],
                    scale, causal, has_valid, valid, mask_padded_queries, replace, self_value, has_mask_value,
                    mask_value, negated_marks, dup_correction, multiplicity, same_round,
                )  # fmt: skip
                # (10) The online softmax, and acc = alpha * acc + v^T p.
                tiles.attend_tile(
                    s_t, n_q, n_k, b, h, 0, 0, v_rows[kt, :n_k], state, acc_t, pv_t, False, no_keep, no_strides
                )
            # (10) o = acc / l, lse = m + log l (a row without keys: 0 and -inf); (11) written at the item.
            for col in range(n_q):
                tiles.finish_row(acc_t, state, col, one, b, h, items[qt, col], round_out, round_lse)


@njit(parallel=True, cache=True)
def _combine_kernel(round_out, round_lse, num_rounds, out, lse):
    """Step (12): ``LSE = log Σ_r exp(lse_r)``, ``out = Σ_r exp(lse_r - LSE) o_r``; parallel over (b, h, token block)."""
    batch, heads, length, value_dim = out.shape
    n_blocks = (length + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    for work in prange(batch * heads * n_blocks):
        bh, block = work // n_blocks, work % n_blocks
        b, h = bh // heads, bh % heads
        for n in range(block * TOKEN_BLOCK, min((block + 1) * TOKEN_BLOCK, length)):
            top = -np.inf
            for r in range(num_rounds):
                top = max(top, round_lse[b, h, r * length + n])
            for e in range(value_dim):
                out[b, h, n, e] = 0
            if top == -np.inf:  # no key in any round
                lse[b, h, n] = -np.inf
                continue
            total = 0.0
            for r in range(num_rounds):
                total += math.exp(round_lse[b, h, r * length + n] - top)
            lse[b, h, n] = top + math.log(total)
            for r in range(num_rounds):
                weight = math.exp(round_lse[b, h, r * length + n] - lse[b, h, n])
                for e in range(value_dim):
                    out[b, h, n, e] += weight * round_out[b, h, r * length + n, e]


# --------------------------------------------------------------------------
# Backward: (10')-(6') per run, one colour of runs per call.
# --------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False)
def _backward_kernel(
    qk, rho, projected, v, permutation, chunk_len, before, after, run_len, runs,  # (5), (6)
    dout, lse, delta, dlse,  # (12'): the combined LSE (+inf for a token without keys), dout · out, dLSE
    scale, causal, has_valid, valid, mask_padded_queries, replace, self_value, has_mask_value, mask_value,  # (7)-(8)
    negated_marks, dup_correction, item_chunk, multiplicity, same_round,  # (8)-(9)
    d_items, dv_items,
):  # fmt: skip
    """Adds dq + dx (B, H, R'·N, D) and dv (B, H, R'·N, Dv) per item; parallel over (b, h, run of ``runs``)."""
    batch, heads, _, head_dim = qk.shape
    value_dim, num_items = v.shape[3], permutation.shape[2]
    width = min(chunk_len, num_items)
    dtype = qk.dtype
    no_keep, no_strides, one = np.zeros(1, np.bool_), (0, 0, 0, 0), dtype.type(1.0)  # LSH has no dropout
    for work in prange(batch * heads * runs.shape[0]):
        bh, run = work // runs.shape[0], runs[work % runs.shape[0]]
        b, h = bh // heads, bh % heads
        c0, c1, counts, items, positions, x_rows, key_rows, v_rows, round_chunks = _run_tiles(
            qk, rho, v, permutation, b, h, run, run_len, before, after, chunk_len, item_chunk, dup_correction
        )
        dx_rows = np.zeros(x_rows.shape, dtype)  # (dq + dx) / scale of each tile row
        dv_rows = np.zeros(v_rows.shape, dtype)

        dout_rows = np.empty((width, value_dim), dtype)  # the query chunk's cotangents
        rows = tiles.backward_row_buffer(width, dtype)  # its LSE, delta, dLSE
        s_t = np.empty((width, width), dtype)  # logits, then P̃; key-major
        fixed = np.empty((width, width), np.bool_)
        ds_t = np.empty((width, width), dtype)  # dP, then ds
        dv_tile = np.empty((width, value_dim), dtype)
        du_tile = np.empty((width, head_dim), dtype)
        dq_tile = np.empty((width, head_dim), dtype)
        for c in range(c0, c1):
            qt = c - c0 + before
            n_q = counts[qt]
            dout_rows[:] = 0
            for col in range(n_q):
                i = positions[qt, col]
                tiles.load_row(rows, col, lse, delta, dlse, b, h, i)
                dout_rows[col] = dout[b, h, i]
            tiles.pad_rows(rows, n_q)
            for kt in range(qt - before, qt + after + 1):
                n_k = counts[kt]
                # (7)-(10) Logits, then P̃ = exp(z - LSE_i); columns from n_q on are 0.
                np.dot(key_rows[kt, :n_k], x_rows[qt].T, s_t[:n_k])
                _logits_tile(
                    s_t, fixed, n_k, n_q, b, positions[kt], positions[qt], round_chunks[kt], round_chunks[qt],
                    scale, causal, has_valid, valid, mask_padded_queries, replace, self_value, has_mask_value,
                    mask_value, negated_marks, dup_correction, multiplicity, same_round,
                )  # fmt: skip
                tiles.probabilities(s_t, True, n_q, n_k, rows)
                # (10') dv_j += P̃ dout_i; dP = v_j · dout_i; ds = P̃ (dP - dout_i · out_i) + P̃ dLSE_i.
                np.dot(s_t[:n_k], dout_rows, dv_tile[:n_k])  # (n_k, Dv)
                tiles.accumulate(dv_rows[kt, :n_k], dv_tile[:n_k])
                np.dot(v_rows[kt, :n_k], dout_rows.T, ds_t[:n_k])  # (n_k, width)
                tiles.score_grad(ds_t, s_t, True, n_q, n_k, b, h, 0, 0, rows, False, no_keep, no_strides, one)
                if replace:  # (8') none through a constant logit (adding, P̃ = 0 where z is not the score)
                    tiles.hold_constants(ds_t, fixed, n_k, n_q)
                # (7') dq_i += scale Σ_j ds u_j; du_j = scale Σ_i ds x_i (the scale applied at the end).
                np.dot(ds_t[:n_k].T, key_rows[kt, :n_k], dq_tile)  # (width, D)
                tiles.accumulate(dx_rows[qt], dq_tile)
                np.dot(ds_t[:n_k], x_rows[qt], du_tile[:n_k])  # (n_k, D)
                _add_key_grad(dx_rows[kt], du_tile, key_rows[kt], positions[kt], n_k, projected[b, h], rho[b, h])
        # Every tile row into its item's row: no concurrent work item touches these chunks.
        for u in range(counts.shape[0]):
            for r in range(counts[u]):
                item = items[u, r]
                for d in range(head_dim):
                    d_items[b, h, item, d] += scale * dx_rows[u, r, d]
                for e in range(value_dim):
                    dv_items[b, h, item, e] += dv_rows[u, r, e]


@njit(cache=True)
def _add_key_grad(dx_tile, du_tile, key_tile, tokens, n_k, projected, rho):
    """Step (6'): ``dx_j += (du_j - u_j (u_j · du_j)) / ρ_j`` for the ``n_k`` keys of a tile
    (l2 keys at or below eps: ``du_j / eps``); ``projected`` and ``rho`` (N,) of one (b, h)."""
    for r in range(n_k):
        j = tokens[r]
        along = dx_tile.dtype.type(0.0)
        if projected[j]:
            for d in range(du_tile.shape[1]):
                along += key_tile[r, d] * du_tile[r, d]
        for d in range(du_tile.shape[1]):
            dx_tile[r, d] += (du_tile[r, d] - key_tile[r, d] * along) / rho[j]
