"""The numba backend of soft routing (spec/routing.md, "Soft routing", (S1)-(S3)).

Each path is dense attention, so each path's output and VJP are dense
attention's tiled kernels (refattn/dense/numba.py). What is particular to soft
routing is the mixture: per token, the softmax over paths of ``x · W_r`` and
the probability-weighted sum of the paths' outputs, and its gradient. Those
are the two small kernels here, parallel over the batch.

Einsum letters: b batch, h head, n token, x feature of ``x``, p path, e value dim.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype, read_only
from ...dense import numba as dense
from ..soft.reference import SoftRoutingInputs


def forward(x: SoftRoutingInputs) -> Result:
    """Steps (S1)-(S3): ``out`` (B, Hq, Nq, Dv) in the compute dtype (float32 for
    float32/float16/bfloat16 ``q``, float64 otherwise), ``lse`` None, ``aux`` empty."""
    dtype = compute_dtype(x.paths[0].q)
    stacked = _stacked([dense.forward(path).out for path in x.paths], dtype)  # (P, B, H, N, Dv)
    features, weights = read_only(x.x, x.x, dtype), read_only(x.routing_weights, x.routing_weights, dtype)
    out = np.empty(stacked.shape[1:], dtype)  # (B, H, N, Dv)
    _mixture_kernel(features, weights, stacked, np.empty(x.x.shape[:2] + (stacked.shape[0],), dtype), out)
    return Result(out=out, lse=None, aux={})


def vjp(x: SoftRoutingInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (S3')-(S1'), then each path's dense VJP on its output cotangent, summed: ``q``, ``k``,
    ``v``, ``x`` and ``routing_weights`` in the compute dtype. ``saved`` (the mixture) is not used:
    the paths' own outputs are recomputed, and passed to their VJPs as theirs."""
    dtype = compute_dtype(x.paths[0].q)
    results = [dense.forward(path) for path in x.paths]
    stacked = _stacked([result.out for result in results], dtype)  # (P, B, H, N, Dv)
    features, weights = read_only(x.x, x.x, dtype), read_only(x.routing_weights, x.routing_weights, dtype)
    dout = np.ascontiguousarray(cotangents.dout, dtype)  # (B, H, N, Dv)
    probabilities = np.empty(x.x.shape[:2] + (stacked.shape[0],), dtype)  # (B, N, P)
    _mixture_kernel(features, weights, stacked, probabilities, np.empty(dout.shape, dtype))
    d_paths = np.empty(stacked.shape, dtype)  # (P, B, H, N, Dv)
    d_logits = np.empty(probabilities.shape, dtype)  # (B, N, P)
    _mixture_vjp_kernel(stacked, probabilities, dout, d_paths, d_logits)
    # (S1') logits = x · W_r.
    d_weights = np.einsum("bnx,bnp->xp", features, d_logits).astype(dtype)
    d_features = np.einsum("bnp,xp->bnx", d_logits, weights).astype(dtype)
    grads = Grads(x=d_features, routing_weights=d_weights)
    for path, result, d_path in zip(x.paths, results, d_paths):
        path_grads = dense.vjp(path, Cotangents(dout=d_path, dlse=None), saved=result)
        for name in ("q", "k", "v"):
            grads[name] = path_grads[name] if name not in grads else grads[name] + path_grads[name]
    return grads


def _stacked(outputs: list[np.ndarray], dtype) -> np.ndarray:
    """The paths' outputs as one read-only (P, B, H, N, Dv) array of ``dtype``."""
    stacked = np.stack([np.asarray(o, dtype) for o in outputs])
    stacked.flags.writeable = False
    return stacked


@njit(parallel=True, cache=True)
def _mixture_kernel(features, weights, stacked, probabilities, out):
    """Steps (S1)-(S3): ``probabilities[b, n] = softmax(features[b, n] · weights)`` (B, N, P) and
    ``out[b, h, n] = Σ_p probabilities[b, n, p] · stacked[p, b, h, n]`` (B, H, N, Dv)."""
    paths, batch, heads, length, _ = stacked.shape
    for b in prange(batch):
        for n in range(length):
            # (S1) Logits over the paths, (S2) their softmax, stabilised by the largest.
            logits = features[b, n] @ weights  # (P,)
            e = np.exp(logits - logits.max())
            probabilities[b, n] = e / e.sum()
            # (S3) The mixture; every head of the token shares its probabilities.
            for h in range(heads):
                out[b, h, n] = probabilities[b, n, 0] * stacked[0, b, h, n]
                for p in range(1, paths):
                    out[b, h, n] += probabilities[b, n, p] * stacked[p, b, h, n]


@njit(parallel=True, cache=True)
def _mixture_vjp_kernel(stacked, probabilities, dout, d_paths, d_logits):
    """Steps (S3')-(S2'): each path's output cotangent ``d_paths[p, b, h, n] = π[b, n, p] · dout[b, h, n]``
    and the logits' ``d_logits[b, n] = π ⊙ (dπ - <π, dπ>)`` with ``dπ[p] = Σ_{h,e} dout · stacked[p]``."""
    paths, batch, heads, length, _ = stacked.shape
    for b in prange(batch):
        for n in range(length):
            # (S3') The probabilities' cotangent, and the paths' outputs'.
            d_probabilities = np.zeros(paths, probabilities.dtype)
            for p in range(paths):
                for h in range(heads):
                    d_paths[p, b, h, n] = probabilities[b, n, p] * dout[b, h, n]
                    d_probabilities[p] += np.dot(dout[b, h, n], stacked[p, b, h, n])
            # (S2') Through the softmax over the paths.
            row_dot = np.dot(probabilities[b, n], d_probabilities)
            d_logits[b, n] = probabilities[b, n] * (d_probabilities - row_dot)
