"""Hybrid layers: local heads and routing heads side by side (registry name "routing_hybrid").

Both published models keep dense local heads beside the routing heads of a
layer and concatenate the heads' outputs before the output projection. They
differ in the order of the heads (spec/routing.md, "Hybrid layers", (H1)-(H3)):

* google-research ``attention_nd`` splits the routing heads off first
  (``tf.split(q, [sparsity_cluster_num_heads, remainder])``) and concatenates
  ``[routing, ..., local]``: ``head_order="routing_first"``;
* lucidrains ``SelfAttention`` concatenates ``[local_out, global_out]``:
  ``head_order="local_first"``.

The local heads here are :func:`refattn.dense_attention` with a sliding
``local_window``. Neither implementation's local heads are a sliding window:
google-research attends in query blocks with a memory flange, lucidrains'
``LocalAttention`` in buckets of ``window_size // 2`` looking one bucket back
(always causal, with relative position embeddings). Compare them head by head
with those details given to dense attention as masks.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..core import checks
from ..core.errors import SpecError
from ..core.precision import numerics
from ..core.results import Grads, Result
from ..dense.reference import dense_attention, dense_attention_vjp
from .presets import FROM_PRESET, resolve
from .reference import routing_attention, routing_attention_vjp

HEAD_ORDERS = ("routing_first", "local_first")
#: Preset parameters of the routing heads.
ROUTING_PARAMETERS = ("routing_norm", "norm_eps", "query_prescale", "attend_on", "normalize_shared_keys", "scale",
                       "causal_by", "order", "mask_value", "self_mask", "self_mask_value", "query_padding",
                       "scatter_eps")  # fmt: skip


def _split(q, k, v, *, num_local_heads, centroids, head_order, routing_options):
    """Check the head split; return (routing head slice, local head slice) and the routing options."""
    unknown = sorted(set(routing_options) - set(ROUTING_PARAMETERS))
    if unknown:
        raise SpecError(unknown[0], f"a parameter of the routing heads ({', '.join(ROUTING_PARAMETERS)})",
                        f"{unknown[0]}={routing_options[unknown[0]]!r}")  # fmt: skip
    _, _, _, shape = checks.qkv(q, k, v)
    heads = shape.q_heads
    if isinstance(num_local_heads, bool) or not isinstance(num_local_heads, numbers.Integral) or not 0 <= num_local_heads < heads:
        raise SpecError("num_local_heads", f"an integer in [0, H - 1] = [0, {heads - 1}] (at least one routing head)",
                        repr(num_local_heads))  # fmt: skip
    routing_heads = heads - int(num_local_heads)
    if isinstance(centroids, np.ndarray) and centroids.ndim >= 1 and centroids.shape[0] != routing_heads:
        raise SpecError("centroids", f"one row per routing head: shape ({routing_heads}, K, D)", f"shape {centroids.shape}")
    order = checks.choice(head_order, "head_order", HEAD_ORDERS)
    if order == "routing_first":
        return slice(0, routing_heads), slice(routing_heads, heads)
    return slice(heads - routing_heads, heads), slice(0, heads - routing_heads)


def _local_mask(padding_mask):
    """Key padding for the local heads: (B, 1, 1, N), or None."""
    return None if padding_mask is None else padding_mask[:, None, None, :]


def hybrid_attention(q, k, v, *, num_local_heads, centroids, window, local_window=None, local_causal=FROM_PRESET,
                     head_order=FROM_PRESET, causal=False, shared_qk=False, padding_mask=None, mem_k=None, mem_v=None,
                     preset=None, precision=None, backend="reference", **routing_options) -> Result:  # fmt: skip
    """A layer of ``num_local_heads`` local heads and ``H - num_local_heads`` routing heads, steps (H1)-(H3).

    Parameters
    ----------
    q, k : ndarray (B, H, N, D)
    v : ndarray (B, H, N, Dv)
    num_local_heads : int in [0, H - 1]
    centroids : ndarray (H - num_local_heads, K, D)
        The routing heads' centroids, in routing-head order.
    window : int
        Tokens per cluster of the routing heads.
    local_window : (left, right) or None
        The local heads' sliding window (dense attention's ``window``).
    local_causal : bool or None
        Whether the local heads are causal; None follows ``causal``
        (google-research); the lucidrains preset makes them causal always.
    head_order : {"routing_first", "local_first"}
        Which heads come first.
    causal, shared_qk, padding_mask, mem_k, mem_v, preset
        As for :func:`~refattn.routing.reference.routing_attention` (the
        routing heads); the local heads mask padded keys.
    **routing_options
        Preset parameters of the routing heads (``scatter_eps``, ``causal_by``, ...).

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv); ``lse`` None (the routing heads' log-sum-exps are
        per cluster slot, the local heads' per token); ``aux``: the routing
        heads' intermediates (heads counted among the routing heads).
    """
    if backend != "reference":
        raise SpecError("backend", "'reference' for routing_hybrid", repr(backend))
    p = resolve(preset, local_causal=local_causal, head_order=head_order)
    routing, local = _split(q, k, v, num_local_heads=num_local_heads, centroids=centroids, head_order=p["head_order"],
                            routing_options=routing_options)  # fmt: skip
    local_causal = causal if p["local_causal"] is None else p["local_causal"]
    num = numerics(precision)
    # (H1) Routing heads: routing attention on their slice of q, k, v.
    routed = routing_attention(q[:, routing], k[:, routing], v[:, routing], centroids=centroids, window=window,
                               shared_qk=shared_qk, causal=causal, padding_mask=padding_mask, mem_k=mem_k, mem_v=mem_v,
                               preset=preset, precision=num, **routing_options)  # fmt: skip
    # (H2) Local heads: dense attention with the local window.
    out = np.zeros(v.shape)  # (B, H, N, Dv)
    if local.stop > local.start:
        out[:, local] = dense_attention(q[:, local], k[:, local], v[:, local], mask=_local_mask(padding_mask),
                                        causal=checks.flag(local_causal, "local_causal"),
                                        window=local_window, precision=num).out  # fmt: skip
    # (H3) Heads side by side, in head_order.
    out[:, routing] = routed.out
    return Result(out=out, lse=None, aux=routed.aux)


def hybrid_attention_vjp(dout, q, k, v, *, dlse=None, num_local_heads, centroids, window, local_window=None,
                         local_causal=FROM_PRESET, head_order=FROM_PRESET, causal=False, shared_qk=False,
                         padding_mask=None, mem_k=None, mem_v=None, preset=None, precision=None, backend="reference",
                         **routing_options) -> Grads:  # fmt: skip
    """Gradients of :func:`hybrid_attention`: each head group's VJP on its slice of ``dout``, (H3')-(H1').

    Returns
    -------
    Grads
        ``q``, ``k``, ``v`` (B, H, ...), and ``mem_k``, ``mem_v`` when given.
        ``dlse`` must be None: the layer returns no log-sum-exp.
    """
    if backend != "reference":
        raise SpecError("backend", "'reference' for routing_hybrid", repr(backend))
    if dlse is not None:
        raise SpecError("dlse", "None (a hybrid layer returns no log-sum-exp)", "an array")
    p = resolve(preset, local_causal=local_causal, head_order=head_order)
    routing, local = _split(q, k, v, num_local_heads=num_local_heads, centroids=centroids, head_order=p["head_order"],
                            routing_options=routing_options)  # fmt: skip
    dout = checks.cotangent(dout, "dout", v.shape)
    local_causal = causal if p["local_causal"] is None else p["local_causal"]
    num = numerics(precision)
    # (H3') Each head group gets its slice of the cotangent.
    routed = routing_attention_vjp(dout[:, routing], q[:, routing], k[:, routing], v[:, routing], centroids=centroids,
                                   window=window, shared_qk=shared_qk, causal=causal, padding_mask=padding_mask,
                                   mem_k=mem_k, mem_v=mem_v, preset=preset, precision=num,
                                   **routing_options)  # fmt: skip
    grads = Grads({name: np.zeros(np.shape(x)) for name, x in (("q", q), ("k", k), ("v", v))})
    # (H2') Local heads.
    if local.stop > local.start:
        local_grads = dense_attention_vjp(dout[:, local], q[:, local], k[:, local], v[:, local],
                                          mask=_local_mask(padding_mask), causal=checks.flag(local_causal, "local_causal"),
                                          window=local_window, precision=num)  # fmt: skip
        for name in ("q", "k", "v"):
            grads[name][:, local] = local_grads[name]
    # (H1') Routing heads.
    for name in ("q", "k", "v"):
        grads[name][:, routing] = routed[name]
    grads.update({name: routed[name] for name in ("mem_k", "mem_v") if name in routed})
    return grads

