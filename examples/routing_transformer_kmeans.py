"""Run lucidrains' routing-transformer ``KmeansAttention`` on refattn's routing vectors.

``routing_kmeans(q, k, v, **params)`` builds ``KmeansAttention`` from the
case's parameters (``num_clusters`` and ``head_dim`` from the centroids
(H, K, D), ``window_size = cluster_size``) and runs its own forward on the
case's (B, H, N, D) arrays:

* **Centroids.** The library keeps them in the buffer ``kmeans.means`` and
  initialises them by k-means on the first batch (``Kmeans.init``) unless
  ``kmeans.initted`` is set. The adapter copies the case's centroids into
  ``means`` and sets ``initted``; in ``eval()`` mode they are not updated, so
  the library's own routing (``F.normalize``, ``similarity``, ``distribution``'s
  top-k per centroid), gathers, masks and ``scatter_mean`` run on them. Its
  top-k indices are refattn's ``aux.membership`` and ``aux.key_membership``.
* **Memory keys/values.** ``mem_key`` and ``mem_value`` (H, K, M, D) are the
  case's ``mem_k`` and ``mem_v`` (as tensors, so autograd reaches them).
* The library returns no log-sum-exp (refattn's routing has none either) and
  no per-slot log-sum-exp, assignment or counts: those aux are listed as not
  returned (``partial``).

The library fixes raw (unnormalised) q and k in the logits, the scale
``head_dim ** -0.5``, l2 routing, slots ordered by similarity, a self score of
-5e4 with shared q/k, masks that replace scores with ``-finfo.max``, the
scatter eps 1e-5, Dv = D, and one memory key/value per cluster in causal mode
without shared q/k; cases that ask for anything else raise
``NotImplementedError`` (``unsupported``)::

    refattn verify --mechanism routing --impl examples/routing_transformer_kmeans.py:routing_kmeans --grad

lucidrains/routing-transformer ``routing_transformer/routing_transformer.py``, version 1.6.1 as installed.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
from routing_transformer import routing_transformer as library

from _gallery_entry import Entry
from refattn.conformance.adapters import from_torch
from refattn.core.results import Result

#: The behaviours KmeansAttention cannot change (refattn.routing.presets, "lucidrains").
FIXED = dict(attend_on="raw", routing_norm="l2", norm_eps=1e-12, order="similarity", causal_by="position",
             mask_mode="replace", self_mask_value=-5e4, scatter_eps=1e-5, query_prescale=1.0,
             normalize_shared_keys=True, query_padding="mask_window")  # fmt: skip


def attention(q, k, v, *, centroids, cluster_size, causal=False, shared_qk=False, key_padding_mask=None, mem_k=None,
              mem_v=None, **behaviours):  # fmt: skip
    """KmeansAttention's forward on torch tensors (B, H, N, D); returns (out, aux)."""
    heads, clusters, d = centroids.shape
    _require_expressible(q, k, v, causal, shared_qk, mem_k, behaviours)
    module = library.KmeansAttention(clusters, cluster_size, heads, d, causal=causal, shared_qk=shared_qk,
                             num_mem_kv=0 if mem_k is None else mem_k.shape[2]).to(q.dtype).eval()  # fmt: skip
    with torch.no_grad():
        module.kmeans.means.copy_(centroids)
        module.kmeans.initted.fill_(True)
    if mem_k is not None:
        del module.mem_key, module.mem_value  # plain tensors instead of parameters: gradients reach the case's
        module.mem_key, module.mem_value = mem_k, mem_v
    recorded = []
    with mock.patch.object(library, "distribution", _recording_distribution(recorded)):
        out, _ = module(q, k, v, query_mask=key_padding_mask)
    membership, key_membership = (x.reshape(x.shape[0], heads, clusters, -1) for x in (recorded[0], recorded[-1]))
    return out, {"membership": membership, "key_membership": key_membership}  # (B, H, K, W) each


def _require_expressible(q, k, v, causal, shared_qk, mem_k, behaviours):
    """Raise NotImplementedError for what KmeansAttention cannot compute."""
    d = q.shape[-1]
    if v.shape[-1] != d or k.shape[1] != q.shape[1]:
        raise NotImplementedError("KmeansAttention has values of the head dim and no grouped kv heads")
    differing = {name: value for name, value in behaviours.items() if name in FIXED and value != FIXED[name]}
    if differing:
        raise NotImplementedError("KmeansAttention fixes " + ", ".join(f"{name}={FIXED[name]!r}" for name in sorted(differing)))
    if behaviours.get("scale") not in (None, d**-0.5):
        raise NotImplementedError("KmeansAttention scales the logits by head_dim ** -0.5")
    if behaviours.get("mask_value") not in (None, -float(np.finfo(np.float32).max)):
        raise NotImplementedError("KmeansAttention masks with -finfo(dtype).max (max_neg_value)")
    if causal and not shared_qk and mem_k is None:
        raise NotImplementedError("KmeansAttention adds a memory key/value per cluster when causal without shared_qk")
    if shared_qk and not behaviours.get("self_mask", True):
        raise NotImplementedError("KmeansAttention always gives a shared-qk token's own score -5e4")



def _recording_distribution(recorded: list):
    """``distribution`` (each centroid's top-k tokens, (B, H, K·W)) that keeps its results: queries', then keys'."""
    real = library.distribution

    def distribution(dists, window_size):
        indices = real(dists, window_size)
        recorded.append(indices)
        return indices

    return distribution


def _out(q, k, v, **params):
    return attention(q, k, v, **params)[0]


def routing_kmeans(q, k, v, **params) -> Result:
    """KmeansAttention's forward on a case: ``Result(out, lse=None, aux={membership, key_membership})``."""
    tensors = {name: torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x for name, x in params.items()}
    with torch.no_grad():
        out, aux = attention(*(torch.from_numpy(x) for x in (q, k, v)), **tensors)
    return Result(out=out.numpy(), lse=None, aux={name: a.numpy() for name, a in aux.items()})


routing_kmeans_vjp = from_torch(_out).vjp

GALLERY = (
    Entry("routing-transformer", "routing_transformer.KmeansAttention", "routing_kmeans", "routing", "float32", True,
          vjp="routing_kmeans_vjp"),
    Entry("routing-transformer", "routing_transformer.KmeansAttention", "routing_kmeans", "routing", "float64", True,
          vjp="routing_kmeans_vjp"),
)  # fmt: skip

EXPLANATIONS: dict[str, str] = {}
