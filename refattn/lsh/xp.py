"""LSH attention (Reformer) over an array namespace ``xp`` (NumPy or CuPy): the GPU path, steps (1)-(12) of
spec/lsh.md in O(N·chunk_len) memory.

* (1)-(3) hashing: one batched product ``x · Rot`` (B, H, R, N, P), each factor's bucket the first argmax
  of ``[y, −y]``, then the padding bucket and the round offsets.
* (4) sorting: an argsort of the unique keys ``bucket · R·N + item``, whose order is the stable order by
  bucket (trax's ``N · bucket + position`` key), whatever sort the namespace runs.
* (5), (7)-(11): the sorted slots are cut into chunks; a step takes whole chunks (``BLOCK_Q`` slots or one
  chunk) and sweeps their windows ``BLOCK_K`` slots at a time with an online softmax
  (refattn/segmented/blocksparse_xp.py's), gathering the tokens of each tile with fancy indexing; each
  slot's result is then put back at its item (the unsort of (11)).
* (12) the rounds combined by their log-sum-exps.

The backward folds the rounds' weights into the chunk softmax, as the Numba backend does
(refattn/lsh/numba.py): with ``P̃_ij = exp(z_ij − LSE_i)``, ``dv_j += P̃ dout_i`` and, where the logit is the
score, ``ds = P̃ (dout_i·v_j − dout_i·out_i + dLSE_i)``, ``dq_i += scale ds u_j``, ``du_j += scale ds x_i``;
``du`` goes back through the normalisation (6'). Buckets are held fixed.

Shape names: B batch, H head, R rounds, N tokens, c chunks of a step, L slots of a chunk, e slots of a
window tile, D head dim, Dv value dim, P rotation columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.results import Cotangents, Grads, Result
from ..core.xp import blocks, compute_dtype, scatter_add
from ..dense import xp as dense_xp
from ..segmented.blocksparse_xp import online_softmax
from .inputs import LSHInputs
from .reference import log_pair_counts, window_multiplicity

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # sorted slots of a step's queries and of a window tile


@dataclass(frozen=True)
class _Plan:
    """The discrete part of one call, on the device: buckets, sort and chunks (held fixed by the VJP).

    On the short-sequence path: one round, the identity order, one chunk whose window is itself, no buckets.
    """

    buckets: object | None  # (B, H, R, N) int64
    permutation: object  # (B, H, R'·N) int64: slot -> item r·N + n
    inverse: object  # (B, H, R'·N) int64: item -> slot
    num_rounds: int  # R'
    chunk_len: int  # L
    num_chunks: int  # C
    offsets: np.ndarray  # (K,) the window's chunk offsets −before … after
    log_counts: object | None  # (max count + 1,) what (9) subtracts for each pair count, or None without (9)
    multiplicity: object  # (C,) m[δ] of step (9)
    same_round: bool  # (9) counts same-round windows only

    @property
    def num_items(self) -> int:
        return self.permutation.shape[-1]


def _hash(x: LSHInputs, qk, xp):
    """(1)-(3) Buckets (B, H, R, N) int64, round offsets included, in the compute dtype."""
    rotated = xp.matmul(qk[:, :, None], xp.asarray(x.rotations, dtype=qk.dtype))  # (B, H, R, N, P)
    bucket = xp.zeros(rotated.shape[:-1], dtype=np.int64)
    base, start = 1, 0
    for factor in x.factors:  # (2) factor k reads the next f_k / 2 columns; the first factor least significant
        part = rotated[..., start : start + factor // 2]
        bucket += base * xp.argmax(xp.concatenate([part, -part], axis=-1), axis=-1)
        base, start = base * factor, start + factor // 2
    buckets_per_round = x.num_buckets + 1 if x.has_padding_bucket else x.num_buckets  # F'
    if x.has_padding_bucket:  # (3) padded tokens to bucket F, then round r offset by r·F'
        bucket = xp.where(xp.asarray(x.valid)[:, None, None, :], bucket, x.num_buckets)
    return bucket + xp.arange(x.num_hashes, dtype=np.int64)[:, None] * buckets_per_round


def _plan(x: LSHInputs, qk, xp) -> _Plan:
    b, h, n, _ = qk.shape
    if x.short:
        identity = xp.broadcast_to(xp.arange(n, dtype=np.int64), (b, h, n))
        return _Plan(None, identity, identity, 1, n, 1, np.zeros(1, np.int64), None, xp.ones(1, np.int64), False)
    buckets = _hash(x, qk, xp)
    # (4) The stable order by bucket: sort the unique keys bucket · R·N + item.
    num_items = x.num_hashes * n
    keys = buckets.reshape(b, h, num_items) * num_items + xp.arange(num_items, dtype=np.int64)
    permutation = xp.argsort(keys, axis=-1)
    inverse = xp.empty_like(permutation)
    batch, head = xp.arange(b)[:, None, None], xp.arange(h)[None, :, None]
    inverse[batch, head, permutation] = xp.arange(num_items, dtype=np.int64)
    # (5) Chunks over the concatenated rounds; windows wrap modulo C.
    num_chunks = -(-num_items // x.chunk_len)
    offsets = np.arange(-x.num_chunks_before, x.num_chunks_after + 1)
    multiplicity = window_multiplicity(num_chunks, x.num_chunks_before, x.num_chunks_after)
    log_counts = None
    if x.dup_correction:  # (9) a count is at most R² · K (R · K within rounds); its log by the reference's rule
        same_round = x.dup_count != "occurrences"
        largest = (x.num_hashes if same_round else x.num_hashes**2) * len(offsets)
        smallest = 0 if same_round else 1  # log n_ij needs n_ij >= 1: row 0 then stands for no pair
        table = log_pair_counts(np.arange(smallest, largest + 1), x.dup_count)
        log_counts = xp.asarray(np.concatenate([np.zeros(smallest), table]))  # (largest + 1,) float64
    return _Plan(buckets, permutation, inverse, x.num_hashes, x.chunk_len, num_chunks, offsets, log_counts,
                 xp.asarray(multiplicity), x.dup_count != "occurrences")  # fmt: skip


@dataclass(frozen=True)
class _Problem:
    """The inputs on the device in the compute dtype, the keys of step (6) and the plan."""

    qk: object  # (B, H, N, D)
    keys: object  # (B, H, N, D): u = x / ρ
    rho: object  # (B, H, N, 1)
    v: object  # (B, H, N, Dv)
    valid: object | None  # (B, N) bool
    plan: _Plan
    xp: object

    @staticmethod
    def build(x: LSHInputs, xp) -> "_Problem":
        dtype = compute_dtype(x.qk.dtype)
        qk = xp.asarray(x.qk, dtype=dtype)
        squared = (qk * qk).sum(axis=-1, keepdims=True)
        if x.key_norm == "rms":  # (6) ρ = sqrt(|x|² + D·eps), or max(|x|, eps)
            rho = xp.sqrt(squared + qk.shape[-1] * x.key_norm_eps)
        else:
            rho = xp.maximum(xp.sqrt(squared), x.key_norm_eps)
        valid = None if x.valid is None else xp.asarray(x.valid)
        return _Problem(qk, qk / rho, rho, xp.asarray(x.v, dtype=dtype), valid, _plan(x, qk, xp), xp)

    def steps(self):
        """(c0, c1) chunks per step and (e0, e1) slots of the window per tile."""
        plan = self.plan
        per_step = max(BLOCK_Q // plan.chunk_len, 1)
        return blocks(plan.num_chunks, per_step), blocks(len(plan.offsets) * plan.chunk_len, BLOCK_K)

    def slots(self, c0: int, c1: int, e0: int | None = None, e1: int | None = None):
        """The sorted slots (c, L) of chunks c0:c1, or (c, e) of their windows' slots e0:e1 (slots past
        R'·N are −1)."""
        xp, plan = self.xp, self.plan
        chunks = xp.arange(c0, c1)[:, None]  # (c, 1)
        if e0 is None:
            slots = chunks * plan.chunk_len + xp.arange(plan.chunk_len)  # (c, L)
        else:
            window = xp.arange(e0, e1)  # slot e of a window: chunk offset e // L, its slot e % L
            window_chunk = (chunks + xp.asarray(plan.offsets)[window // plan.chunk_len]) % plan.num_chunks
            slots = window_chunk * plan.chunk_len + window % plan.chunk_len  # (c, e)
        return xp.where(slots < plan.num_items, slots, -1)

    def items(self, slots):
        """Item ``r·N + n`` (B, H, c, L) in each slot (item 0 where the slot is −1)."""
        xp = self.xp
        b, h = self.qk.shape[:2]
        flat = xp.broadcast_to(xp.maximum(slots, 0).reshape(1, 1, -1), (b, h, slots.size))
        return xp.take_along_axis(self.plan.permutation, flat, axis=2).reshape((b, h) + slots.shape)

    def gather(self, array, positions):
        """``array[b, h, positions[b, h, …]]``: (B, H, N, E) to (B, H, …, E)."""
        xp = self.xp
        b, h = array.shape[:2]
        extra = (1,) * (positions.ndim - 2)
        return array[xp.arange(b).reshape((b, 1) + extra), xp.arange(h).reshape((1, h) + extra), positions]

    def token_flags(self, positions):
        """``valid[b, positions[b, h, …]]``: whether each token at ``positions`` (B, H, …) is real."""
        b = self.valid.shape[0]
        return self.valid[self.xp.arange(b).reshape((b,) + (1,) * (positions.ndim - 1)), positions]

    def scatter(self, target, positions, values):
        """``target[b, h, positions[b, h, …]] += values`` (repeated positions add up)."""
        xp = self.xp
        b, h = target.shape[:2]
        extra = (1,) * (positions.ndim - 2)
        index = (xp.arange(b).reshape((b, 1) + extra), xp.arange(h).reshape((1, h) + extra), positions)
        scatter_add(xp, target, tuple(xp.broadcast_to(i, positions.shape) for i in index), values)


@dataclass(frozen=True)
class _Tile:
    """One (queries of chunks c0:c1) x (window slots e0:e1) tile: the tokens and steps (7)-(9)."""

    pos_q: object  # (B, H, c, L) token of each query slot
    pos_k: object  # (B, H, c, e) token of each key slot
    q: object  # (B, H, c, L, D) raw x
    u: object  # (B, H, c, e, D) keys
    v: object  # (B, H, c, e, Dv)
    logits: object  # (B, H, c, L, e), −inf where excluded
    from_scores: object  # (B, H, c, L, e) bool: the logit is the score (its gradient flows)


def _tile(x: LSHInputs, p: _Problem, c0: int, c1: int, e0: int, e1: int) -> _Tile:
    xp, n = p.xp, x.length
    query_slots, key_slots = p.slots(c0, c1), p.slots(c0, c1, e0, e1)
    items_q, items_k = p.items(query_slots), p.items(key_slots)
    pos_q, pos_k = items_q % n, items_k % n
    q, u, v = p.gather(p.qk, pos_q), p.gather(p.keys, pos_k), p.gather(p.v, pos_k)
    # (7) Scores of the raw queries against the normalised keys.
    scores = x.scale * xp.matmul(q, xp.swapaxes(u, -1, -2))  # (B, H, c, L, e)
    # (8) Masks and self pairs by original positions.
    logits, kept, from_scores = _pair_logits(x, p, scores, pos_q[..., :, None], pos_k[..., None, :])
    # (9) Each occurrence of key j loses log n_ij.
    if p.plan.log_counts is not None:
        logits = (logits - p.plan.log_counts[_pair_counts(p, items_q, items_k)]).astype(logits.dtype)
    # Slots past the last item, and pairs excluded exactly, take no part.
    real = (query_slots >= 0)[:, :, None] & (key_slots >= 0)[:, None, :]  # (c, L, e)
    kept = real if kept is None else kept & real
    return _Tile(pos_q, pos_k, q, u, v, xp.where(kept, logits, -np.inf), from_scores & kept)


def _pair_logits(x: LSHInputs, p: _Problem, scores, query, key):
    """Step (8) (refattn.lsh.pair_logits' rules) on a tile; ``query`` (…, L, 1) and ``key`` (…, 1, e) are
    token positions. Returns the logits, where pairs are kept (None: all) and where the logit is the score."""
    xp = p.xp
    key_real = None if p.valid is None else p.token_flags(key[..., 0, :])[..., None, :]  # (…, 1, e)
    if x.padding_marks == "negated_positions" and key_real is not None:  # trax's marks n + 1 and 1 − n
        query_info, key_info = query + 1, xp.where(key_real, key + 1, 1 - key)
        self_pair, allowed = query_info == key_info, key_info >= 0
        if x.causal:
            allowed = allowed & (key_info <= query_info)
    else:
        self_pair, allowed = query == key, xp.ones(query.shape[:-1] + key.shape[-1:], dtype=bool)
        if x.causal:
            allowed = allowed & (key <= query)
        if key_real is not None:
            allowed = allowed & key_real
    if key_real is not None and x.mask_padded_queries:
        allowed = allowed & p.token_flags(query[..., 0])[..., :, None]
    allowed = xp.broadcast_to(allowed, scores.shape)
    if x.mask_mode == "replace":
        masked = scores if x.mask_value is None else xp.where(allowed, scores, x.mask_value)
        logits = xp.where(self_pair, x.self_mask_value, masked).astype(scores.dtype)
        kept = None if x.mask_value is not None else allowed | self_pair
        return logits, kept, allowed & ~self_pair
    logits = (scores + x.self_mask_value * self_pair).astype(scores.dtype)
    if x.mask_value is None:
        return logits, allowed, allowed
    return (logits + xp.where(allowed, 0.0, x.mask_value)).astype(scores.dtype), None, xp.ones_like(allowed)


def _pair_counts(p: _Problem, items_q, items_k):
    """Step (9)'s ``n_ij = Σ_r Σ_r' m[(c_r'(j) − c_r(i)) mod C]`` (``r' = r`` only within rounds) on a tile,
    (B, H, c, L, e) int64, ``c_r(n)`` the chunk of token n's round-r copy."""
    plan, n = p.plan, p.qk.shape[2]
    item_chunk = plan.inverse // plan.chunk_len  # (B, H, R·N)
    pos_q, pos_k = items_q % n, items_k % n
    counts = 0
    for r in range(plan.num_rounds):
        chunk_q = p.gather(item_chunk[..., None], pos_q + r * n)[..., 0][..., :, None]  # (B, H, c, L, 1)
        for r_key in [r] if plan.same_round else range(plan.num_rounds):
            chunk_k = p.gather(item_chunk[..., None], pos_k + r_key * n)[..., 0][..., None, :]  # (B, H, c, 1, e)
            counts = counts + plan.multiplicity[(chunk_k - chunk_q) % plan.num_chunks]
    return counts


def _rounds(x: LSHInputs, p: _Problem):
    """(5), (7)-(11) Each round's output (B, H, R', N, Dv) and log-sum-exp (B, H, R', N), per item."""
    xp, plan = p.xp, p.plan
    b, h, n, dv = p.v.shape
    padded = plan.num_chunks * plan.chunk_len
    sorted_out = xp.zeros((b, h, padded, dv), dtype=p.v.dtype)
    sorted_lse = xp.zeros((b, h, padded), dtype=p.v.dtype)
    chunk_steps, window_tiles = p.steps()
    for c0, c1 in chunk_steps:
        tiles = ((t.logits, t.v) for t in (_tile(x, p, c0, c1, e0, e1) for e0, e1 in window_tiles))
        out, lse = online_softmax(tiles, xp)  # (B, H, c, L, Dv), (B, H, c, L)
        rows = slice(c0 * plan.chunk_len, c1 * plan.chunk_len)
        sorted_out[:, :, rows], sorted_lse[:, :, rows] = out.reshape(b, h, -1, dv), lse.reshape(b, h, -1)
    # (11) Unsort: item r·N + n is in slot inverse[r·N + n].
    round_out = xp.take_along_axis(sorted_out, plan.inverse[..., None], axis=2)
    round_lse = xp.take_along_axis(sorted_lse, plan.inverse, axis=2)
    return round_out.reshape(b, h, plan.num_rounds, n, dv), round_lse.reshape(b, h, plan.num_rounds, n)


def _combine(round_out, round_lse, xp):
    """(12) ``LSE = log Σ_r exp(lse_r)``, ``out = Σ_r exp(lse_r − LSE) o_r``; a token with no key: 0, −inf."""
    top = round_lse.max(axis=2)
    stable = xp.where(xp.isfinite(top), top, 0.0)
    total = xp.exp(round_lse - stable[:, :, None]).sum(axis=2)
    has_key = total > 0
    lse = xp.where(has_key, stable + xp.log(xp.where(has_key, total, 1.0)), -np.inf)
    weights = xp.where(has_key[:, :, None], xp.exp(round_lse - xp.where(has_key, lse, 0.0)[:, :, None]), 0.0)
    return (weights[..., None] * round_out).sum(axis=2), lse


def forward(x: LSHInputs, xp) -> Result:
    """Steps (1)-(12): ``out``, ``lse`` and ``aux`` as the other backends'."""
    p = _Problem.build(x, xp)
    round_out, round_lse = _rounds(x, p)
    out, lse = _combine(round_out, round_lse, xp)
    plan = p.plan
    aux = {} if plan.buckets is None else {"buckets": plan.buckets, "permutation": plan.permutation}
    if x.return_rounds:
        aux.update(round_out=round_out, round_lse=round_lse)
    return Result(out=out, lse=lse, aux=aux)


def vjp(x: LSHInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (12')-(1'), the rounds' weights folded into the chunk softmax; buckets held fixed."""
    p = _Problem.build(x, xp)
    dtype = p.qk.dtype
    if saved is None:
        out, lse = _combine(*_rounds(x, p), xp)
    else:
        out, lse = xp.asarray(saved.out, dtype=dtype), xp.asarray(saved.lse, dtype=dtype)
    dout = xp.asarray(cotangents.dout, dtype=dtype)  # (B, H, N, Dv)
    dlse = xp.zeros(lse.shape, dtype) if cotangents.dlse is None else xp.asarray(cotangents.dlse, dtype=dtype)
    token_stats = xp.stack([xp.where(lse == -np.inf, 0.0, lse), (dout * out).sum(axis=-1), dlse], axis=-1)
    dq, du, dv = xp.zeros_like(p.qk), xp.zeros_like(p.qk), xp.zeros_like(p.v)
    chunk_steps, window_tiles = p.steps()
    for c0, c1 in chunk_steps:
        for e0, e1 in window_tiles:
            t = _tile(x, p, c0, c1, e0, e1)
            stats = p.gather(token_stats, t.pos_q)  # (B, H, c, L, 3): LSE, δ = dout·out, dLSE per query
            dout_q = p.gather(dout, t.pos_q)  # (B, H, c, L, Dv)
            weights = xp.exp(t.logits - stats[..., 0:1])  # P̃ (B, H, c, L, e)
            p.scatter(dv, t.pos_k, xp.matmul(xp.swapaxes(weights, -1, -2), dout_q))
            d_products = xp.matmul(dout_q, xp.swapaxes(t.v, -1, -2))
            ds = xp.where(t.from_scores, weights * (d_products - stats[..., 1:2] + stats[..., 2:3]), 0.0)
            p.scatter(dq, t.pos_q, x.scale * xp.matmul(ds, t.u))
            p.scatter(du, t.pos_k, x.scale * xp.matmul(xp.swapaxes(ds, -1, -2), t.q))
    # (6') u = x / ρ: dx = (du − u (u · du)) / ρ; l2 with |x| <= eps: du / eps.
    d_from_keys = (du - p.keys * (p.keys * du).sum(axis=-1, keepdims=True)) / p.rho
    if x.key_norm != "rms":
        d_from_keys = xp.where(xp.sqrt((p.qk * p.qk).sum(axis=-1, keepdims=True)) > x.key_norm_eps, d_from_keys,
                               du / x.key_norm_eps)  # fmt: skip
    return Grads(qk=dq + d_from_keys, v=dv)
