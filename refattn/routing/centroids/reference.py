"""Centroid updates of routing attention, as pure functions: state in, state out.

Routing uses the centroids *before* an update; the update then moves them
toward the routing vectors assigned to them (each vector's nearest centroid,
step (4) of spec/routing.md). Two published rules (spec/routing.md, "Centroid
updates", equations (E1)-(E5) and (L1)-(L4)):

* ``"vq_ema"`` (google-research ``online_kmeans``): exponential moving averages
  of each centroid's count and of the sum of its vectors, the counts Laplace
  smoothed, centroid = sum / smoothed count; padded tokens excluded. This is the
  VQ-VAE EMA codebook update.
* ``"normalized_mean_ema"`` (lucidrains ``kmeans_iter`` then ``ema_inplace``):
  the L2-normalised sum of each centroid's vectors replaces nothing by itself;
  the centroid becomes ``decay · centroid + (1 - decay) · that``; a centroid with
  no vector keeps its value.

:func:`centroid_ema` (registry name "centroid_ema") is one update from a
routing layer's queries and keys; :func:`centroid_ema_vq` and
:func:`centroid_ema_normalized_mean` apply one rule to given routing vectors.
Also here: lucidrains' k-means initialisation (:func:`kmeans_init`, 10
iterations from given samples) and the commitment loss of each implementation
(:func:`commitment_loss`). Nothing here draws random numbers: the samples are
chosen by the caller (``sample_indices``).

Einsum letters: b batch, h head, n token, d head dim, c cluster.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import FLOAT64, Numerics, numerics
from ...core.presets import FROM_PRESET
from ...core.results import Cotangents, Grads, Result
from ..inputs import ROUTING_NORMS, check_centroids, check_key_padding_mask, check_query_prescale
from ..presets import resolve
from ..reference import cluster_similarity, nearest_cluster, normalize

UPDATES = ("vq_ema", "normalized_mean_ema")
COUNT_RULES = ("per_head", "google_research")
LOSS_REDUCTIONS = ("sum_of_means", "mean")
#: lucidrains ``KMEAN_INIT_ITERS``.
KMEANS_INIT_ITERATIONS = 10


# --- the mechanism: one update from a routing layer's queries and keys ------------------------


def centroid_ema(q, k, v, *, centroids, shared_qk=False, key_padding_mask=None, ema_counts=None, ema_sums=None,
                 preset=None, centroid_update=FROM_PRESET, count_rule=FROM_PRESET, decay=FROM_PRESET,
                 ema_eps=FROM_PRESET, routing_norm=FROM_PRESET, norm_eps=FROM_PRESET, query_prescale=FROM_PRESET,
                 precision=None, backend="reference") -> Result:  # fmt: skip
    """One centroid update from a routing layer's queries and keys, as a mechanism (registry name "centroid_ema").

    The routing vectors of q (and, unless ``shared_qk``, of k, concatenated
    after them along the tokens) update the centroids by ``centroid_update``,
    in one step. lucidrains does exactly this (``Kmeans`` on ``cat(q, k)``);
    google-research runs ``online_kmeans`` once for the queries and once for
    the keys on the same variables, in an order its graph leaves open: apply
    :func:`centroid_ema_vq` twice to reproduce a given order.

    Parameters
    ----------
    q, k : ndarray (B, H, N, D)
    v : ndarray (B, H, N, Dv)
        Not used: the update depends on the routing vectors alone. It is an
        argument so that the mechanism has the registry's signature.
    centroids : ndarray (H, K, D)
    shared_qk : bool
    key_padding_mask : bool ndarray (B, N), optional
        True = real token; padded tokens are left out of the update (of q and of k).
    ema_counts, ema_sums : optional
        ``"vq_ema"`` state (see :func:`centroid_ema_vq`); not used by ``"normalized_mean_ema"``.
    preset, centroid_update, count_rule, decay, ema_eps, routing_norm, norm_eps, query_prescale
        As in refattn/routing/presets.py. With ``count_rule="google_research"``
        the queries' and the keys' counts are each formed as one
        ``online_kmeans`` call forms them (two calls, ``N`` tokens each).

    Returns
    -------
    Result
        ``out``: the updated centroids (H, K, D). ``lse`` None: an update is
        no softmax. ``aux``: ``assignment`` (B, H, N or 2N) int64, each
        routing vector's nearest centroid before the update.
    """
    return registry.call_forward("centroid_ema", locals())


centroid_ema_vjp = registry.vjp_function(
    centroid_ema, "centroid_ema", grads="""    None: both implementations run the update outside autograd (a TF
    ``assign``, ``torch.no_grad``), so it has no VJP here and its cases are
    forward only; the call raises ``SpecError``.""",
)


@dataclass(frozen=True)
class CentroidEMAInputs:
    """Checked arguments of one update, preset resolved; the ``"vq_ema"`` state defaulted."""

    q: np.ndarray  # (B, H, N, D)
    k: np.ndarray  # (B, H, N, D)
    centroids: np.ndarray  # (H, K, D)
    shared_qk: bool
    key_padding_mask: np.ndarray | None  # (B, N) bool, True = real token
    centroid_update: str
    count_rule: str
    decay: float
    ema_eps: float
    routing_norm: str
    norm_eps: float
    query_prescale: float
    ema_counts: np.ndarray  # (H, K)
    ema_sums: np.ndarray  # (H, K, D)

    def cotangent_shapes(self) -> dict:
        """``dout`` would have the shape of the centroids; there is no ``lse``."""
        return {"dout": self.centroids.shape, "dlse": None}


def check_centroid_ema_inputs(q, k, v, *, centroids, shared_qk, key_padding_mask, ema_counts, ema_sums, preset,
                              centroid_update, count_rule, decay, ema_eps, routing_norm, norm_eps,
                              query_prescale) -> CentroidEMAInputs:  # fmt: skip
    """Check every argument of :func:`centroid_ema`; raise :class:`SpecError` on the first bad one."""
    q, k, _, shape = checks.qkv(q, k, v)
    p = resolve(preset, centroid_update=centroid_update, count_rule=count_rule, decay=decay, ema_eps=ema_eps,
                routing_norm=routing_norm, norm_eps=norm_eps, query_prescale=query_prescale)  # fmt: skip
    update = checks.choice(p["centroid_update"], "centroid_update", UPDATES)
    rule = checks.choice(p["count_rule"], "count_rule", COUNT_RULES)
    norm = checks.choice(p["routing_norm"], "routing_norm", ROUTING_NORMS)
    eps = checks.real_number(p["norm_eps"], "norm_eps", minimum=0.0, inclusive=False)
    prescale = check_query_prescale(p["query_prescale"], shape.head_dim)
    shared_qk = checks.flag(shared_qk, "shared_qk")
    centroids = check_centroids(centroids, shape.q_heads, shape.head_dim)
    mask = check_key_padding_mask(key_padding_mask, shape.batch, shape.q_len)
    vectors = 1 if shared_qk else 2  # routing vectors per token
    if update == "vq_ema":
        ema_counts, ema_sums = _check_vq_state(ema_counts, ema_sums, centroids)
    else:
        ema_counts, ema_sums = np.zeros(centroids.shape[:2]), centroids
    decay = _check_decay(p["decay"])
    ema_eps = checks.real_number(p["ema_eps"], "ema_eps", minimum=0.0, inclusive=False)
    if update == "vq_ema":
        _check_vq_counts(ema_counts, decay, real_counts(mask, shape.batch, shape.q_heads, shape.q_len, rule, vectors))
    # Routing steps (1)-(3): |prescale · x|² to normalise, then r·μ with |r| <= sqrt(D) (layer norm) or 1 (L2).
    checks.scores_within_range(np.sqrt(shape.head_dim) if norm == "layer" else 1.0, centroids, 1.0, "q, k, centroids",
                               normalised=((q, prescale),) + (() if shared_qk else ((k, prescale),)))  # fmt: skip
    return CentroidEMAInputs(q, k, centroids, shared_qk, mask, update, rule, decay, ema_eps, norm, eps, prescale,
                             ema_counts, ema_sums)  # fmt: skip


def forward(x: CentroidEMAInputs, num: Numerics) -> Result:
    """The reference backend: steps (1)-(2) of routing attention, then (E1)-(E5) or (L1)-(L4), in precision ``num``."""
    # Steps (1)-(2) of routing attention: the routing vectors of the queries (and keys).
    r_q = normalize(num.store(x.query_prescale * num.load(x.q)), norm=x.routing_norm, eps=x.norm_eps, num=num)[0]
    vectors, mask = r_q, x.key_padding_mask  # (B, H, N, D), (B, N)
    if not x.shared_qk:
        r_k = normalize(num.load(x.k), norm=x.routing_norm, eps=x.norm_eps, num=num)[0]
        vectors = np.concatenate([r_q, r_k], axis=2)  # (B, H, 2N, D)
        mask = None if mask is None else np.concatenate([mask, mask], axis=1)  # (B, 2N)
    if x.centroid_update == "vq_ema":
        update = _vq_ema(num.load(vectors), num.load(x.centroids), num.load(x.ema_counts), num.load(x.ema_sums),
                         x.decay, x.ema_eps, mask, num, x.count_rule, 1 if x.shared_qk else 2)  # fmt: skip
    else:
        centroids = num.load(x.centroids)
        update = _normalized_mean_ema(num.load(vectors), centroids, x.decay, x.ema_eps, mask, num)
    return Result(out=update.centroids, lse=None, aux={"assignment": update.assignment})


def vjp(x: CentroidEMAInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The centroid update has no VJP here: both implementations run it outside autograd
    (a TF ``assign``, ``torch.no_grad``), so its conformance cases are forward only."""
    raise SpecError("centroid_ema", "a forward-only use (the update runs outside autograd in both implementations)",
                    "a request for its gradients")  # fmt: skip


# --- the two update rules ------------------------------------------------------------------


@dataclass(frozen=True)
class CentroidUpdate:
    """The result of one update.

    Attributes
    ----------
    centroids : ndarray (H, K, D)
        The updated centroids.
    assignment : int64 ndarray (B, H, N)
        Each vector's nearest centroid before the update.
    ema_counts : ndarray (H, K) or None
        ``"vq_ema"`` state after the update (unsmoothed, as google-research stores it).
    ema_sums : ndarray (H, K, D) or None
        ``"vq_ema"`` state after the update.
    """

    centroids: np.ndarray
    assignment: np.ndarray
    ema_counts: np.ndarray | None = None
    ema_sums: np.ndarray | None = None


def _check_decay(decay) -> float:
    """``decay``: a real number in [0, 1] (1 leaves the centroids where they are)."""
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
        raise SpecError("decay", "a finite number in [0.0, 1.0]", checks.summary(decay))
    return float(decay)


def _check_vq_state(ema_counts, ema_sums, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``"vq_ema"`` state, defaulted: counts zeros (H, K), sums the centroids (H, K, D)."""
    heads, clusters = centroids.shape[:2]
    ema_counts = np.zeros((heads, clusters)) if ema_counts is None else checks.float_array(ema_counts, "ema_counts")
    ema_sums = centroids if ema_sums is None else checks.float_array(ema_sums, "ema_sums")
    if ema_counts.shape != (heads, clusters) or np.any(ema_counts < 0):
        raise SpecError("ema_counts", f"non-negative counts of shape (H, K) = ({heads}, {clusters})", f"shape {ema_counts.shape}")
    if ema_sums.shape != centroids.shape:
        raise SpecError("ema_sums", f"shape (H, K, D) = {centroids.shape}", f"shape {ema_sums.shape}")
    return ema_counts, ema_sums


def real_counts(mask, batch: int, heads: int, length: int, count_rule: str, calls: int = 1) -> np.ndarray:
    """The real vectors step (E2) credits to each head (H,): :func:`batch_counts` of ``calls`` segments of
    ``length`` tokens, real where ``mask`` (B, N) is True (all when None), as if every one were assigned."""
    real = np.ones((batch, length)) if mask is None else mask.astype(np.float64)  # (B, N)
    one_hot = np.broadcast_to(np.tile(real, calls)[:, None, :, None], (batch, heads, calls * length, 1))
    return batch_counts(one_hot, count_rule, calls)[:, 0]


def _check_vq_counts(ema_counts: np.ndarray, decay: float, real_vectors: np.ndarray) -> None:
    """(E4) divides by ``n = Σ_c ema_count_c`` after the update: it must not be 0 in any head
    (``real_vectors`` (H,): the real vectors credited to each head, :func:`real_counts`)."""
    if np.any(decay * ema_counts.sum(axis=-1) + (1.0 - decay) * real_vectors == 0):
        raise SpecError("ema_counts", "a state or a batch that counts at least one token per head (n > 0)",
                        "zero counts and no (real) token with weight 1 - decay > 0")  # fmt: skip


def _check_vectors(x, centroids, key_padding_mask):
    x = checks.float_array(x, "x")
    if x.ndim != 4:
        raise SpecError("x", "4 dimensions (B, H, N, D)", f"shape {x.shape}")
    centroids = check_centroids(centroids, x.shape[1], x.shape[3])
    return x, centroids, check_key_padding_mask(key_padding_mask, x.shape[0], x.shape[2])


def _assigned(x: np.ndarray, centroids: np.ndarray, key_padding_mask, num: Numerics):
    """(E1)/(L1): nearest centroids (B, H, N) and their one-hot form, zero on padded tokens (B, H, N, K)."""
    assignment = nearest_cluster(cluster_similarity(x, centroids, num))  # (B, H, N)
    one_hot = (assignment[..., None] == np.arange(centroids.shape[1])).astype(x.dtype)  # (B, H, N, K)
    if key_padding_mask is not None:
        one_hot = one_hot * key_padding_mask[:, None, :, None]
    return assignment, one_hot


def batch_counts(one_hot: np.ndarray, count_rule: str, calls: int = 1) -> np.ndarray:
    """Step (E2)'s count per centroid (H, K) from one-hot assignments (B, H, N, K).

    ``"per_head"``: summed over the batch and the tokens of each head.
    ``"google_research"``: as ``online_kmeans`` sums them, each of ``calls``
    equal token segments (one call each: the queries, then the keys) reshaped
    to ``[-1, H, K]`` without a transpose, so head ``h`` is credited with
    token ``s`` of head ``h'`` where ``(h'·S + s) mod H = h``.
    """
    if count_rule == "per_head":
        return one_hot.sum(axis=(0, 2))
    heads, clusters = one_hot.shape[1], one_hot.shape[3]
    return sum(part.reshape(-1, heads, clusters).sum(axis=0) for part in np.split(one_hot, calls, axis=2))


def _vq_ema(x, centroids, ema_counts, ema_sums, decay, eps, key_padding_mask, num: Numerics,
            count_rule: str = "per_head", calls: int = 1) -> CentroidUpdate:  # fmt: skip
    """Steps (E1)-(E5); ``count_rule`` and ``calls`` as in :func:`batch_counts`."""
    # (E1) Nearest centroid of every vector, by the centroids before the update; padding excluded.
    assignment, one_hot = _assigned(x, centroids, key_padding_mask, num)
    # (E2) This batch's count and sum of vectors per centroid.
    count = num.store(batch_counts(one_hot, count_rule, calls))  # (H, K)
    total = num.store(np.einsum("bhnc,bhnd->hcd", one_hot, x, optimize=True))  # (H, K, D)
    # (E3) Exponential moving averages (assign_moving_average, zero_debias=False).
    ema_counts = num.store(decay * ema_counts + (1.0 - decay) * count)
    ema_sums = num.store(decay * ema_sums + (1.0 - decay) * total)
    # (E4) Laplace smoothing of the counts: (c + eps) / (n + K eps) · n, n = sum of the counts.
    n = ema_counts.sum(axis=-1, keepdims=True)  # (H, 1)
    smoothed = num.store((ema_counts + eps) / (n + centroids.shape[1] * eps) * n)  # (H, K)
    # (E5) Centroid = averaged sum / smoothed count.
    new = num.store(ema_sums / smoothed[..., None])
    return CentroidUpdate(new, assignment, ema_counts, ema_sums)


def _normalized_mean(x, centroids, eps, key_padding_mask, num: Numerics) -> tuple[np.ndarray, np.ndarray]:
    """Steps (L1)-(L3): new means, the L2-normalised sum of each centroid's vectors (unchanged where it has none)."""
    # (L1) Nearest centroid of every vector.
    assignment, one_hot = _assigned(x, centroids, key_padding_mask, num)
    # (L2) Count and sum per centroid, over the batch.
    count = one_hot.sum(axis=(0, 2))  # (H, K)
    total = num.store(np.einsum("bhnc,bhnd->hcd", one_hot, x, optimize=True))  # (H, K, D)
    # (L3) L2-normalise the sums (F.normalize: divide by max(|sum|, eps)); empty clusters keep their centroid.
    length = np.sqrt(np.sum(total * total, axis=-1, keepdims=True))  # (H, K, 1)
    means = num.store(total / np.maximum(length, eps))
    return num.store(np.where(count[..., None] > 0, means, centroids)), assignment


def _normalized_mean_ema(x, centroids, decay, eps, key_padding_mask, num: Numerics) -> CentroidUpdate:
    """Steps (L1)-(L4)."""
    means, assignment = _normalized_mean(x, centroids, eps, key_padding_mask, num)
    # (L4) Exponential moving average toward the new means.
    return CentroidUpdate(num.store(decay * centroids + (1.0 - decay) * means), assignment)


def centroid_ema_vq(x, centroids, *, ema_counts=None, ema_sums=None, decay=0.999, eps=1e-5, key_padding_mask=None,
                    count_rule="per_head", precision=None) -> CentroidUpdate:  # fmt: skip
    """google-research's VQ-style EMA update (``online_kmeans`` with ``ema=True``), steps (E1)-(E5).

    Parameters
    ----------
    x : ndarray (B, H, N, D)
        Routing vectors (normalised queries or keys).
    centroids : ndarray (H, K, D)
        The centroids routing used (before this update).
    ema_counts : ndarray (H, K), optional
        Moving average of the counts; default zeros (google-research's initial ``ema_count``).
    ema_sums : ndarray (H, K, D), optional
        Moving average of the sums; default ``centroids`` (google-research
        initialises ``ema_means`` with the means' initial value).
    decay : float in [0, 1]
        0.999 in google-research's hyper-parameters.
    eps : float > 0
        Laplace smoothing of the counts (``online_kmeans``'s ``epsilon=1e-5``).
    key_padding_mask : bool ndarray (B, N), optional
        True = real token; padded tokens neither count nor add.
    count_rule : {"per_head", "google_research"}
        :func:`batch_counts`; ``"google_research"`` reproduces ``online_kmeans``' head mixing.
    precision : optional
        As for :func:`~refattn.routing.reference.routing_attention`.

    Returns
    -------
    CentroidUpdate
        ``centroids`` = ``ema_sums / smoothed(ema_counts)``; with ``decay = 1``
        the state does not move, and the centroids equal those the state
        already gave.
    """
    x, centroids, mask = _check_vectors(x, centroids, key_padding_mask)
    ema_counts, ema_sums = _check_vq_state(ema_counts, ema_sums, centroids)
    decay = _check_decay(decay)
    eps = checks.real_number(eps, "eps", minimum=0.0, inclusive=False)
    rule = checks.choice(count_rule, "count_rule", COUNT_RULES)
    _check_vq_counts(ema_counts, decay, real_counts(mask, x.shape[0], x.shape[1], x.shape[2], rule))
    num = numerics(precision)
    update = _vq_ema(num.load(x), num.load(centroids), num.load(ema_counts), num.load(ema_sums), decay, eps, mask, num,
                     rule)  # fmt: skip
    as_float64 = (update.centroids, update.ema_counts, update.ema_sums)
    centroids, ema_counts, ema_sums = (a.astype(np.float64) for a in as_float64)
    return CentroidUpdate(centroids, update.assignment, ema_counts, ema_sums)


def centroid_ema_normalized_mean(x, centroids, *, decay=0.999, eps=1e-12, key_padding_mask=None,
                                 precision=None) -> CentroidUpdate:  # fmt: skip
    """lucidrains' update (``kmeans_iter`` then ``ema_inplace``), steps (L1)-(L4).

    Parameters
    ----------
    x : ndarray (B, H, N, D)
        Routing vectors (L2-normalised queries and keys in lucidrains).
    centroids : ndarray (H, K, D)
    decay : float in [0, 1]
        ``kmeans_ema_decay``, 0.999.
    eps : float > 0
        ``F.normalize``'s epsilon, 1e-12.
    key_padding_mask : bool ndarray (B, N), optional
        True = real token; padded tokens are left out. lucidrains leaves out none: pass None to reproduce it.
    precision : optional
        As for :func:`~refattn.routing.reference.routing_attention`.

    Returns
    -------
    CentroidUpdate
        ``centroids = decay · centroids + (1 - decay) · new_means`` (not
        renormalised); ``decay = 1`` returns them unchanged.
    """
    x, centroids, mask = _check_vectors(x, centroids, key_padding_mask)
    decay = _check_decay(decay)
    eps = checks.real_number(eps, "eps", minimum=0.0, inclusive=False)
    num = numerics(precision)
    update = _normalized_mean_ema(num.load(x), num.load(centroids), decay, eps, mask, num)
    return CentroidUpdate(update.centroids.astype(np.float64), update.assignment)


# --- initialisation and the commitment loss -----------------------------------------------


def kmeans_init(x, sample_indices, *, iterations=KMEANS_INIT_ITERATIONS, eps=1e-12) -> np.ndarray:
    """lucidrains' k-means initialisation (``Kmeans.init``): centroids from samples, then k-means iterations.

    The initial centroids are the tokens ``sample_indices`` of each head, the
    batch and sequence axes flattened (``x.transpose(0, 1).reshape(H, B·N, D)``);
    each iteration is steps (L1)-(L3) with every token counted: new centroid =
    L2-normalised sum of its nearest vectors, unchanged when it has none.
    lucidrains calls it on the *raw* (unnormalised) queries and keys.

    Parameters
    ----------
    x : ndarray (B, H, N, D)
    sample_indices : int ndarray (K,)
        One index in ``[0, B·N)`` per centroid; ``K >= 1`` (lucidrains draws
        them with ``randperm``, or ``randint`` when ``B·N < K``).
    iterations : int >= 0
        10 in lucidrains (``KMEAN_INIT_ITERS``).
    eps : float > 0

    Returns
    -------
    ndarray (H, K, D), float64
    """
    x = checks.float_array(x, "x")
    if x.ndim != 4:
        raise SpecError("x", "4 dimensions (B, H, N, D)", f"shape {x.shape}")
    batch, heads, length, dim = x.shape
    if not isinstance(sample_indices, np.ndarray) or sample_indices.dtype.kind not in "iu" or sample_indices.ndim != 1:
        raise SpecError("sample_indices", "a 1-D integer array, one token index per centroid",
                        f"{sample_indices!r}"[:80])  # fmt: skip
    if sample_indices.size < 1:
        raise SpecError("sample_indices", "num_clusters K >= 1 indices", "0 indices")
    if sample_indices.min() < 0 or sample_indices.max() >= batch * length:
        raise SpecError("sample_indices", f"indices in [0, B·N) = [0, {batch * length})",
                        f"values {sample_indices.min()} to {sample_indices.max()}")  # fmt: skip
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise SpecError("iterations", "an integer >= 0", checks.summary(iterations))
    eps = checks.real_number(eps, "eps", minimum=0.0, inclusive=False)
    x = np.asarray(x, np.float64)
    centroids = np.swapaxes(x, 0, 1).reshape(heads, batch * length, dim)[:, sample_indices]  # (H, K, D)
    for _ in range(iterations):
        centroids, _ = _normalized_mean(x, centroids, eps, None, FLOAT64)
    return centroids


def commitment_loss(q, k, centroids, *, shared_qk=False, preset=None, routing_norm=FROM_PRESET, norm_eps=FROM_PRESET,
                    query_prescale=FROM_PRESET, commitment=FROM_PRESET, loss_reduction=FROM_PRESET) -> float:  # fmt: skip
    """The commitment loss that pulls routing vectors toward their nearest centroid.

    ``e = mean over (B, H, N, D) of (r - centroids[nearest])²`` for the
    queries' routing vectors and the keys'. The total is
    ``commitment · (e_q + e_k)`` (``"sum_of_means"``: google-research adds
    ``q_clustering_loss + k_clustering_loss``) or ``commitment · mean over
    queries and keys together`` = ``commitment · (e_q + e_k) / 2`` (``"mean"``:
    lucidrains ``F.mse_loss`` on ``cat(q, k)``). Under ``shared_qk`` the keys
    are the queries: ``"sum_of_means"`` gives ``2 · commitment · e_q``
    (google-research sets ``k_clustering_loss = q_clustering_loss`` and adds
    both), ``"mean"`` gives ``commitment · e_q`` (lucidrains routes ``q``
    alone). Padded tokens count, in both.

    Parameters
    ----------
    q, k : ndarray (B, H, N, D)
    centroids : ndarray (H, K, D)
    shared_qk : bool
        Only the queries are routed (and so only they count).
    preset, routing_norm, norm_eps, query_prescale, commitment, loss_reduction
        As in refattn/routing/presets.py (``commitment``: google-research
        ``beta`` and lucidrains ``commitment_factor``, both 1e-4).

    Returns
    -------
    float
    """
    q, k, _, shape = checks.qkv(q, k, k)
    p = resolve(preset, routing_norm=routing_norm, norm_eps=norm_eps, query_prescale=query_prescale,
                commitment=commitment, loss_reduction=loss_reduction)  # fmt: skip
    centroids = check_centroids(centroids, shape.q_heads, shape.head_dim)
    norm = checks.choice(p["routing_norm"], "routing_norm", ROUTING_NORMS)
    eps = checks.real_number(p["norm_eps"], "norm_eps", minimum=0.0, inclusive=False)
    prescale = check_query_prescale(p["query_prescale"], shape.head_dim)
    weight = checks.real_number(p["commitment"], "commitment", minimum=0.0)
    reduction = checks.choice(p["loss_reduction"], "loss_reduction", LOSS_REDUCTIONS)
    shared_qk = checks.flag(shared_qk, "shared_qk")
    centroids = np.asarray(centroids, np.float64)
    errors = []
    for x, factor in ((q, prescale), (q, prescale) if shared_qk else (k, 1.0)):  # under shared-QK the keys are q
        r = normalize(factor * np.asarray(x, np.float64), norm=norm, eps=eps)[0]  # (B, H, N, D)
        nearest = nearest_cluster(cluster_similarity(r, centroids))  # (B, H, N)
        routed = np.take_along_axis(centroids[None], nearest[..., None], axis=2)  # (B, H, N, D)
        errors.append(np.mean((r - routed) ** 2))
    total = sum(errors)
    return float(weight * (total if reduction == "sum_of_means" else total / len(errors)))
