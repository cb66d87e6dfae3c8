"""Routing attention (the Routing Transformer): the executable specification.

Roy, Saffar, Vaswani & Grangier 2021, "Efficient Content-Based Sparse Attention
with Routing Transformers" (TACL 9; arXiv 2003.05997). Queries and keys are
normalised into routing vectors; each of K centroids (shared by the queries and
the keys of a head, given explicitly) selects the ``window`` tokens most similar
to it, so every cluster has exactly ``window`` members (balanced clusters);
attention runs inside each cluster, between its query list and its key list
(plus optional memory key/values per cluster), and each token's output is the
mean of what the clusters that picked it computed for it.

The stages are separate functions, in the order of the equations of
spec/routing.md (step numbers below match): routing vectors (1)-(2)
:func:`normalize`, similarities (3) :func:`cluster_similarity`, nearest centroid
(4) :func:`nearest_cluster`, balanced membership and order (5)
:func:`top_window`, gathering (6) :func:`gather_slots`, scores (7), masks (8)
:func:`slot_masks` and :func:`slot_logits`, softmax (9) (refattn.core), values
(10), scatter back (11) :func:`scatter_mean`. The discrete decisions (4)-(5) are
returned as integer intermediates and held fixed by the VJP.

Every behaviour on which google-research and lucidrains differ is a parameter;
``preset=`` sets them all (refattn/routing/presets.py), canonical = the paper.

Einsum letters: b batch, h head, n token, d head dim (of q and k), e value dim,
c cluster, s query slot of a cluster, t key slot of a cluster (memory slots
first, then window slots).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..core import checks, registry
from ..core.errors import SpecError
from ..core.precision import FLOAT64, Numerics, numerics
from ..core.results import Grads, Result
from ..core.softmax import masked_softmax
from .presets import FROM_PRESET, resolve

ROUTING_NORMS = ("layer", "l2")
ATTEND_ON = ("normalized", "raw")
CAUSAL_BY = ("position", "slot")
ORDERS = ("position", "similarity")
QUERY_PADDING = ("mask_row", "mask_window", "none")


# --- stages (1)-(5): routing ---------------------------------------------------


def normalize(x: np.ndarray, *, norm: str, eps: float, num: Numerics = FLOAT64) -> tuple[np.ndarray, np.ndarray]:
    """Step (2): routing vectors ``r`` of ``x`` (..., D), and the statistic their VJP needs.

    ``norm="layer"``: ``r = (x - mean(x)) / sqrt(var(x) + eps)`` with the biased
    variance, no scale and no bias (google-research ``layer_norm(x,
    scaling=False)``); the statistic is ``1 / sqrt(var + eps)`` (..., 1).
    ``norm="l2"``: ``r = x / max(|x|, eps)`` (``F.normalize``); the statistic is
    ``max(|x|, eps)`` (..., 1).
    """
    if norm == "layer":
        centred = num.store(x - x.mean(axis=-1, keepdims=True))  # (..., D)
        variance = num.store(np.mean(centred * centred, axis=-1, keepdims=True))  # (..., 1)
        inv_std = num.store(1.0 / np.sqrt(variance + eps))  # (..., 1)
        return num.store(centred * inv_std), inv_std
    length = num.store(np.sqrt(np.sum(x * x, axis=-1, keepdims=True)))  # (..., 1)
    denominator = np.maximum(length, eps)
    return num.store(x / denominator), denominator


def normalize_vjp(dr: np.ndarray, r: np.ndarray, stat: np.ndarray, *, norm: str, eps: float, num: Numerics = FLOAT64):
    """Step (2'): the cotangent of ``x`` from that of ``r = normalize(x)``.

    Layer norm: ``dx = s (dr - mean(dr) - r mean(dr r))`` with ``s = 1/sqrt(var + eps)``.
    L2: ``dx = (dr - r (r · dr)) / |x|``, or ``dr / eps`` where the norm is clamped.
    """
    if norm == "layer":
        along_r = np.mean(dr * r, axis=-1, keepdims=True)  # (..., 1)
        return num.store(stat * (dr - dr.mean(axis=-1, keepdims=True) - r * along_r))
    clamped = stat <= eps
    along_r = np.where(clamped, 0.0, np.sum(dr * r, axis=-1, keepdims=True))  # (..., 1)
    return num.store((dr - r * along_r) / stat)


def routing_vectors(x, *, routing_norm="layer", norm_eps=1e-6, prescale=1.0) -> np.ndarray:
    """Steps (1)-(2) on their own: ``normalize(prescale · x)``, float64.

    Parameters
    ----------
    x : ndarray (..., D)
        Finite queries or keys.
    routing_norm : {"layer", "l2"}
    norm_eps : float > 0
    prescale : float > 0

    Returns
    -------
    ndarray (..., D), float64
    """
    x = checks.float_array(x, "x")
    norm = checks.choice(routing_norm, "routing_norm", ROUTING_NORMS)
    eps = checks.real_number(norm_eps, "norm_eps", minimum=0.0, inclusive=False)
    prescale = checks.real_number(prescale, "prescale", minimum=0.0, inclusive=False)
    return normalize(prescale * np.asarray(x, np.float64), norm=norm, eps=eps)[0]


def cluster_similarity(r: np.ndarray, centroids: np.ndarray, num: Numerics = FLOAT64) -> np.ndarray:
    """Step (3): ``S[b, h, n, c] = r[b, h, n] · centroids[h, c]`` (B, H, N, K); centroids as given, not normalised."""
    return num.store(np.einsum("bhnd,hcd->bhnc", r, centroids, optimize=True))


def nearest_cluster(similarity: np.ndarray) -> np.ndarray:
    """Step (4): each token's most similar centroid (B, H, N), int64; ties go to the lower cluster index."""
    return np.argmax(similarity, axis=-1).astype(np.int64)


def top_window(similarity: np.ndarray, window: int, order: str) -> np.ndarray:
    """Step (5): the ``window`` tokens each centroid selects, (B, H, K, W) int64.

    Each centroid ranks every token by descending similarity and keeps the
    first ``window`` (balanced: every cluster has exactly ``window`` members, a
    token may be in several clusters or in none). Ties go to the lower
    position. ``order`` then lays the members out: ``"position"`` ascending
    (google-research ``tf.sort(idx)``), ``"similarity"`` descending
    (lucidrains ``topk``).
    """
    by_cluster = np.moveaxis(similarity, -1, -2)  # (B, H, K, N)
    ranked = np.argsort(-by_cluster, axis=-1, kind="stable")[..., :window]  # (B, H, K, W)
    if order == "position":
        ranked = np.sort(ranked, axis=-1)
    return ranked.astype(np.int64)


def decision_margins(similarity: np.ndarray, window: int, order: str) -> dict[str, float]:
    """How far the discrete decisions of steps (4)-(5) are from a tie, in units of similarity.

    Returns
    -------
    dict
        ``assignment``: smallest gap between a token's best and second-best
        centroid; ``selection``: smallest gap between a cluster's last member
        and the best token it leaves out; ``order``: with ``order="similarity"``,
        the smallest gap between consecutive members (``inf`` where a decision
        does not exist: one cluster, a window of every token, position order).
    """
    ranked = -np.sort(-similarity, axis=-1)  # (B, H, N, K), descending
    assignment = np.min(ranked[..., 0] - ranked[..., 1]) if similarity.shape[-1] > 1 else np.inf
    per_cluster = -np.sort(-np.moveaxis(similarity, -1, -2), axis=-1)  # (B, H, K, N), descending
    n = per_cluster.shape[-1]
    selection = np.min(per_cluster[..., window - 1] - per_cluster[..., window]) if window < n else np.inf
    gaps = per_cluster[..., : window - 1] - per_cluster[..., 1:window]
    in_order = np.min(gaps) if order == "similarity" and window > 1 else np.inf
    return {"assignment": float(assignment), "selection": float(selection), "order": float(in_order)}


# --- stages (6)-(11): attention inside clusters -------------------------------------


def gather_slots(x: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """Step (6): ``x`` (B, H, N, ...) at each slot's token: (B, H, K, W, ...)."""
    batch, head = np.indices(membership.shape[:2], sparse=True)  # (B, 1), (1, H)
    return x[batch[..., None, None], head[..., None, None], membership]


def scatter_add_slots(target: np.ndarray, membership: np.ndarray, values: np.ndarray) -> None:
    """Adjoint of :func:`gather_slots`: add ``values`` (B, H, K, W, ...) into ``target`` (B, H, N, ...) in place."""
    batch, head = np.indices(membership.shape[:2], sparse=True)
    np.add.at(target, (batch[..., None, None], head[..., None, None], membership), values)


def slot_masks(membership, key_membership, *, num_memory: int, causal: bool, causal_by: str, padding_mask,
               query_padding: str, self_mask: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Step (8a): which (query slot, key slot) pairs are masked, and which are a token and itself.

    The key axis is the ``num_memory`` memory slots, then the ``W`` window slots.

    * causal by ``"position"``: window key ``t`` is masked unless its token's
      position is at most the query's; by ``"slot"``: unless ``t <= s``.
      Memory slots are never causally masked.
    * padding (``padding_mask`` (B, N), True = real token): padded window keys
      are masked; a padded query's row is masked whole (``"mask_row"``), in its
      window keys only (``"mask_window"``) or not at all (``"none"``).
    * ``self_mask``: window key ``t`` holds the query's own token.

    Returns
    -------
    masked, is_self : bool ndarrays (B, H, K, W, M + W)
    """
    query_position = membership[..., :, None]  # (B, H, K, W, 1)
    key_position = key_membership[..., None, :]  # (B, H, K, 1, W)
    slots = membership.shape[-1]
    window_ok = np.ones(membership.shape + (slots,), dtype=bool)  # (B, H, K, W, W)
    memory_ok = np.ones(membership.shape + (num_memory,), dtype=bool)  # (B, H, K, W, M)
    if causal:
        window_ok &= (key_position <= query_position) if causal_by == "position" else np.tri(slots, dtype=bool)
    if padding_mask is not None:
        real = np.broadcast_to(padding_mask[:, None, :], membership.shape[:2] + padding_mask.shape[-1:])  # (B, H, N)
        window_ok &= gather_slots(real, key_membership)[..., None, :]
        query_real = gather_slots(real, membership)[..., :, None]  # (B, H, K, W, 1)
        if query_padding != "none":
            window_ok &= query_real
        if query_padding == "mask_row":
            memory_ok &= query_real
    masked = ~np.concatenate([memory_ok, window_ok], axis=-1)
    is_self = np.zeros_like(masked)
    if self_mask:
        is_self[..., num_memory:] = key_position == query_position
    return masked, is_self


def slot_logits(scores, masked, is_self, *, mask_value, self_mask_value):
    """Step (8b): the logits, the keys that take part, and the logits that are constants.

    * ``mask_value=None`` excludes masked keys exactly; a number replaces their logits.
    * ``self_mask_value=None`` (the Reformer rule): the self key is excluded
      when its row has another key with a real (not replaced) logit, and kept
      with its own logit otherwise. A number replaces the self logit after
      every other mask, un-masking it if it was masked (lucidrains'
      ``masked_fill`` order).

    Returns
    -------
    logits : ndarray (B, H, K, W, M + W)
    allowed : bool ndarray, same shape
        Keys not excluded (``-inf``).
    constant : bool ndarray, same shape
        Keys whose logit was replaced by a number: no gradient flows through them.
    """
    if mask_value is None:
        logits, allowed, constant = scores, ~masked, np.zeros_like(masked)
    else:
        logits, allowed, constant = np.where(masked, mask_value, scores), np.ones_like(masked), masked
    if self_mask_value is not None:
        logits = np.where(is_self, self_mask_value, logits)
        return logits, allowed | is_self, constant | is_self
    others = allowed & ~constant & ~is_self
    last_resort = ~np.any(others, axis=-1, keepdims=True)  # (B, H, K, W, 1)
    return logits, allowed & ~(is_self & ~last_resort), constant


def scatter_mean(slot_out: np.ndarray, membership: np.ndarray, num_tokens: int, eps: float,
                 num: Numerics = FLOAT64) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Step (11): ``out[n] = sum of slot_out over the slots of token n / (count[n] + eps)``.

    A token in no query list (``count = 0``) gets exactly 0, also for ``eps = 0``.

    Returns
    -------
    out : ndarray (B, H, N, Dv)
    counts : int64 ndarray (B, H, N)
        How many query lists hold each token.
    """
    b, h = membership.shape[:2]
    sums = np.zeros((b, h, num_tokens, slot_out.shape[-1]), dtype=slot_out.dtype)  # (B, H, N, Dv)
    scatter_add_slots(sums, membership, slot_out)
    counts = np.zeros((b, h, num_tokens), dtype=np.int64)  # (B, H, N)
    scatter_add_slots(counts, membership, 1)
    routed = counts[..., None] > 0
    out = np.where(routed, num.store(sums) / np.where(routed, counts[..., None] + eps, 1.0), 0.0)
    return num.store(out), counts


# --- checked inputs -----------------------------------------------------------


@dataclass(frozen=True)
class RoutingInputs:
    """Checked arguments of one routing-attention call, preset resolved; arrays in the caller's dtype."""

    q: np.ndarray  # (B, H, N, D)
    k: np.ndarray  # (B, H, N, D)
    v: np.ndarray  # (B, H, N, Dv)
    centroids: np.ndarray  # (H, K, D)
    mem_k: np.ndarray | None  # (H, K, M, D)
    mem_v: np.ndarray | None  # (H, K, M, Dv)
    padding_mask: np.ndarray | None  # (B, N) bool, True = real token
    window: int
    shared_qk: bool
    causal: bool
    routing_norm: str
    norm_eps: float
    query_prescale: float
    attend_on: str
    normalize_shared_keys: bool
    scale: float
    causal_by: str
    order: str
    mask_value: float | None
    self_mask: bool
    self_mask_value: float | None
    query_padding: str
    scatter_eps: float

    @property
    def num_memory(self) -> int:
        return 0 if self.mem_k is None else self.mem_k.shape[2]

    @property
    def key_prescale(self) -> float:
        """Under shared-QK the keys are query vectors and get the query prescale too."""
        return self.query_prescale if self.shared_qk else 1.0

    @property
    def normalized_keys(self) -> bool:
        return self.attend_on == "normalized" or (self.shared_qk and self.normalize_shared_keys)


def _optional_number(x, name: str) -> float | None:
    return None if x is None else checks.real_number(x, name, minimum=-np.inf)


def check_window(window, length: int) -> int:
    """``window``: an integer in [1, N]."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or not 1 <= window <= length:
        raise SpecError("window", f"an integer in [1, N] = [1, {length}] (tokens per cluster)", repr(window))
    return int(window)


def check_centroids(centroids, heads: int, head_dim: int) -> np.ndarray:
    """``centroids``: finite (H, K, D) with K >= 1."""
    if isinstance(centroids, np.ndarray) and (centroids.ndim != 3 or centroids.shape[0] != heads
                                              or centroids.shape[2] != head_dim):  # fmt: skip
        raise SpecError("centroids", f"shape (H, K, D) = ({heads}, K, {head_dim})", f"shape {centroids.shape}")
    centroids = checks.float_array(centroids, "centroids")
    if centroids.shape[1] < 1:
        raise SpecError("centroids", "num_clusters K >= 1", f"shape {centroids.shape} (K = 0)")
    return centroids


def check_padding_mask(padding_mask, batch: int, length: int) -> np.ndarray | None:
    """``padding_mask``: None or bool (B, N), True = real token."""
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, np.ndarray) or padding_mask.dtype != np.bool_ or padding_mask.shape != (batch, length):
        given = f"shape {padding_mask.shape}, dtype {padding_mask.dtype}" if isinstance(padding_mask, np.ndarray) else repr(padding_mask)
        raise SpecError("padding_mask", f"a bool array of shape (B, N) = ({batch}, {length}), True = real token", given)
    return padding_mask


def _check_memory(mem_k, mem_v, heads: int, clusters: int, head_dim: int, value_dim: int):
    if (mem_k is None) != (mem_v is None):
        raise SpecError("mem_k, mem_v", "both or neither", f"mem_k {'None' if mem_k is None else 'given'}, "
                        f"mem_v {'None' if mem_v is None else 'given'}")  # fmt: skip
    if mem_k is None:
        return None, None
    for name, x, dim in (("mem_k", mem_k, head_dim), ("mem_v", mem_v, value_dim)):
        x = checks.float_array(x, name)
        if x.ndim != 4 or x.shape[:2] != (heads, clusters) or x.shape[3] != dim or x.shape[2] < 1:
            raise SpecError(name, f"shape (H, K, M, {'D' if name == 'mem_k' else 'Dv'}) = ({heads}, {clusters}, M >= 1, {dim})",
                            f"shape {x.shape}")  # fmt: skip
    if mem_k.shape[2] != mem_v.shape[2]:
        raise SpecError("mem_v", f"M = {mem_k.shape[2]} memory slots (as mem_k)", f"shape {mem_v.shape}")
    return mem_k, mem_v


def check_routing_inputs(q, k, v, *, centroids, window, shared_qk, causal, padding_mask, mem_k, mem_v, preset,
                         **preset_params) -> RoutingInputs:  # fmt: skip
    """Check every argument of :func:`routing_attention`; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = checks.qkv(q, k, v)
    if shape.kv_heads != shape.q_heads:
        raise SpecError("k", f"{shape.q_heads} heads, as q (routing attention has no grouped-query heads)", f"{shape.kv_heads} heads")
    if shape.kv_len != shape.q_len:
        raise SpecError("k", f"{shape.q_len} tokens, as q (routing is self-attention)", f"{shape.kv_len} tokens")
    p = resolve(preset, **preset_params)
    centroids = check_centroids(centroids, shape.q_heads, shape.head_dim)
    mem_k, mem_v = _check_memory(mem_k, mem_v, shape.q_heads, centroids.shape[1], shape.head_dim, shape.value_dim)
    prescale = p["query_prescale"]
    return RoutingInputs(
        q=q, k=k, v=v, centroids=centroids, mem_k=mem_k, mem_v=mem_v,
        padding_mask=check_padding_mask(padding_mask, shape.batch, shape.q_len),
        window=check_window(window, shape.q_len),
        shared_qk=checks.flag(shared_qk, "shared_qk"),
        causal=checks.flag(causal, "causal"),
        routing_norm=checks.choice(p["routing_norm"], "routing_norm", ROUTING_NORMS),
        norm_eps=checks.real_number(p["norm_eps"], "norm_eps", minimum=0.0, inclusive=False),
        query_prescale=1.0 / np.sqrt(shape.head_dim) if prescale is None else checks.real_number(
            prescale, "query_prescale", minimum=0.0, inclusive=False),
        attend_on=checks.choice(p["attend_on"], "attend_on", ATTEND_ON),
        normalize_shared_keys=checks.flag(p["normalize_shared_keys"], "normalize_shared_keys"),
        scale=checks.scale(p["scale"], shape.head_dim),
        causal_by=checks.choice(p["causal_by"], "causal_by", CAUSAL_BY),
        order=checks.choice(p["order"], "order", ORDERS),
        mask_value=_optional_number(p["mask_value"], "mask_value"),
        self_mask=checks.flag(p["self_mask"], "self_mask"),
        self_mask_value=_optional_number(p["self_mask_value"], "self_mask_value"),
        query_padding=checks.choice(p["query_padding"], "query_padding", QUERY_PADDING),
        scatter_eps=checks.real_number(p["scatter_eps"], "scatter_eps", minimum=0.0),
    )  # fmt: skip


# --- the mechanism ------------------------------------------------------------


def _forward_steps(x: RoutingInputs, num: Numerics) -> dict:
    """Steps (1)-(11) of spec/routing.md; returns every intermediate the VJP needs."""
    q, k, v = num.load(x.q), num.load(x.k), num.load(x.v)  # (B, H, N, D), (B, H, N, D), (B, H, N, Dv)
    centroids = num.load(x.centroids)  # (H, K, D)
    # (1) Prescaling: q by query_prescale (google-research's 1/sqrt(D) before its layer norm).
    scaled_q = num.store(x.query_prescale * q)  # (B, H, N, D)
    scaled_k = num.store(x.key_prescale * k)
    # (2) Routing vectors: layer norm without scale or bias, or L2.
    r_q, q_stat = normalize(scaled_q, norm=x.routing_norm, eps=x.norm_eps, num=num)  # (B, H, N, D)
    r_k, k_stat = normalize(scaled_k, norm=x.routing_norm, eps=x.norm_eps, num=num)
    # (3) Similarity of every routing vector to every centroid of its head.
    similarity = cluster_similarity(r_q, centroids, num)  # (B, H, N, K)
    key_similarity = similarity if x.shared_qk else cluster_similarity(r_k, centroids, num)
    # (4) Nearest centroid of every token (reported; used by the centroid updates).
    assignment, key_assignment = nearest_cluster(similarity), nearest_cluster(key_similarity)  # (B, H, N)
    # (5) Balanced membership: each centroid's top-`window` tokens, laid out in `order`.
    membership = top_window(similarity, x.window, x.order)  # (B, H, K, W)
    key_membership = membership if x.shared_qk else top_window(key_similarity, x.window, x.order)
    # (6) Gather the attended vectors into cluster slots; memory slots come first on the key axis.
    attend_q = r_q if x.attend_on == "normalized" else q
    attend_k = r_k if x.normalized_keys else k
    q_slots = gather_slots(attend_q, membership)  # (B, H, K, W, D)
    keys = gather_slots(attend_k, key_membership)  # (B, H, K, W, D)
    values = gather_slots(v, key_membership)  # (B, H, K, W, Dv)
    if x.mem_k is not None:
        batch = q.shape[0]
        keys = np.concatenate([np.broadcast_to(num.load(x.mem_k), (batch,) + x.mem_k.shape), keys], axis=3)
        values = np.concatenate([np.broadcast_to(num.load(x.mem_v), (batch,) + x.mem_v.shape), values], axis=3)
    # (7) Scaled scores inside each cluster.
    scores = num.store(x.scale * np.einsum("bhcsd,bhctd->bhcst", q_slots, keys, optimize=True))  # (B, H, K, W, M+W)
    # (8) Masks: causal (by position or slot), padding, self; excluded or replaced by constants.
    masked, is_self = slot_masks(
        membership, key_membership, num_memory=x.num_memory, causal=x.causal, causal_by=x.causal_by,
        padding_mask=x.padding_mask, query_padding=x.query_padding, self_mask=x.shared_qk and x.self_mask,
    )  # fmt: skip
    logits, allowed, constant = slot_logits(scores, masked, is_self, mask_value=x.mask_value,
                                            self_mask_value=x.self_mask_value)  # fmt: skip
    # (9) Softmax over each query slot's keys, and its log-sum-exp.
    weights, lse = masked_softmax(logits, allowed, num)  # (B, H, K, W, M+W), (B, H, K, W)
    # (10) Weighted values.
    slot_out = num.store(np.einsum("bhcst,bhcte->bhcse", weights, values, optimize=True))  # (B, H, K, W, Dv)
    # (11) Scatter back: sum over the clusters that picked a token / (count + scatter_eps).
    out, counts = scatter_mean(slot_out, membership, q.shape[2], x.scatter_eps, num)  # (B, H, N, Dv), (B, H, N)
    aux = dict(
        membership=membership, key_membership=key_membership, assignment=assignment,
        key_assignment=key_assignment, counts=counts, unrouted=counts == 0,
    )  # fmt: skip
    return dict(q_stat=q_stat, k_stat=k_stat, r_q=r_q, r_k=r_k, q_slots=q_slots, keys=keys, values=values,
                constant=constant, weights=weights, lse=lse, out=out, aux=aux)  # fmt: skip


def routing_attention(
    q, k, v, *, centroids, window, shared_qk=False, causal=False, padding_mask=None, mem_k=None, mem_v=None,
    preset=None, routing_norm=FROM_PRESET, norm_eps=FROM_PRESET, query_prescale=FROM_PRESET,
    attend_on=FROM_PRESET, normalize_shared_keys=FROM_PRESET, scale=FROM_PRESET, causal_by=FROM_PRESET,
    order=FROM_PRESET, mask_value=FROM_PRESET, self_mask=FROM_PRESET, self_mask_value=FROM_PRESET,
    query_padding=FROM_PRESET, scatter_eps=FROM_PRESET, precision=None, backend="reference",
) -> Result:  # fmt: skip
    """Routing attention: balanced k-means routing, attention inside each cluster, mean scatter back.

    Parameters
    ----------
    q, k : ndarray (B, H, N, D)
    v : ndarray (B, H, N, Dv)
    centroids : ndarray (H, K, D)
        The centroids of each head, shared by its queries and keys, as given
        (not normalised). ``K >= 1``.
    window : int in [1, N]
        Tokens per cluster (each centroid's top-``window``).
    shared_qk : bool
        Keys are query vectors (Reformer's shared-QK): the key lists are the
        query lists, routed by q alone; the keys get the query prescale; a
        token's attention to itself follows ``self_mask``. ``k`` must still be
        given (the published models pass ``k = q``); its gradient is the key
        role's, so a shared projection's gradient is ``dq + dk``.
    causal : bool
        Mask keys after the query (by ``causal_by``).
    padding_mask : bool ndarray (B, N), optional
        True = real token. Padded tokens are routed like any other; as keys
        they are masked; their own rows follow ``query_padding``.
    mem_k, mem_v : ndarray (H, K, M, D) and (H, K, M, Dv), optional
        Learned memory key/values of each cluster (lucidrains ``num_mem_kv``),
        prepended to every cluster's keys; never masked by causality or key
        padding, never normalised.
    preset : {None, "google_research", "lucidrains"}
        None is the canonical semantics; "google-research" is accepted too.
    routing_norm, norm_eps, query_prescale, attend_on, normalize_shared_keys, scale,
    causal_by, order, mask_value, self_mask, self_mask_value, query_padding, scatter_eps
        Override the preset (refattn/routing/presets.py documents each).
        ``query_prescale`` acts on the routing vectors only; with
        ``attend_on="raw"`` attention uses q and k as given.
    precision : {None, "float64", "float32", "float16", "bfloat16"} or Numerics
        Evaluate in that precision (refattn.core.precision; tolerances only).
    backend : {"reference", "numba"}
        "numba": refattn/routing/numba.py, computing in float32 for float32/float16/bfloat16
        inputs (float64 otherwise) and returning in that dtype; ``precision`` must then be None.

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv), float64; ``lse`` (B, H, K, W), the log-sum-exp
        of every cluster slot's row (``-inf`` on a fully masked row); ``aux``:
        ``membership`` and ``key_membership`` (B, H, K, W) int64, the token of
        each query and key slot in ``order``; ``assignment`` and
        ``key_assignment`` (B, H, N) int64, each token's nearest centroid;
        ``counts`` (B, H, N) int64, how many query lists hold each token;
        ``unrouted`` (B, H, N) bool, ``counts == 0`` (their output is 0).
    """
    params = dict(
        centroids=centroids, window=window, shared_qk=shared_qk, causal=causal, padding_mask=padding_mask,
        mem_k=mem_k, mem_v=mem_v, preset=preset, routing_norm=routing_norm, norm_eps=norm_eps,
        query_prescale=query_prescale, attend_on=attend_on, normalize_shared_keys=normalize_shared_keys,
        scale=scale, causal_by=causal_by, order=order, mask_value=mask_value, self_mask=self_mask,
        self_mask_value=self_mask_value, query_padding=query_padding, scatter_eps=scatter_eps,
    )  # fmt: skip
    if backend != "reference":
        return _other_backend(backend, precision).routing_attention(q, k, v, **params)
    x = check_routing_inputs(q, k, v, **params)
    steps = _forward_steps(x, numerics(precision))
    return Result(out=steps["out"].astype(np.float64), lse=steps["lse"].astype(np.float64), aux=steps["aux"])


def routing_attention_vjp(
    dout, q, k, v, *, dlse=None, centroids, window, shared_qk=False, causal=False, padding_mask=None, mem_k=None,
    mem_v=None, preset=None, routing_norm=FROM_PRESET, norm_eps=FROM_PRESET, query_prescale=FROM_PRESET,
    attend_on=FROM_PRESET, normalize_shared_keys=FROM_PRESET, scale=FROM_PRESET, causal_by=FROM_PRESET,
    order=FROM_PRESET, mask_value=FROM_PRESET, self_mask=FROM_PRESET, self_mask_value=FROM_PRESET,
    query_padding=FROM_PRESET, scatter_eps=FROM_PRESET, precision=None, backend="reference",
) -> Grads:  # fmt: skip
    """Gradients of :func:`routing_attention` with the routing (steps (4)-(5)) held fixed.

    Parameters are those of :func:`routing_attention`, plus ``dout`` (B, H, N, Dv)
    and ``dlse`` (B, H, K, W), optional (0 when omitted).

    Returns
    -------
    Grads
        ``q``, ``k``, ``v``, and ``mem_k``, ``mem_v`` when given. Where attention
        uses normalised vectors the gradient runs through the normalisation;
        the similarities, the membership and the centroids get none (the
        decisions are piecewise constant). Replaced logits (``mask_value``,
        ``self_mask_value``) are constants.
    """
    params = dict(
        centroids=centroids, window=window, shared_qk=shared_qk, causal=causal, padding_mask=padding_mask,
        mem_k=mem_k, mem_v=mem_v, preset=preset, routing_norm=routing_norm, norm_eps=norm_eps,
        query_prescale=query_prescale, attend_on=attend_on, normalize_shared_keys=normalize_shared_keys,
        scale=scale, causal_by=causal_by, order=order, mask_value=mask_value, self_mask=self_mask,
        self_mask_value=self_mask_value, query_padding=query_padding, scatter_eps=scatter_eps,
    )  # fmt: skip
    if backend != "reference":
        return _other_backend(backend, precision).routing_attention_vjp(dout, q, k, v, dlse=dlse, **params)
    x = check_routing_inputs(q, k, v, **params)
    b, h, n, dv = x.v.shape
    dout = checks.cotangent(dout, "dout", (b, h, n, dv))
    dlse = None if dlse is None else checks.cotangent(dlse, "dlse", (b, h, x.centroids.shape[1], x.window))
    num = numerics(precision)
    f = _forward_steps(x, num)
    grads = _backward_steps(x, f, num.load(dout), None if dlse is None else num.load(dlse), num)
    return Grads({name: g.astype(np.float64) for name, g in grads.items()})


def _backward_steps(x: RoutingInputs, f: dict, dout: np.ndarray, dlse, num: Numerics) -> dict:
    """Steps (11')-(1'): the adjoints of the forward steps, routing held fixed."""
    membership, key_membership = f["aux"]["membership"], f["aux"]["key_membership"]
    memory = x.num_memory
    # (11') Each slot receives its token's cotangent divided by the token's count + eps.
    counts = gather_slots(f["aux"]["counts"], membership)[..., None]  # (B, H, K, W, 1), >= 1
    d_slot_out = num.store(gather_slots(dout, membership) / (counts + x.scatter_eps))  # (B, H, K, W, Dv)
    # (10') slot_out = P · values.
    d_values = num.store(np.einsum("bhcst,bhcse->bhcte", f["weights"], d_slot_out, optimize=True))  # (B, H, K, M+W, Dv)
    d_weights = num.store(np.einsum("bhcse,bhcte->bhcst", d_slot_out, f["values"], optimize=True))  # (B, H, K, W, M+W)
    # (9') Softmax and lse: dz = P (dP - sum_t P dP) + P dlse; excluded keys have P = 0.
    p = f["weights"]
    d_logits = p * (d_weights - num.store(np.sum(p * d_weights, axis=-1, keepdims=True)))
    if dlse is not None:
        d_logits = d_logits + p * dlse[..., None]
    # (8') Replaced logits are constants.
    d_scores = num.store(np.where(f["constant"], 0.0, d_logits))
    # (7') scores = scale · q_slots · keys.
    d_q_slots = num.store(x.scale * np.einsum("bhcst,bhctd->bhcsd", d_scores, f["keys"], optimize=True))
    d_keys = num.store(x.scale * np.einsum("bhcst,bhcsd->bhctd", d_scores, f["q_slots"], optimize=True))
    # (6') Gathers become scatter-adds; memory is shared by the batch.
    d_attend_q = np.zeros_like(f["r_q"])  # (B, H, N, D)
    d_attend_k = np.zeros_like(f["r_k"])
    dv = np.zeros(x.v.shape, dtype=d_values.dtype)  # (B, H, N, Dv)
    scatter_add_slots(d_attend_q, membership, d_q_slots)
    scatter_add_slots(d_attend_k, key_membership, d_keys[:, :, :, memory:])
    scatter_add_slots(dv, key_membership, d_values[:, :, :, memory:])
    grads = {}
    # (2')-(1') Through the normalisation where attention used it, then the prescale.
    dq, dk = num.store(d_attend_q), num.store(d_attend_k)
    if x.attend_on == "normalized":
        dq = normalize_vjp(dq, f["r_q"], f["q_stat"], norm=x.routing_norm, eps=x.norm_eps, num=num)
        dq = num.store(x.query_prescale * dq)
    if x.normalized_keys:
        dk = normalize_vjp(dk, f["r_k"], f["k_stat"], norm=x.routing_norm, eps=x.norm_eps, num=num)
        dk = num.store(x.key_prescale * dk)
    grads.update(q=dq, k=dk, v=num.store(dv))
    if memory:
        grads["mem_k"] = num.store(d_keys[:, :, :, :memory].sum(axis=0))
        grads["mem_v"] = num.store(d_values[:, :, :, :memory].sum(axis=0))
    return grads


def _other_backend(backend: str, precision):
    if precision is not None:
        raise SpecError("precision", "None with a non-reference backend (kernels compute in their input dtype)", repr(precision))
    return registry.backend("routing", backend)
