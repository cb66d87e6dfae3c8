"""Routing problems whose discrete decisions are far from any tie (a recorded margin).

Random queries and centroids put some token within rounding of a tie: two
centroids equally near, or two tokens equally similar at a cluster's window
boundary. A float32 (or bfloat16) implementation may then decide otherwise
than the float64 reference, and the comparison is meaningless. So the
similarities are designed first and the vectors built to have them:

* per head, ``K`` orthonormal directions ``E_c`` (orthogonal to the all-ones
  vector under layer norm, whose outputs have mean 0), and centroids
  ``μ_c = E_c`` (plus a multiple of the ones vector under layer norm, which no
  routing vector sees);
* per token, designed similarities ``u[n, c]``: cluster ``c``'s values are an
  evenly spaced grid of step ``Δ`` over ``[-A, A]``, shifted by ``c Δ / K`` and
  shuffled, redrawn until every token's best centroid beats its second by at
  least ``Δ / 2``;
* the routing vector ``r_n = ρ (Σ_c u[n, c] E_c + sqrt(1 - |u_n|²) e_n)`` with
  ``e_n`` a unit vector orthogonal to the ``E_c`` (and to the ones vector), and
  ``ρ = sqrt(D)`` (the norm of a layer-normed vector) or 1 (L2); so
  ``r_n · μ_c = ρ u[n, c]`` exactly;
* the raw vector that normalises to ``r_n``: ``(σ_n r_n + m_n 1) / prescale``
  with a random scale ``σ_n`` and offset ``m_n`` (no offset under L2).

Every decision then has a margin of at least ``Δ / 2`` in units of ``ρ``, the
size of ``|r| |μ|`` (:data:`MIN_RELATIVE_MARGIN` for the sizes of the cases).
"""

from __future__ import annotations

import numpy as np

from ..conformance.case import Dims
from .presets import get_preset

#: Smallest decision margin, relative to |r| · |μ|, of every problem made here with N <= 32, K <= 4.
MIN_RELATIVE_MARGIN = 0.01
#: Largest norm of a token's designed similarities, leaving room for its own direction e_n.
_SPAN = 0.8


def _directions(rng: np.random.Generator, dim: int, count: int, centred: bool) -> np.ndarray:
    """``count`` orthonormal vectors of R^dim (orthogonal to the ones vector when ``centred``), (count, dim)."""
    basis = rng.standard_normal((dim, count + 1))
    if centred:
        basis = np.concatenate([np.ones((dim, 1)), basis], axis=1)
    orthonormal, _ = np.linalg.qr(basis)
    return orthonormal[:, 1 if centred else 0 :][:, :count].T


def _similarities(rng: np.random.Generator, length: int, clusters: int, empty_cluster: bool) -> np.ndarray:
    """Designed ``u`` (N, K): shuffled shifted grids, best centroid ahead of the second by >= Δ/2."""
    half_width = _SPAN / np.sqrt(clusters) / 1.1
    step = 2 * half_width / (length - 1)
    grid = np.linspace(-half_width, half_width, length)
    for _ in range(1000):
        u = np.stack([grid[rng.permutation(length)] + c * step / clusters for c in range(clusters)], axis=1)
        if empty_cluster:
            u[:, -1] = u[:, :-1].min(axis=1) - step  # nobody's nearest centroid
        ranked = -np.sort(-u, axis=1)
        if clusters == 1 or np.min(ranked[:, 0] - ranked[:, 1]) >= step / 2:
            return u
    raise RuntimeError("no assignment with margin found; use fewer tokens or clusters")


def _vectors(rng: np.random.Generator, u: np.ndarray, directions: np.ndarray, norm: str, prescale: float) -> np.ndarray:
    """Raw vectors (N, D) whose routing vectors have similarities ``ρ u`` to the directions."""
    length, dim = u.shape[0], directions.shape[1]
    centred = norm == "layer"
    radius = np.sqrt(dim) if centred else 1.0
    # A unit vector of each token in the complement of the directions (and of the ones vector).
    own = rng.standard_normal((length, dim))
    own -= (own @ directions.T) @ directions
    if centred:
        own -= own.mean(axis=1, keepdims=True)
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    routed = radius * (u @ directions + np.sqrt(1.0 - np.sum(u * u, axis=1, keepdims=True)) * own)  # (N, D)
    raw = rng.uniform(1.0, 3.0, (length, 1)) * routed
    if centred:
        raw += rng.normal(0.0, 0.5, (length, 1))
    return raw / prescale


def routed_problem(rng: np.random.Generator, *, batch: int, heads: int, length: int, head_dim: int, clusters: int,
                   value_dim: int | None = None, routing_norm: str = "layer", query_prescale: float = 1.0,
                   shared_qk: bool = False, empty_cluster: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """q, k, v and centroids whose routing decisions have a margin (module docstring).

    Parameters
    ----------
    rng : numpy Generator
    batch, heads, length, head_dim, clusters : int
        ``clusters <= head_dim - 2``.
    value_dim : int, optional
        Dv (default ``head_dim``).
    routing_norm : {"layer", "l2"}
    query_prescale : float
        The factor routing applies to q (and to k under ``shared_qk``) before
        normalising: the vectors are divided by it, so that routing sees the
        designed ones.
    shared_qk : bool
        ``k`` is a copy of ``q``.
    empty_cluster : bool
        No token has the last centroid as its nearest (for centroid updates;
        the selection margins of that centroid are then not controlled).

    Returns
    -------
    dict
        ``q``, ``k`` (B, H, N, D), ``v`` (B, H, N, Dv), ``centroids`` (H, K, D), float64.
    """
    centred = routing_norm == "layer"
    q = np.empty((batch, heads, length, head_dim))
    k = np.empty_like(q)
    centroids = np.empty((heads, clusters, head_dim))
    for h in range(heads):
        directions = _directions(rng, head_dim, clusters, centred)  # (K, D)
        centroids[h] = directions + (rng.uniform(-0.2, 0.2, (clusters, 1)) if centred else 0.0)
        for b in range(batch):
            q[b, h] = _vectors(rng, _similarities(rng, length, clusters, empty_cluster), directions, routing_norm, query_prescale)
            key_prescale = query_prescale if shared_qk else 1.0
            k[b, h] = q[b, h] if shared_qk else _vectors(
                rng, _similarities(rng, length, clusters, empty_cluster), directions, routing_norm, key_prescale)
    v = rng.standard_normal((batch, heads, length, value_dim or head_dim))
    return {"q": q, "k": k, "v": v, "centroids": centroids}


# --- the routing mechanisms' conformance cases ------------------------------------


def routing_dims(b: int, h: int, n: int, d: int, dv: int) -> Dims:
    """The sizes of a routing case: self-attention, ``h`` heads for q, k and v, ``n`` tokens."""
    return Dims(b, h, h, n, n, d, dv)


def preset_problem(rng: np.random.Generator, dims: Dims, clusters: int, preset, *, shared_qk: bool = False,
                   empty_cluster: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """:func:`routed_problem` of sizes ``dims`` for ``preset``'s routing normalisation and query prescale."""
    chosen = get_preset(preset)
    prescale = 1.0 / np.sqrt(dims.d) if chosen.query_prescale is None else chosen.query_prescale
    return routed_problem(rng, batch=dims.b, heads=dims.hq, length=dims.nq, head_dim=dims.d, value_dim=dims.dv,
                          clusters=clusters, routing_norm=chosen.routing_norm, query_prescale=prescale,
                          shared_qk=shared_qk, empty_cluster=empty_cluster)  # fmt: skip


def zero_padded_tokens(problem: dict, key_padding_mask: np.ndarray) -> dict:
    """``problem`` with q, k and v all zero at padded tokens: google-research's padding convention.

    google-research takes no padding mask: ``embedding_to_padding`` calls a
    token padding where its vector is all zero, so its k-means skips zero
    routing vectors and its attention masks keys whose value is zero. With
    zero vectors at the padded tokens of ``key_padding_mask``, its code sees
    the same padding as refattn's mask (a zero q or k routes with similarity 0
    to every centroid: exact ties, broken by the lower position).
    """
    padded = ~key_padding_mask[:, None, :, None]  # (B, 1, N, 1)
    return {name: np.where(padded, 0.0, x) if name in ("q", "k", "v") else x for name, x in problem.items()}


def random_key_padding(rng: np.random.Generator, dims: Dims) -> np.ndarray:
    """A ``key_padding_mask`` (B, N), True = real token: about one token in four padded, never the first."""
    mask = rng.random((dims.b, dims.nq)) >= 0.25
    mask[:, 0] = True
    return mask
