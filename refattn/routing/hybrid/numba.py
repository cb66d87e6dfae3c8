"""The numba backend of hybrid layers (spec/routing.md, "Hybrid layers", (H1)-(H3)).

Nothing here is particular to the layer: the routing heads are routing
attention's kernels (refattn/routing/numba.py) on their slice of the heads,
the local heads dense attention's (refattn/dense/numba.py), and the layer
places each group's output and gradients at its heads.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from ...dense import numba as dense
from .. import numba as routing
from .reference import HybridInputs


def forward(x: HybridInputs) -> Result:
    """Steps (H1)-(H3): ``out`` (B, H, N, Dv) in the compute dtype (float32 for float32/float16/bfloat16
    ``q``, float64 otherwise), ``lse`` None, and the routing heads' integer ``aux``."""
    # (H1) Routing heads.
    routed = routing.forward(x.routing)
    out = np.empty(x.v.shape, compute_dtype(x.q))  # (B, H, N, Dv)
    # (H2) Local heads: dense attention with the local window.
    if x.local is not None:
        out[:, x.local_heads] = dense.forward(x.local).out
    # (H3) Heads side by side, in head_order.
    out[:, x.routing_heads] = routed.out
    aux = {name: value for name, value in routed.aux.items() if name != "slot_lse"}
    return Result(out=out, lse=None, aux=aux)


def vjp(x: HybridInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (H3')-(H1'): each head group's VJP on its slice of ``dout``: ``q``, ``k``, ``v`` (and
    ``mem_k``, ``mem_v`` when given) in the compute dtype. ``saved`` is not used."""
    dout, dtype = cotangents.dout, compute_dtype(x.q)  # (B, H, N, Dv)
    grads = Grads({name: np.empty(a.shape, dtype) for name, a in (("q", x.q), ("k", x.k), ("v", x.v))})
    # (H3')-(H2') Local heads.
    if x.local is not None:
        local = dense.vjp(x.local, Cotangents(dout=dout[:, x.local_heads], dlse=None))
        for name in ("q", "k", "v"):
            grads[name][:, x.local_heads] = local[name]
    # (H1') Routing heads.
    routed = routing.vjp(x.routing, Cotangents(dout=dout[:, x.routing_heads], dlse=None))
    for name in ("q", "k", "v"):
        grads[name][:, x.routing_heads] = routed[name]
    grads.update({name: routed[name] for name in ("mem_k", "mem_v") if name in routed})
    return grads
