"""Routing attention (the Routing Transformer) over an array namespace ``xp`` (NumPy or CuPy): the GPU path,
steps (1)-(11) of spec/routing.md.

* (1)-(5) routing: prescale and normalise (elementwise), the similarities to the head's centroids (one
  batched product, (B, H, N, K)), each token's first argmax centroid, and each centroid's members: a stable
  argsort of the negated similarities (ties to the lower position, the spec's order; CuPy's sorts are
  stable), its first ``cluster_size``, then sorted by position when ``order="position"``.
* (6)-(10) attention inside clusters: a step takes whole clusters (``BLOCK_Q`` query slots or one cluster),
  gathers their query slots and their memory then member key slots with fancy indexing, and sweeps the key
  slots ``BLOCK_K`` at a time with an online softmax (refattn/segmented/blocksparse_xp.py's). The Reformer
  self rule (``self_mask_value=None``) needs to know whether a row has another key: a first pass over the
  step's key tiles, masks only, counts them.
* (11) the slots' outputs scatter-added to their tokens and divided by ``count + scatter_eps``.

The backward recomputes the routing (held fixed, as every backend) and the slots' outputs, row maxima and
sums, so that its weights are the forward's ``exp(z − max) / sum`` (not ``exp(z − lse)``, which float32
cannot give for google-research's logits near −1e9), then per tile ``dZ = P (dP − d_o·o)``, zero on
constant logits, and scatter-adds the slots' gradients back.

Shape names: B batch, H head, N tokens, K clusters, c clusters of a step, W cluster size (query slots),
e key slots of a tile (memory slots first, then member slots), M memory slots, D head dim, Dv value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.results import Cotangents, Grads, Result
from ..core.xp import blocks, compute_dtype, scatter_add
from ..dense import xp as dense_xp
from ..segmented.blocksparse_xp import online_softmax
from .inputs import RoutingInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # query slots of a step and key slots of a tile


# --- (1)-(5) routing ----------------------------------------------------------------


def _normalize(x, norm: str, eps: float, xp):
    """(2) Routing vectors and the statistic their VJP needs: layer norm (no scale, no bias) → 1/sqrt(var + eps),
    or L2 → max(|x|, eps), (…, 1)."""
    if norm == "layer":
        centred = x - x.mean(axis=-1, keepdims=True)
        inv_std = 1.0 / xp.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
        return centred * inv_std, inv_std
    denominator = xp.maximum(xp.sqrt((x * x).sum(axis=-1, keepdims=True)), eps)
    return x / denominator, denominator


def _normalize_vjp(dr, r, stat, norm: str, eps: float, xp):
    """(2') Layer norm: ``s (dr − mean(dr) − r mean(dr r))``; L2: ``(dr − r (r · dr)) / |x|``, or ``dr / eps``
    where the norm is clamped."""
    if norm == "layer":
        return stat * (dr - dr.mean(axis=-1, keepdims=True) - r * (dr * r).mean(axis=-1, keepdims=True))
    along_r = xp.where(stat <= eps, 0.0, (dr * r).sum(axis=-1, keepdims=True))
    return (dr - r * along_r) / stat


def _members(similarity, cluster_size: int, order: str, xp):
    """(5) Each centroid's ``cluster_size`` most similar tokens, (B, H, K, W) int64, ties to the lower position."""
    ranked = xp.argsort(-xp.swapaxes(similarity, -1, -2), axis=-1, kind="stable")[..., :cluster_size]
    return (xp.sort(ranked, axis=-1) if order == "position" else ranked).astype(np.int64)


@dataclass(frozen=True)
class _Routed:
    """The inputs on the device in the compute dtype, the routing vectors and the routing decisions."""

    attend_q: object  # (B, H, N, D): what the queries attend with (routing vectors or q)
    attend_k: object  # (B, H, N, D)
    v: object  # (B, H, N, Dv)
    r_q: object
    q_stat: object
    r_k: object
    k_stat: object
    mem_k: object | None  # (H, K, M, D)
    mem_v: object | None
    real: object | None  # (B, N) bool key padding mask
    aux: dict  # membership, key_membership, assignment, key_assignment, counts, unrouted
    xp: object

    @property
    def membership(self):
        return self.aux["membership"]

    @property
    def key_membership(self):
        return self.aux["key_membership"]


def _route(x: RoutingInputs, xp) -> _Routed:
    dtype = compute_dtype(x.q.dtype)
    q, k, v = (xp.asarray(a, dtype=dtype) for a in (x.q, x.k, x.v))
    centroids = xp.asarray(x.centroids, dtype=dtype)  # (H, K, D)
    # (1)-(2) Prescale, then normalise.
    r_q, q_stat = _normalize(x.query_prescale * q, x.routing_norm, x.norm_eps, xp)
    r_k, k_stat = _normalize(x.key_prescale * k, x.routing_norm, x.norm_eps, xp)
    # (3) Similarities (B, H, N, K) to the head's centroids, as given.
    similarity = xp.matmul(r_q, xp.swapaxes(centroids, -1, -2))
    key_similarity = similarity if x.shared_qk else xp.matmul(r_k, xp.swapaxes(centroids, -1, -2))
    # (4) Nearest centroid; (5) balanced membership.
    membership = _members(similarity, x.cluster_size, x.order, xp)
    key_membership = membership if x.shared_qk else _members(key_similarity, x.cluster_size, x.order, xp)
    # How many query lists hold each token: a bincount of (b, h, token) (CuPy's scatter-add has no int64).
    b, h, n = q.shape[:3]
    flat = (xp.arange(b * h).reshape(b, h, 1, 1) * n + membership).ravel()
    counts = xp.bincount(flat, minlength=b * h * n).reshape(b, h, n).astype(np.int64)
    aux = dict(membership=membership, key_membership=key_membership, counts=counts, unrouted=counts == 0,
               assignment=xp.argmax(similarity, axis=-1).astype(np.int64),
               key_assignment=xp.argmax(key_similarity, axis=-1).astype(np.int64))  # fmt: skip
    memory = (None, None) if x.mem_k is None else (xp.asarray(x.mem_k, dtype=dtype), xp.asarray(x.mem_v, dtype=dtype))
    return _Routed(r_q if x.attend_on == "normalized" else q, r_k if x.normalized_keys else k, v, r_q, q_stat,
                   r_k, k_stat, *memory, None if x.key_padding_mask is None else xp.asarray(x.key_padding_mask),
                   aux, xp)  # fmt: skip


def _slot_index(slots, xp):
    """The index ``(b, h, token)`` of every slot of ``slots`` (B, H, c, W): for gathers and scatter-adds."""
    b, h = slots.shape[:2]
    return (xp.broadcast_to(xp.arange(b).reshape(b, 1, 1, 1), slots.shape),
            xp.broadcast_to(xp.arange(h).reshape(1, h, 1, 1), slots.shape), slots)  # fmt: skip


# --- (6)-(10) attention inside clusters -----------------------------------------------


@dataclass(frozen=True)
class _Clusters:
    """Clusters k0:k1 gathered: query slots, and memory then member key slots."""

    k0: int
    k1: int
    queries: object  # (B, H, c, W): token of each query slot
    keys: object  # (B, H, c, W): token of each member key slot
    q: object  # (B, H, c, W, D)
    k: object  # (B, H, c, M + W, D)
    v: object  # (B, H, c, M + W, Dv)


def _clusters(x: RoutingInputs, routed: _Routed, k0: int, k1: int) -> _Clusters:
    """(6) Gather the clusters' slots; memory slots come first on the key axis."""
    xp = routed.xp
    queries, keys = routed.membership[:, :, k0:k1], routed.key_membership[:, :, k0:k1]
    q = routed.attend_q[_slot_index(queries, xp)]
    k, v = routed.attend_k[_slot_index(keys, xp)], routed.v[_slot_index(keys, xp)]
    if routed.mem_k is not None:
        batch = q.shape[0]
        mem_k, mem_v = routed.mem_k[:, k0:k1], routed.mem_v[:, k0:k1]  # (H, c, M, ·), shared by the batch
        k = xp.concatenate([xp.broadcast_to(mem_k, (batch,) + mem_k.shape), k], axis=3)
        v = xp.concatenate([xp.broadcast_to(mem_v, (batch,) + mem_v.shape), v], axis=3)
    return _Clusters(k0, k1, queries, keys, q, k, v)


def _masks(x: RoutingInputs, routed: _Routed, c: _Clusters, e0: int, e1: int):
    """(8a) Which (query slot, key slot e0:e1) pairs are masked and which are a token and itself, (B, H, c, W, e)."""
    xp, memory = routed.xp, x.num_memory
    slot = xp.arange(e0, e1) - memory  # member slot of each key slot, < 0 on memory slots
    is_member = slot >= 0  # (e,)
    key_token = xp.where(is_member, c.keys[..., xp.maximum(slot, 0)], -1)[..., None, :]  # (B, H, c, 1, e)
    query_token = c.queries[..., :, None]  # (B, H, c, W, 1)
    members_ok = xp.ones(query_token.shape[:-1] + (e1 - e0,), dtype=bool)
    memory_ok = xp.ones_like(members_ok)
    if x.causal:
        query_slot = xp.arange(c.queries.shape[-1])[:, None]  # (W, 1)
        members_ok &= (key_token <= query_token) if x.causal_by == "position" else (slot <= query_slot)
    if routed.real is not None:
        members_ok &= _is_real(routed, xp.maximum(key_token[..., 0, :], 0))[..., None, :]
        query_real = _is_real(routed, c.queries)[..., :, None]
        if x.query_padding != "none":
            members_ok &= query_real
        if x.query_padding == "mask_row":
            memory_ok &= query_real
    masked = ~xp.where(is_member, members_ok, memory_ok)
    is_self = is_member & (key_token == query_token) if x.shared_qk and x.self_mask else xp.zeros_like(masked)
    return masked, is_self


def _is_real(routed: _Routed, tokens):
    """Whether each token of ``tokens`` (B, H, …) is real (the key padding mask)."""
    b = tokens.shape[0]
    return routed.real[routed.xp.arange(b).reshape((b,) + (1,) * (tokens.ndim - 1)), tokens]


def _has_other_keys(x: RoutingInputs, routed: _Routed, c: _Clusters, key_tiles):
    """For the Reformer self rule: whether each query slot's row has a key that is neither masked nor itself,
    (B, H, c, W, 1), or None when the rule does not apply."""
    if x.self_mask_value is not None or not (x.shared_qk and x.self_mask):
        return None
    found = None
    for e0, e1 in key_tiles:
        masked, is_self = _masks(x, routed, c, e0, e1)
        others = (~masked & ~is_self).any(axis=-1, keepdims=True)
        found = others if found is None else found | others
    return found


def _logits(x: RoutingInputs, routed: _Routed, c: _Clusters, e0: int, e1: int, has_other):
    """(7)-(8b) The tile's logits (−inf where excluded) and where they are constants (no gradient)."""
    xp = routed.xp
    scores = x.scale * xp.matmul(c.q, xp.swapaxes(c.k[:, :, :, e0:e1], -1, -2))  # (B, H, c, W, e)
    masked, is_self = _masks(x, routed, c, e0, e1)
    allowed = xp.ones_like(masked)
    constant = xp.zeros_like(masked)
    if x.mask_value is None:
        logits, allowed = scores, ~masked
    elif x.mask_mode == "add":
        logits = xp.where(masked, scores + x.mask_value, scores)
    else:
        logits, constant = xp.where(masked, x.mask_value, scores), masked
    if x.self_mask_value is not None:
        logits = xp.where(is_self, x.self_mask_value, logits)
        allowed, constant = allowed | is_self, constant | is_self
    elif has_other is not None:  # the self key only as a last resort
        allowed = allowed & ~(is_self & has_other)
    return xp.where(allowed, logits, -np.inf).astype(scores.dtype), constant


def _sweep(x: RoutingInputs, routed: _Routed):
    """Each step of clusters with its key tiles and the self rule's pre-pass."""
    w = x.cluster_size
    clusters = routed.membership.shape[2]
    key_tiles = blocks(x.num_memory + w, BLOCK_K)
    for k0, k1 in blocks(clusters, max(BLOCK_Q // w, 1)):
        c = _clusters(x, routed, k0, k1)
        yield c, key_tiles, _has_other_keys(x, routed, c, key_tiles)


def _slots(x: RoutingInputs, routed: _Routed) -> dict:
    """(6)-(10) Every slot's output (B, H, K, W, Dv), log-sum-exp, and row maximum and sum (B, H, K, W) (the
    backward's weights ``exp(z − max) / sum``, as the forward's: with google-research's added −1e9, a row's
    logits and its lse are too large for float32 to give ``exp(z − lse)``)."""
    xp = routed.xp
    b, h, clusters, w = routed.membership.shape
    result = dict(out=xp.zeros((b, h, clusters, w, routed.v.shape[-1]), dtype=routed.v.dtype))
    result.update({name: xp.zeros((b, h, clusters, w), dtype=routed.v.dtype) for name in ("lse", "max", "sum")})
    for c, key_tiles, has_other in _sweep(x, routed):
        tiles = ((_logits(x, routed, c, e0, e1, has_other)[0], c.v[:, :, :, e0:e1]) for e0, e1 in key_tiles)
        for name, value in zip(("out", "lse", "max", "sum"), online_softmax(tiles, xp, statistics=True)):
            result[name][:, :, c.k0:c.k1] = value
    return result


def forward(x: RoutingInputs, xp) -> Result:
    """Steps (1)-(11): ``out``, no ``lse``, and ``aux`` as the other backends'."""
    routed = _route(x, xp)
    slots = _slots(x, routed)
    slot_out = slots["out"]
    # (11) Scatter back: the sum over the clusters that picked a token / (count + scatter_eps); 0 if none did.
    sums = xp.zeros(routed.v.shape, dtype=routed.v.dtype)
    scatter_add(xp, sums, _slot_index(routed.membership, xp), slot_out)
    counts = routed.aux["counts"][..., None]
    divisor = xp.where(counts > 0, counts + x.scatter_eps, 1.0).astype(sums.dtype)  # (B, H, N, 1)
    out = xp.where(counts > 0, sums / divisor, 0.0).astype(sums.dtype)
    return Result(out=out, lse=None, aux=dict(routed.aux, slot_lse=slots["lse"]))


def vjp(x: RoutingInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (11')-(1'), the routing held fixed."""
    routed = _route(x, xp)
    slots = _slots(x, routed)
    dtype, memory = routed.v.dtype, x.num_memory
    dout = xp.asarray(cotangents.dout, dtype=dtype)
    # (11') Each slot receives its token's cotangent divided by the token's count + eps.
    index = _slot_index(routed.membership, xp)
    divisor = (routed.aux["counts"][index][..., None] + x.scatter_eps).astype(dtype)  # integer counts + eps
    d_slot_out = dout[index] / divisor  # (B, H, K, W, Dv), in the compute dtype
    delta = (d_slot_out * slots["out"]).sum(axis=-1)  # Σ_t P dP = d_o · o per slot
    row_sum = xp.where(slots["sum"] > 0, slots["sum"], 1.0)  # a row with no key: every weight is 0 anyway
    d_attend_q, d_attend_k, dv = xp.zeros_like(routed.attend_q), xp.zeros_like(routed.attend_k), xp.zeros_like(routed.v)
    grads = {} if not memory else {"mem_k": xp.zeros_like(routed.mem_k), "mem_v": xp.zeros_like(routed.mem_v)}
    for c, key_tiles, has_other in _sweep(x, routed):
        d_o = d_slot_out[:, :, c.k0:c.k1]  # (B, H, c, W, Dv)
        for e0, e1 in key_tiles:
            logits, constant = _logits(x, routed, c, e0, e1, has_other)
            weights = xp.exp(logits - slots["max"][:, :, c.k0:c.k1, :, None]) / row_sum[:, :, c.k0:c.k1, :, None]
            # (10') slot_out = P · values; (9') dZ = P (dP − d_o·o); (8') none through constants.
            d_values = xp.matmul(xp.swapaxes(weights, -1, -2), d_o)  # (B, H, c, e, Dv)
            d_logits = weights * (xp.matmul(d_o, xp.swapaxes(c.v[:, :, :, e0:e1], -1, -2))
                                  - delta[:, :, c.k0:c.k1, :, None])  # fmt: skip
            d_scores = xp.where(constant, 0.0, d_logits)
            # (7') scores = scale · q_slots · keys; (6') gathers become scatter-adds.
            scatter_add(xp, d_attend_q, _slot_index(c.queries, xp), x.scale * xp.matmul(d_scores, c.k[:, :, :, e0:e1]))
            d_keys = x.scale * xp.matmul(xp.swapaxes(d_scores, -1, -2), c.q)  # (B, H, c, e, D)
            _add_key_slots(x, routed, c, e0, e1, (d_attend_k, dv), (d_keys, d_values), grads)
    # (2')-(1') Through the normalisation where attention used it, then the prescale.
    dq, dk = d_attend_q, d_attend_k
    if x.attend_on == "normalized":
        dq = x.query_prescale * _normalize_vjp(dq, routed.r_q, routed.q_stat, x.routing_norm, x.norm_eps, xp)
    if x.normalized_keys:
        dk = x.key_prescale * _normalize_vjp(dk, routed.r_k, routed.k_stat, x.routing_norm, x.norm_eps, xp)
    return Grads(q=dq, k=dk, v=dv, **grads)


def _add_key_slots(x: RoutingInputs, routed: _Routed, c: _Clusters, e0: int, e1: int, targets, values, grads) -> None:
    """(6') Key slots e0:e1's gradients: member slots into their tokens' rows of ``targets`` (dk, dv), memory
    slots summed over the batch into ``grads["mem_k"]``, ``grads["mem_v"]``."""
    xp, memory = routed.xp, x.num_memory
    split = min(max(memory - e0, 0), e1 - e0)  # the tile's memory slots come first
    if split:
        grads["mem_k"][:, c.k0:c.k1, e0:e0 + split] += values[0][:, :, :, :split].sum(axis=0)
        grads["mem_v"][:, c.k0:c.k1, e0:e0 + split] += values[1][:, :, :, :split].sum(axis=0)
    if split < e1 - e0:
        index = _slot_index(c.keys[..., e0 + split - memory : e1 - memory], xp)
        for target, value in zip(targets, values):
            scatter_add(xp, target, index, value[:, :, :, split:])
