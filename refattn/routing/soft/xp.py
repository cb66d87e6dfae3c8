"""Soft routing over an array namespace ``xp`` (NumPy or CuPy; refattn/core/xp.py): the GPU path's algorithm.

Each path is dense attention's tiled algorithm (refattn/dense/xp.py) in tiles
of :data:`BLOCK_Q` query rows and :data:`BLOCK_K` key columns; the mixture
(spec/routing.md, (S1)-(S3)) and its gradient are whole-array products, of
the size of the output.

Einsum letters: b batch, h head, n token, x feature of ``x``, p path, e value dim.
"""

from __future__ import annotations


from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype, device_array
from ...dense import xp as dense
from ..soft.reference import SoftRoutingInputs

BLOCK_Q = dense.BLOCK_Q
BLOCK_K = dense.BLOCK_K


def forward(x: SoftRoutingInputs, xp) -> Result:
    """Steps (S1)-(S3): ``out`` (B, Hq, Nq, Dv) in the compute dtype, ``lse`` None."""
    stacked = xp.stack([dense.attend(path, xp, (BLOCK_Q, BLOCK_K))[0] for path in x.paths])  # (P, B, H, N, Dv)
    probabilities, _ = _probabilities(x, xp)  # (B, N, P)
    # (S3) The mixture; the heads of a token share its probabilities.
    return Result(out=xp.einsum("bnp,pbhne->bhne", probabilities, stacked), lse=None, aux={})


def vjp(x: SoftRoutingInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (S3')-(S1'), then each path's dense VJP on its output cotangent, summed: ``q``, ``k``, ``v``,
    ``x``, ``routing_weights``. ``saved`` (the mixture) is not used: the paths' outputs are recomputed."""
    results = [dense.attend(path, xp, (BLOCK_Q, BLOCK_K)) for path in x.paths]  # P of (out, lse)
    stacked = xp.stack([out for out, _ in results])  # (P, B, H, N, Dv)
    probabilities, (features, weights) = _probabilities(x, xp)  # (B, N, P)
    dout = xp.asarray(cotangents.dout, dtype=stacked.dtype)  # (B, H, N, Dv)
    # (S3') Each path's output cotangent, and the probabilities'.
    d_paths = xp.einsum("bnp,bhne->pbhne", probabilities, dout)
    d_probabilities = xp.einsum("bhne,pbhne->bnp", dout, stacked)
    # (S2') Through the softmax over the paths.
    row_dot = (probabilities * d_probabilities).sum(axis=-1, keepdims=True)
    d_logits = probabilities * (d_probabilities - row_dot)  # (B, N, P)
    # (S1') logits = x · W_r.
    grads = Grads(x=xp.einsum("bnp,xp->bnx", d_logits, weights), routing_weights=xp.einsum("bnx,bnp->xp", features, d_logits))
    for path, (out, lse), d_path in zip(x.paths, results, d_paths):
        path_grads = dense.attend_vjp(path, Cotangents(dout=d_path, dlse=None), xp, (BLOCK_Q, BLOCK_K),
                                      Result(out=out, lse=lse, aux={}))  # fmt: skip
        for name in ("q", "k", "v"):
            grads[name] = path_grads[name] if name not in grads else grads[name] + path_grads[name]
    return grads


def _probabilities(x: SoftRoutingInputs, xp):
    """Steps (S1)-(S2): ``softmax over paths of x · W_r`` (B, N, P), and ``x``, ``W_r`` on the device."""
    dtype = compute_dtype(x.paths[0].q.dtype)
    features = device_array(x.x, xp, dtype)  # (B, N, Dx)
    weights = device_array(x.routing_weights, xp, dtype)  # (Dx, P)
    logits = xp.matmul(features, weights)  # (B, N, P)
    e = xp.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True), (features, weights)
