"""Hybrid layers: local heads and routing heads side by side (registry name "routing_hybrid").

Both published models keep dense local heads beside the routing heads of a
layer and concatenate the heads' outputs before the output projection. They
differ in the order of the heads (spec/routing.md, "Hybrid layers", (H1)-(H3)):

* google-research ``attention_nd`` splits the routing heads off first
  (``tf.split(q, [sparsity_cluster_num_heads, remainder])``) and concatenates
  ``[routing, ..., local]``: ``head_order="routing_first"``;
* lucidrains ``SelfAttention`` concatenates ``[local_out, global_out]``:
  ``head_order="local_first"``.

The local heads are dense attention (refattn/dense) with a sliding
``local_window``. Neither implementation's local heads are a sliding window:
google-research attends in query blocks with a memory flange, lucidrains'
``LocalAttention`` in buckets of ``window_size // 2`` looking one bucket back
(always causal, with relative position embeddings). Compare them head by head
with those details given to dense attention as masks.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.presets import FROM_PRESET
from ...core.results import Cotangents, Grads, Result
from ...dense import reference as dense
from ...dense.inputs import DenseInputs, check_dense_inputs
from .. import reference as routing
from ..inputs import RoutingInputs, check_routing_inputs
from ..presets import resolve

HEAD_ORDERS = ("routing_first", "local_first")
#: Preset parameters of the routing heads.
ROUTING_PARAMETERS = ("routing_norm", "norm_eps", "query_prescale", "attend_on", "normalize_shared_keys", "scale",
                       "causal_by", "order", "mask_value", "mask_mode", "self_mask", "self_mask_value", "query_padding",
                       "scatter_eps")  # fmt: skip


def hybrid_attention(q, k, v, *, num_local_heads, centroids, cluster_size, local_window=None, local_causal=FROM_PRESET,
                     head_order=FROM_PRESET, causal=False, shared_qk=False, key_padding_mask=None, mem_k=None,
                     mem_v=None, preset=None, routing_norm=FROM_PRESET, norm_eps=FROM_PRESET,
                     query_prescale=FROM_PRESET, attend_on=FROM_PRESET, normalize_shared_keys=FROM_PRESET,
                     scale=FROM_PRESET, causal_by=FROM_PRESET, order=FROM_PRESET, mask_value=FROM_PRESET,
                     mask_mode=FROM_PRESET, self_mask=FROM_PRESET, self_mask_value=FROM_PRESET,
                     query_padding=FROM_PRESET, scatter_eps=FROM_PRESET, precision=None,
                     backend="reference") -> Result:  # fmt: skip
    """A layer of ``num_local_heads`` local heads and ``H - num_local_heads`` routing heads, steps (H1)-(H3).

    Parameters
    ----------
    q, k : ndarray (B, H, N, D)
    v : ndarray (B, H, N, Dv)
    num_local_heads : int in [0, H - 1]
    centroids : ndarray (H - num_local_heads, K, D)
        The routing heads' centroids, in routing-head order.
    cluster_size : int
        Tokens per cluster of the routing heads.
    local_window : (left, right) or None
        The local heads' sliding window (dense attention's ``window``).
    local_causal : bool or None
        Whether the local heads are causal; None follows ``causal`` (every
        preset: google-research, and lucidrains' ``LocalAttention(causal = causal)``).
    head_order : {"routing_first", "local_first"}
        Which heads come first.
    causal, shared_qk, key_padding_mask, mem_k, mem_v, preset
        As for :func:`~refattn.routing.reference.routing_attention` (the
        routing heads); the local heads mask padded keys.
    routing_norm, norm_eps, query_prescale, attend_on, normalize_shared_keys, scale, causal_by, order,
    mask_value, mask_mode, self_mask, self_mask_value, query_padding, scatter_eps
        The routing heads' preset parameters, as for
        :func:`~refattn.routing.reference.routing_attention`.

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv). ``lse`` None: the routing heads have a
        log-sum-exp per cluster slot and none per token, so the layer has no
        (B, H, N) one. ``aux``: the routing heads' integer intermediates
        (``membership``, ``assignment``, ..., heads counted among the routing heads).
    """
    return registry.call_forward("routing_hybrid", locals())


hybrid_attention_vjp = registry.vjp_function(
    hybrid_attention, "routing_hybrid", grads="""    ``q``, ``k``, ``v`` (B, H, ...), and ``mem_k``, ``mem_v`` when given.
    ``dlse`` must be None: the layer returns no log-sum-exp.""",
)


@dataclass(frozen=True)
class HybridInputs:
    """The checked inputs of each head group, and where the groups sit among the heads."""

    q: np.ndarray  # (B, H, N, D)
    k: np.ndarray  # (B, H, N, D)
    v: np.ndarray  # (B, H, N, Dv)
    routing_heads: slice
    local_heads: slice
    local_causal: bool  # resolved: the preset's or the given value, None replaced by causal
    head_order: str  # resolved
    routing: RoutingInputs  # the routing heads' slice of q, k, v
    local: DenseInputs | None  # the local heads' slice; None without local heads

    def cotangent_shapes(self) -> dict:
        """``dout`` has the shape of ``out``; the layer has no ``lse``."""
        return {"dout": self.v.shape, "dlse": None}


def check_hybrid_inputs(q, k, v, *, num_local_heads, centroids, cluster_size, local_window, local_causal, head_order,
                        causal, shared_qk, key_padding_mask, mem_k, mem_v, preset, **routing_options) -> HybridInputs:  # fmt: skip
    """Check every argument of :func:`hybrid_attention`; raise :class:`SpecError` on the first bad one.

    ``routing_options`` are the routing heads' preset parameters (:data:`ROUTING_PARAMETERS`), passed on to
    :func:`~refattn.routing.inputs.check_routing_inputs`.
    """
    q, k, v, shape = checks.qkv(q, k, v)
    heads = shape.q_heads
    if isinstance(num_local_heads, bool) or not isinstance(num_local_heads, numbers.Integral) or not 0 <= num_local_heads < heads:
        raise SpecError("num_local_heads", f"an integer in [0, H - 1] = [0, {heads - 1}] (at least one routing head)",
                        repr(num_local_heads))  # fmt: skip
    count = heads - int(num_local_heads)
    if isinstance(centroids, np.ndarray) and centroids.ndim >= 1 and centroids.shape[0] != count:
        raise SpecError("centroids", f"one row per routing head: shape ({count}, K, D)", f"shape {centroids.shape}")
    p = resolve(preset, local_causal=local_causal, head_order=head_order)
    if checks.choice(p["head_order"], "head_order", HEAD_ORDERS) == "routing_first":
        routing_heads, local_heads = slice(0, count), slice(count, heads)
    else:
        routing_heads, local_heads = slice(heads - count, heads), slice(0, heads - count)
    options = {name: routing_options[name] for name in ROUTING_PARAMETERS}
    routed = check_routing_inputs(
        q[:, routing_heads], k[:, routing_heads], v[:, routing_heads], centroids=centroids, cluster_size=cluster_size,
        shared_qk=shared_qk, causal=causal, key_padding_mask=key_padding_mask, mem_k=mem_k, mem_v=mem_v,
        preset=preset, **options,
    )  # fmt: skip
    local = None
    local_causal = checks.flag(causal if p["local_causal"] is None else p["local_causal"], "local_causal")
    if local_heads.stop > local_heads.start:
        local = check_dense_inputs(
            q[:, local_heads], k[:, local_heads], v[:, local_heads],
            mask=None if key_padding_mask is None else key_padding_mask[:, None, None, :],  # (B, 1, 1, N)
            bias=None, causal=local_causal,
            causal_alignment="bottom_right", window=local_window, scale=None, softcap=0.0, dropout_keep=None,
            dropout_p=0.0,
        )  # fmt: skip
    return HybridInputs(q, k, v, routing_heads, local_heads, local_causal, p["head_order"], routed, local)


def forward(x: HybridInputs, num: Numerics) -> Result:
    """The reference backend: steps (H1)-(H3) in precision ``num``."""
    # (H1) Routing heads: routing attention on their slice of q, k, v.
    routed = routing.forward(x.routing, num)
    # (H2) Local heads: dense attention with the local window.
    out = np.zeros(x.v.shape)  # (B, H, N, Dv)
    if x.local is not None:
        out[:, x.local_heads] = dense.forward(x.local, num).out
    # (H3) Heads side by side, in head_order.
    out[:, x.routing_heads] = routed.out
    aux = {name: value for name, value in routed.aux.items() if name != "slot_lse"}
    return Result(out=out, lse=None, aux=aux)


def vjp(x: HybridInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: each head group's VJP on its slice of ``dout``, (H3')-(H1')."""
    dout = cotangents.dout  # (B, H, N, Dv)
    # (H3') Each head group gets its slice of the cotangent.
    routed = routing.vjp(x.routing, Cotangents(dout=dout[:, x.routing_heads], dlse=None), num)
    grads = Grads({name: np.zeros(a.shape) for name, a in (("q", x.q), ("k", x.k), ("v", x.v))})
    # (H2') Local heads.
    if x.local is not None:
        local = dense.vjp(x.local, Cotangents(dout=dout[:, x.local_heads], dlse=None), num)
        for name in ("q", "k", "v"):
            grads[name][:, x.local_heads] = local[name]
    # (H1') Routing heads.
    for name in ("q", "k", "v"):
        grads[name][:, x.routing_heads] = routed[name]
    grads.update({name: routed[name] for name in ("mem_k", "mem_v") if name in routed})
    return grads
