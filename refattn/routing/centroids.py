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

from ..core import checks
from ..core.errors import SpecError
from ..core.precision import FLOAT64, Numerics, numerics
from ..core.results import Result
from .presets import FROM_PRESET, resolve
from .reference import (
    ROUTING_NORMS,
    check_centroids,
    check_padding_mask,
    cluster_similarity,
    nearest_cluster,
    normalize,  # fmt: skip
)

UPDATES = ("vq_ema", "normalized_mean_ema")
LOSS_REDUCTIONS = ("sum_of_means", "mean")
#: lucidrains ``KMEAN_INIT_ITERS``.
KMEANS_INIT_ITERATIONS = 10


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
        raise SpecError("decay", "a finite number in [0.0, 1.0]", repr(decay))
    return float(decay)


def _check_vectors(x, centroids, padding_mask):
    x = checks.float_array(x, "x")
    if x.ndim != 4:
        raise SpecError("x", "4 dimensions (B, H, N, D)", f"shape {x.shape}")
    centroids = check_centroids(centroids, x.shape[1], x.shape[3])
    return x, centroids, check_padding_mask(padding_mask, x.shape[0], x.shape[2])


def _assigned(x: np.ndarray, centroids: np.ndarray, padding_mask, num: Numerics):
    """(E1)/(L1): nearest centroids (B, H, N) and their one-hot form, zero on padded tokens (B, H, N, K)."""
    assignment = nearest_cluster(cluster_similarity(x, centroids, num))  # (B, H, N)
    one_hot = (assignment[..., None] == np.arange(centroids.shape[1])).astype(x.dtype)  # (B, H, N, K)
    if padding_mask is not None:
        one_hot = one_hot * padding_mask[:, None, :, None]
    return assignment, one_hot


def _vq_ema(x, centroids, ema_counts, ema_sums, decay, eps, padding_mask, num: Numerics) -> CentroidUpdate:
    """Steps (E1)-(E5)."""
    # (E1) Nearest centroid of every vector, by the centroids before the update; padding excluded.
    assignment, one_hot = _assigned(x, centroids, padding_mask, num)
    # (E2) This batch's count and sum of vectors per centroid.
    count = num.store(one_hot.sum(axis=(0, 2)))  # (H, K)
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


def _normalized_mean(x, centroids, eps, padding_mask, num: Numerics) -> tuple[np.ndarray, np.ndarray]:
    """Steps (L1)-(L3): new means, the L2-normalised sum of each centroid's vectors (unchanged where it has none)."""
    # (L1) Nearest centroid of every vector.
    assignment, one_hot = _assigned(x, centroids, padding_mask, num)
    # (L2) Count and sum per centroid, over the batch.
    count = one_hot.sum(axis=(0, 2))  # (H, K)
    total = num.store(np.einsum("bhnc,bhnd->hcd", one_hot, x, optimize=True))  # (H, K, D)
    # (L3) L2-normalise the sums (F.normalize: divide by max(|sum|, eps)); empty clusters keep their centroid.
    length = np.sqrt(np.sum(total * total, axis=-1, keepdims=True))  # (H, K, 1)
    means = num.store(total / np.maximum(length, eps))
    return num.store(np.where(count[..., None] > 0, means, centroids)), assignment


def centroid_ema_vq(x, centroids, *, ema_counts=None, ema_sums=None, decay=0.999, eps=1e-5, padding_mask=None,
                    precision=None) -> CentroidUpdate:  # fmt: skip
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
    padding_mask : bool ndarray (B, N), optional
        True = real token; padded tokens neither count nor add.
    precision : optional
        As for :func:`~refattn.routing.reference.routing_attention`.

    Returns
    -------
    CentroidUpdate
        ``centroids`` = ``ema_sums / smoothed(ema_counts)``; with ``decay = 1``
        the state does not move, and the centroids equal those the state
        already gave.
    """
    x, centroids, padding_mask = _check_vectors(x, centroids, padding_mask)
    heads, clusters = centroids.shape[:2]
    ema_counts = np.zeros((heads, clusters)) if ema_counts is None else checks.float_array(ema_counts, "ema_counts")
    ema_sums = centroids if ema_sums is None else checks.float_array(ema_sums, "ema_sums")
    if ema_counts.shape != (heads, clusters) or np.any(ema_counts < 0):
        raise SpecError("ema_counts", f"non-negative counts of shape (H, K) = ({heads}, {clusters})", f"shape {ema_counts.shape}")
    if ema_sums.shape != centroids.shape:
        raise SpecError("ema_sums", f"shape (H, K, D) = {centroids.shape}", f"shape {ema_sums.shape}")
    decay = _check_decay(decay)
    eps = checks.real_number(eps, "eps", minimum=0.0, inclusive=False)
    real = x.shape[0] * x.shape[2] if padding_mask is None else int(padding_mask.sum())
    if np.any(decay * ema_counts.sum(axis=-1) + (1.0 - decay) * real == 0):
        raise SpecError("ema_counts", "a state or a batch that counts at least one token per head (n > 0)",
                        "zero counts and no (real) token with weight 1 - decay > 0")  # fmt: skip
    num = numerics(precision)
    update = _vq_ema(num.load(x), num.load(centroids), num.load(ema_counts), num.load(ema_sums), decay, eps,
                     padding_mask, num)  # fmt: skip
    as_float64 = (update.centroids, update.ema_counts, update.ema_sums)
    centroids, ema_counts, ema_sums = (a.astype(np.float64) for a in as_float64)
    return CentroidUpdate(centroids, update.assignment, ema_counts, ema_sums)


def centroid_ema_normalized_mean(x, centroids, *, decay=0.999, eps=1e-12, padding_mask=None,
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
    padding_mask : bool ndarray (B, N), optional
        Tokens to leave out. lucidrains leaves out none: pass None to reproduce it.

    Returns
    -------
    CentroidUpdate
        ``centroids = decay · centroids + (1 - decay) · new_means`` (not
        renormalised); ``decay = 1`` returns them unchanged.
    """
    x, centroids, padding_mask = _check_vectors(x, centroids, padding_mask)
    decay = _check_decay(decay)
    eps = checks.real_number(eps, "eps", minimum=0.0, inclusive=False)
    num = numerics(precision)
    old = num.load(centroids)
    means, assignment = _normalized_mean(num.load(x), old, eps, padding_mask, num)
    # (L4) Exponential moving average toward the new means.
    new = num.store(decay * old + (1.0 - decay) * means)
    return CentroidUpdate(new.astype(np.float64), assignment)


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
        raise SpecError("iterations", "an integer >= 0", repr(iterations))
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
    queries' routing vectors and, unless ``shared_qk``, the keys'. The total is
    ``commitment · (e_q + e_k)`` (``"sum_of_means"``: google-research adds
    ``q_clustering_loss + k_clustering_loss``) or ``commitment · mean over
    queries and keys together`` = ``commitment · (e_q + e_k) / 2`` (``"mean"``:
    lucidrains ``F.mse_loss`` on ``cat(q, k)``). Padded tokens count, in both.

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
    prescale = 1.0 / np.sqrt(shape.head_dim) if p["query_prescale"] is None else checks.real_number(
        p["query_prescale"], "query_prescale", minimum=0.0, inclusive=False)  # fmt: skip
    weight = checks.real_number(p["commitment"], "commitment", minimum=0.0)
    reduction = checks.choice(p["loss_reduction"], "loss_reduction", LOSS_REDUCTIONS)
    shared_qk = checks.flag(shared_qk, "shared_qk")
    centroids = np.asarray(centroids, np.float64)
    errors = []
    for x, factor in ((q, prescale), (k, prescale if shared_qk else 1.0))[: 1 if shared_qk else 2]:
        r = normalize(factor * np.asarray(x, np.float64), norm=norm, eps=eps)[0]  # (B, H, N, D)
        nearest = nearest_cluster(cluster_similarity(r, centroids))  # (B, H, N)
        routed = np.take_along_axis(centroids[None], nearest[..., None], axis=2)  # (B, H, N, D)
        errors.append(np.mean((r - routed) ** 2))
    total = sum(errors)
    return float(weight * (total if reduction == "sum_of_means" else total / len(errors)))


def centroid_ema(q, k, v, *, centroids, shared_qk=False, padding_mask=None, ema_counts=None, ema_sums=None,
                 preset=None, centroid_update=FROM_PRESET, decay=FROM_PRESET, ema_eps=FROM_PRESET,
                 routing_norm=FROM_PRESET, norm_eps=FROM_PRESET, query_prescale=FROM_PRESET, precision=None,
                 backend="reference") -> Result:  # fmt: skip
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
    padding_mask : bool ndarray (B, N), optional
        Tokens left out of the update (of q and of k).
    ema_counts, ema_sums : optional
        ``"vq_ema"`` state (see :func:`centroid_ema_vq`); not used by ``"normalized_mean_ema"``.
    preset, centroid_update, decay, ema_eps, routing_norm, norm_eps, query_prescale
        As in refattn/routing/presets.py.
    precision, backend
        As for :func:`~refattn.routing.reference.routing_attention`.

    Returns
    -------
    Result
        ``out``: the updated centroids (H, K, D); ``lse``: None; ``aux``:
        ``assignment`` (B, H, N or 2N) int64, each routing vector's nearest
        centroid before the update.
    """
    if backend != "reference":
        raise SpecError("backend", "'reference' for centroid_ema", repr(backend))
    q, k, _, shape = checks.qkv(q, k, v)
    p = resolve(preset, centroid_update=centroid_update, decay=decay, ema_eps=ema_eps, routing_norm=routing_norm,
                norm_eps=norm_eps, query_prescale=query_prescale)  # fmt: skip
    update = checks.choice(p["centroid_update"], "centroid_update", UPDATES)
    norm = checks.choice(p["routing_norm"], "routing_norm", ROUTING_NORMS)
    eps = checks.real_number(p["norm_eps"], "norm_eps", minimum=0.0, inclusive=False)
    prescale = 1.0 / np.sqrt(shape.head_dim) if p["query_prescale"] is None else checks.real_number(
        p["query_prescale"], "query_prescale", minimum=0.0, inclusive=False)  # fmt: skip
    shared_qk = checks.flag(shared_qk, "shared_qk")
    check_centroids(centroids, shape.q_heads, shape.head_dim)
    padding_mask = check_padding_mask(padding_mask, shape.batch, shape.q_len)
    num = numerics(precision)
    # Steps (1)-(2) of routing attention: the routing vectors of the queries (and keys).
    r_q = normalize(num.store(prescale * num.load(q)), norm=norm, eps=eps, num=num)[0]
    vectors, padding = r_q, padding_mask
    if not shared_qk:
        r_k = normalize(num.load(k), norm=norm, eps=eps, num=num)[0]
        vectors = np.concatenate([r_q, r_k], axis=2)  # (B, H, 2N, D)
        padding = None if padding_mask is None else np.concatenate([padding_mask, padding_mask], axis=1)
    if update == "vq_ema":
        result = centroid_ema_vq(vectors, centroids, ema_counts=ema_counts, ema_sums=ema_sums, decay=p["decay"],
                                 eps=p["ema_eps"], padding_mask=padding, precision=num)  # fmt: skip
    else:
        result = centroid_ema_normalized_mean(vectors, centroids, decay=p["decay"], eps=p["ema_eps"],
                                              padding_mask=padding, precision=num)  # fmt: skip
    return Result(out=result.centroids, lse=None, aux={"assignment": result.assignment})


def centroid_ema_vjp(dout, q, k, v, *, dlse=None, **params):
    """The centroid update has no VJP here: both implementations run it outside autograd
    (a TF ``assign``, ``torch.no_grad``), so its conformance cases are forward only."""
    raise SpecError("centroid_ema", "a forward-only use (the update runs outside autograd in both implementations)",
                    "a request for its gradients")  # fmt: skip
