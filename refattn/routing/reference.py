"""Routing attention (the Routing Transformer): the executable specification.

Roy, Saffar, Vaswani & Grangier 2021, "Efficient Content-Based Sparse Attention
with Routing Transformers" (TACL 9; arXiv 2003.05997). Queries and keys are
normalised into routing vectors; each of K centroids (shared by the queries and
the keys of a head, given explicitly) selects the ``cluster_size`` tokens most
similar to it, so every cluster has exactly ``cluster_size`` members (balanced
clusters);
attention runs inside each cluster, between its query list and its key list
(plus optional memory key/values per cluster), and each token's output is the
mean of what the clusters that picked it computed for it.

The stages are separate functions, in the order of the equations of
spec/routing.md (step numbers below match): routing vectors (1)-(2)
:func:`normalize`, similarities (3) :func:`cluster_similarity`, nearest centroid
(4) :func:`nearest_cluster`, balanced membership and order (5)
:func:`top_members`, gathering (6) :func:`gather_slots`, scores (7), masks (8)
:func:`slot_masks` and :func:`slot_logits`, softmax (9) (refattn.core), values
(10), scatter back (11) :func:`scatter_mean`. The discrete decisions (4)-(5) are
returned as integer intermediates and held fixed by the VJP. spec/routing.md,
"Paper symbols", maps the paper's symbols and equations to these steps.

Every behaviour on which google-research and lucidrains differ is a parameter;
``preset=`` sets them all (refattn/routing/presets.py), canonical = the paper.

Einsum letters: b batch, h head, n token, d head dim (of q and k), e value dim,
c cluster, s query slot of a cluster, t key slot of a cluster (memory slots
first, then the cluster's W = cluster_size member slots).
"""

from __future__ import annotations

import numpy as np

from ..core import checks, registry
from ..core.errors import SpecError
from ..core.precision import FLOAT64, Numerics
from ..core.presets import FROM_PRESET
from ..core.results import Cotangents, Grads, Result
from ..core.softmax import masked_softmax
from .inputs import ORDERS, ROUTING_NORMS, RoutingInputs, check_cluster_size


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


def top_members(similarity: np.ndarray, cluster_size: int, order: str) -> np.ndarray:
    """Step (5): the ``cluster_size`` tokens each centroid selects, (B, H, K, W) int64.

    Each centroid ranks every token by descending similarity and keeps the
    first ``cluster_size`` (balanced: every cluster has exactly ``cluster_size``
    members, a token may be in several clusters or in none). Ties go to the lower
    position. ``order`` then lays the members out: ``"position"`` ascending
    (google-research ``tf.sort(idx)``), ``"similarity"`` descending
    (lucidrains ``topk``).
    """
    by_cluster = np.moveaxis(similarity, -1, -2)  # (B, H, K, N)
    ranked = np.argsort(-by_cluster, axis=-1, kind="stable")[..., :cluster_size]  # (B, H, K, W)
    if order == "position":
        ranked = np.sort(ranked, axis=-1)
    return ranked.astype(np.int64)


def decision_margins(similarity: np.ndarray, cluster_size: int, order: str) -> dict[str, float]:
    """How far the discrete decisions of steps (4)-(5) are from a tie, in units of similarity.

    Returns
    -------
    dict
        ``assignment``: smallest gap between a token's best and second-best
        centroid; ``selection``: smallest gap between a cluster's last member
        and the best token it leaves out; ``order``: with ``order="similarity"``,
        the smallest gap between consecutive members (``inf`` where a decision
        does not exist: one cluster, clusters of every token, position order).
    """
    if isinstance(similarity, np.ndarray) and (similarity.ndim != 4 or 0 in similarity.shape):
        raise SpecError("similarity", "4 non-empty dimensions (B, H, N, K)", f"shape {similarity.shape}")
    similarity = checks.float_array(similarity, "similarity")
    cluster_size = check_cluster_size(cluster_size, similarity.shape[2])
    order = checks.choice(order, "order", ORDERS)
    ranked = -np.sort(-similarity, axis=-1)  # (B, H, N, K), descending
    assignment = np.min(ranked[..., 0] - ranked[..., 1]) if similarity.shape[-1] > 1 else np.inf
    per_cluster = -np.sort(-np.moveaxis(similarity, -1, -2), axis=-1)  # (B, H, K, N), descending
    n = per_cluster.shape[-1]
    w = cluster_size
    selection = np.min(per_cluster[..., w - 1] - per_cluster[..., w]) if w < n else np.inf
    gaps = per_cluster[..., : w - 1] - per_cluster[..., 1:w]
    in_order = np.min(gaps) if order == "similarity" and w > 1 else np.inf
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


def slot_masks(membership, key_membership, *, num_memory: int, causal: bool, causal_by: str, key_padding_mask,
               query_padding: str, self_mask: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Step (8a): which (query slot, key slot) pairs are masked, and which are a token and itself.

    The key axis is the ``num_memory`` memory slots, then the ``W`` member slots.

    * causal by ``"position"``: member key ``t`` is masked unless its token's
      position is at most the query's; by ``"slot"``: unless ``t <= s``.
      Memory slots are never causally masked.
    * padding (``key_padding_mask`` (B, N), True = real token): padded member
      keys are masked; a padded query's row is masked whole (``"mask_row"``),
      in its member keys only (``"mask_window"``) or not at all (``"none"``).
    * ``self_mask``: member key ``t`` holds the query's own token.

    Returns
    -------
    masked, is_self : bool ndarrays (B, H, K, W, M + W)
    """
    query_position = membership[..., :, None]  # (B, H, K, W, 1)
    key_position = key_membership[..., None, :]  # (B, H, K, 1, W)
    slots = membership.shape[-1]
    members_ok = np.ones(membership.shape + (slots,), dtype=bool)  # (B, H, K, W, W)
    memory_ok = np.ones(membership.shape + (num_memory,), dtype=bool)  # (B, H, K, W, M)
    if causal:
        members_ok &= (key_position <= query_position) if causal_by == "position" else np.tri(slots, dtype=bool)
    if key_padding_mask is not None:
        shape = membership.shape[:2] + key_padding_mask.shape[-1:]
        real = np.broadcast_to(key_padding_mask[:, None, :], shape)  # (B, H, N)
        members_ok &= gather_slots(real, key_membership)[..., None, :]
        query_real = gather_slots(real, membership)[..., :, None]  # (B, H, K, W, 1)
        if query_padding != "none":
            members_ok &= query_real
        if query_padding == "mask_row":
            memory_ok &= query_real
    masked = ~np.concatenate([memory_ok, members_ok], axis=-1)
    is_self = np.zeros_like(masked)
    if self_mask:
        is_self[..., num_memory:] = key_position == query_position
    return masked, is_self


def slot_logits(scores, masked, is_self, *, mask_value, self_mask_value, mask_mode="replace"):
    """Step (8b): the logits, the keys that take part, and the logits that are constants.

    * ``mask_value=None`` excludes masked keys exactly; a number replaces their
      logits (``mask_mode="replace"``: constants) or is added to their scores
      (``"add"``, google-research's bias: they keep their gradients).
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
    elif mask_mode == "add":
        logits, allowed, constant = np.where(masked, scores + mask_value, scores), np.ones_like(masked), np.zeros_like(masked)
    else:
        logits, allowed, constant = np.where(masked, mask_value, scores), np.ones_like(masked), masked
    if self_mask_value is not None:
        logits = np.where(is_self, self_mask_value, logits)
        return logits, allowed | is_self, constant | is_self
    others = ~masked & ~is_self
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


# --- the mechanism ------------------------------------------------------------


def routing_attention(
    q, k, v, *, centroids, cluster_size, shared_qk=False, causal=False, key_padding_mask=None, mem_k=None,
    mem_v=None, preset=None, routing_norm=FROM_PRESET, norm_eps=FROM_PRESET, query_prescale=FROM_PRESET,
    attend_on=FROM_PRESET, normalize_shared_keys=FROM_PRESET, scale=FROM_PRESET, causal_by=FROM_PRESET,
    order=FROM_PRESET, mask_value=FROM_PRESET, mask_mode=FROM_PRESET, self_mask=FROM_PRESET, self_mask_value=FROM_PRESET,
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
    cluster_size : int in [1, N]
        ``W``, the tokens per cluster (each centroid's top-``cluster_size``).
    shared_qk : bool
        Keys are query vectors (Reformer's shared-QK): the key lists are the
        query lists, routed by q alone; the keys get the query prescale; a
        token's attention to itself follows ``self_mask``. ``k`` must still be
        given (the published models pass ``k = q``); its gradient is the key
        role's, so a shared projection's gradient is ``dq + dk``.
    causal : bool
        Mask keys after the query (by ``causal_by``).
    key_padding_mask : bool ndarray (B, N), optional
        True = real token. Padded tokens are routed like any other; as keys
        they are masked; their own rows follow ``query_padding``.
    mem_k, mem_v : ndarray (H, K, M, D) and (H, K, M, Dv), optional
        Learned memory key/values of each cluster (lucidrains ``num_mem_kv``),
        prepended to every cluster's keys; never masked by causality or key
        padding, never normalised.
    preset : {None, "google_research", "lucidrains"}
        None is the canonical semantics; "google-research" is accepted too.
    routing_norm, norm_eps, query_prescale, attend_on, normalize_shared_keys, scale,
    causal_by, order, mask_value, mask_mode, self_mask, self_mask_value, query_padding, scatter_eps
        Override the preset (refattn/routing/presets.py documents each).
        ``query_prescale`` acts on the routing vectors only; with
        ``attend_on="raw"`` attention uses q and k as given.

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv), float64. ``lse`` None: a token sits in the
        query lists of several clusters (or none), each slot's row has its
        own log-sum-exp, and their keys overlap, so no single log-sum-exp of
        the token exists. ``aux``: ``slot_lse`` (B, H, K, W), the log-sum-exp
        of every cluster slot's row (``-inf`` on a fully masked row);
        ``membership`` and ``key_membership`` (B, H, K, W) int64, the token of
        each query and key slot in ``order``; ``assignment`` and
        ``key_assignment`` (B, H, N) int64, each token's nearest centroid;
        ``counts`` (B, H, N) int64, how many query lists hold each token;
        ``unrouted`` (B, H, N) bool, ``counts == 0`` (their output is 0).
    """
    return registry.call_forward("routing", locals())


def forward(x: RoutingInputs, num: Numerics) -> Result:
    """The reference backend: steps (1)-(11) in precision ``num``."""
    steps = _forward_steps(x, num)
    return Result(out=steps["out"], lse=None, aux=dict(steps["aux"], slot_lse=steps["slot_lse"]))


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
    # (5) Balanced membership: each centroid's top-`cluster_size` tokens, laid out in `order`.
    membership = top_members(similarity, x.cluster_size, x.order)  # (B, H, K, W)
    key_membership = membership if x.shared_qk else top_members(key_similarity, x.cluster_size, x.order)
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
        key_padding_mask=x.key_padding_mask, query_padding=x.query_padding, self_mask=x.shared_qk and x.self_mask,
    )  # fmt: skip
    logits, allowed, constant = slot_logits(scores, masked, is_self, mask_value=x.mask_value,
                                            self_mask_value=x.self_mask_value, mask_mode=x.mask_mode)  # fmt: skip
    # (9) Softmax over each query slot's keys, and its log-sum-exp (one per slot, not per token).
    weights, slot_lse = masked_softmax(logits, allowed, num)  # (B, H, K, W, M+W), (B, H, K, W)
    # (10) Weighted values.
    slot_out = num.store(np.einsum("bhcst,bhcte->bhcse", weights, values, optimize=True))  # (B, H, K, W, Dv)
    # (11) Scatter back: sum over the clusters that picked a token / (count + scatter_eps).
    out, counts = scatter_mean(slot_out, membership, q.shape[2], x.scatter_eps, num)  # (B, H, N, Dv), (B, H, N)
    aux = dict(
        membership=membership, key_membership=key_membership, assignment=assignment,
        key_assignment=key_assignment, counts=counts, unrouted=counts == 0,
    )  # fmt: skip
    return dict(q_stat=q_stat, k_stat=k_stat, r_q=r_q, r_k=r_k, q_slots=q_slots, keys=keys, values=values,
                constant=constant, weights=weights, slot_lse=slot_lse, out=out, aux=aux)  # fmt: skip


routing_attention_vjp = registry.vjp_function(
    routing_attention, "routing", grads="""    ``q``, ``k``, ``v``, and ``mem_k``, ``mem_v`` when given, with the
    routing (steps (4)-(5)) held fixed. Where attention uses normalised vectors
    the gradient runs through the normalisation; the similarities, the
    membership and the centroids get none (the decisions are piecewise
    constant). Replaced logits (``mask_value``, ``self_mask_value``) are
    constants. ``dlse`` must be None: the mechanism returns no ``lse``.""",
)


def vjp(x: RoutingInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (11')-(1') in precision ``num``, the routing held fixed."""
    f = _forward_steps(x, num)
    grads = _backward_steps(x, f, num.load(cotangents.dout), num)
    return Grads({name: g.astype(np.float64) for name, g in grads.items()})


def _backward_steps(x: RoutingInputs, f: dict, dout: np.ndarray, num: Numerics) -> dict:
    """Steps (11')-(1'): the adjoints of the forward steps, routing held fixed."""
    membership, key_membership = f["aux"]["membership"], f["aux"]["key_membership"]
    memory = x.num_memory
    # (11') Each slot receives its token's cotangent divided by the token's count + eps.
    counts = gather_slots(f["aux"]["counts"], membership)[..., None]  # (B, H, K, W, 1), >= 1
    d_slot_out = num.store(gather_slots(dout, membership) / (counts + x.scatter_eps))  # (B, H, K, W, Dv)
    # (10') slot_out = P · values.
    d_values = num.store(np.einsum("bhcst,bhcse->bhcte", f["weights"], d_slot_out, optimize=True))  # (B, H, K, M+W, Dv)
    d_weights = num.store(np.einsum("bhcse,bhcte->bhcst", d_slot_out, f["values"], optimize=True))  # (B, H, K, W, M+W)
    # (9') Softmax: dz = P (dP - sum_t P dP); excluded keys have P = 0.
    p = f["weights"]
    d_logits = p * (d_weights - num.store(np.sum(p * d_weights, axis=-1, keepdims=True)))
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
