"""Hybrid layers over an array namespace ``xp`` (NumPy or CuPy), as refattn/routing/hybrid/numba.py
composes them (spec/routing.md, "Hybrid layers", (H1)-(H3)): the routing heads are routing attention's xp
algorithm on their slice of the heads, the local heads dense attention's, placed at their heads."""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .. import xp as routing_xp
from .reference import HybridInputs

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # the local heads' tiles


def forward(x: HybridInputs, xp) -> Result:
    """(H1)-(H3): ``out`` (B, H, N, Dv), ``lse`` None, the routing heads' integer ``aux``."""
    routed = routing_xp.forward(x.routing, xp)  # (H1)
    out = xp.empty(x.v.shape, dtype=compute_dtype(x.q.dtype))  # (B, H, N, Dv)
    if x.local is not None:  # (H2) local heads: dense attention with the local window
        out[:, x.local_heads] = dense_xp.attend(x.local, xp, (BLOCK_Q, BLOCK_K))[0]
    out[:, x.routing_heads] = routed.out  # (H3) side by side, in head_order
    return Result(out=out, lse=None, aux={name: value for name, value in routed.aux.items() if name != "slot_lse"})


def vjp(x: HybridInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """(H3')-(H1'): each head group's VJP on its slice of ``dout``."""
    dtype = compute_dtype(x.q.dtype)
    dout = xp.asarray(cotangents.dout, dtype=dtype)  # (B, H, N, Dv)
    grads = Grads({name: xp.empty(a.shape, dtype=dtype) for name, a in (("q", x.q), ("k", x.k), ("v", x.v))})
    if x.local is not None:  # (H3')-(H2')
        local = dense_xp.attend_vjp(x.local, Cotangents(dout=dout[:, x.local_heads]), xp, (BLOCK_Q, BLOCK_K))
        for name in ("q", "k", "v"):
            grads[name][:, x.local_heads] = local[name]
    routed = routing_xp.vjp(x.routing, Cotangents(dout=dout[:, x.routing_heads]), xp)  # (H1')
    for name in ("q", "k", "v"):
        grads[name][:, x.routing_heads] = routed[name]
    grads.update({name: routed[name] for name in ("mem_k", "mem_v") if name in routed})
    return grads
