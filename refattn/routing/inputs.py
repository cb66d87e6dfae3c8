"""Checked inputs of one routing-attention call, shared by every routing backend.

:func:`check_routing_inputs` is the registry's ``check_inputs`` for "routing":
every ``SpecError`` is raised here, before any backend runs. The checks of
single arguments (``cluster_size``, ``centroids``, ``key_padding_mask``,
``query_prescale``) are reused by the hybrid layer and the centroid updates.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..core import checks
from ..core.errors import SpecError
from .presets import resolve

ROUTING_NORMS = ("layer", "l2")
ATTEND_ON = ("normalized", "raw")
CAUSAL_BY = ("position", "slot")
ORDERS = ("position", "similarity")
QUERY_PADDING = ("mask_row", "mask_window", "none")
#: Values of ``mask_mode``: a numeric ``mask_value`` replaces a masked logit or is added to it.
MASK_MODES = ("replace", "add")


@dataclass(frozen=True)
class RoutingInputs:
    """Checked arguments of one routing-attention call, preset resolved; arrays in the caller's dtype."""

    q: np.ndarray  # (B, H, N, D)
    k: np.ndarray  # (B, H, N, D)
    v: np.ndarray  # (B, H, N, Dv)
    centroids: np.ndarray  # (H, K, D)
    mem_k: np.ndarray | None  # (H, K, M, D)
    mem_v: np.ndarray | None  # (H, K, M, Dv)
    key_padding_mask: np.ndarray | None  # (B, N) bool, True = real token
    cluster_size: int
    shared_qk: bool
    causal: bool
    routing_norm: str
    norm_eps: float
    query_prescale: float
    attend_on: str
    normalize_shared_keys: bool
    scale: float
    causal_by: str
    order: str
    mask_value: float | None
    mask_mode: str
    self_mask: bool
    self_mask_value: float | None
    query_padding: str
    scatter_eps: float

    def cotangent_shapes(self) -> dict:
        """``dout`` has the shape of ``out``; there is no per-token ``lse`` (its slot values are ``aux``)."""
        return {"dout": self.v.shape, "dlse": None}

    @property
    def num_memory(self) -> int:
        return 0 if self.mem_k is None else self.mem_k.shape[2]

    @property
    def key_prescale(self) -> float:
        """Under shared-QK the keys are query vectors and get the query prescale too."""
        return self.query_prescale if self.shared_qk else 1.0

    @property
    def normalized_keys(self) -> bool:
        return self.attend_on == "normalized" or (self.shared_qk and self.normalize_shared_keys)


def _optional_number(x, name: str) -> float | None:
    return None if x is None else checks.real_number(x, name, minimum=-np.inf)


def check_cluster_size(cluster_size, length: int) -> int:
    """``cluster_size``: an integer in [1, N], the tokens each centroid selects."""
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, numbers.Integral) or not 1 <= cluster_size <= length:
        raise SpecError("cluster_size", f"an integer in [1, N] = [1, {length}] (tokens per cluster)", checks.summary(cluster_size))
    return int(cluster_size)


def check_centroids(centroids, heads: int, head_dim: int) -> np.ndarray:
    """``centroids``: finite (H, K, D) with K >= 1."""
    if isinstance(centroids, np.ndarray) and (centroids.ndim != 3 or centroids.shape[0] != heads
                                              or centroids.shape[2] != head_dim):  # fmt: skip
        raise SpecError("centroids", f"shape (H, K, D) = ({heads}, K, {head_dim})", f"shape {centroids.shape}")
    centroids = checks.float_array(centroids, "centroids")
    if centroids.shape[1] < 1:
        raise SpecError("centroids", "num_clusters K >= 1", f"shape {centroids.shape} (K = 0)")
    return centroids


def check_key_padding_mask(key_padding_mask, batch: int, length: int) -> np.ndarray | None:
    """``key_padding_mask``: None or bool (B, N), True = real token."""
    if key_padding_mask is None:
        return None
    mask = key_padding_mask
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (batch, length):
        given = f"shape {mask.shape}, dtype {mask.dtype}" if isinstance(mask, np.ndarray) else repr(mask)
        raise SpecError("key_padding_mask", f"a bool array of shape (B, N) = ({batch}, {length}), True = real token", given)
    return mask


def check_query_prescale(query_prescale, head_dim: int) -> float:
    """``query_prescale``: a number > 0, or None for ``1/sqrt(D)``."""
    if query_prescale is None:
        return 1.0 / np.sqrt(head_dim)
    return checks.real_number(query_prescale, "query_prescale", minimum=0.0, inclusive=False)


def _check_memory(mem_k, mem_v, heads: int, clusters: int, head_dim: int, value_dim: int):
    if (mem_k is None) != (mem_v is None):
        raise SpecError("mem_k, mem_v", "both or neither", f"mem_k {'None' if mem_k is None else 'given'}, "
                        f"mem_v {'None' if mem_v is None else 'given'}")  # fmt: skip
    if mem_k is None:
        return None, None
    for name, x, dim in (("mem_k", mem_k, head_dim), ("mem_v", mem_v, value_dim)):
        x = checks.float_array(x, name)
        if x.ndim != 4 or x.shape[:2] != (heads, clusters) or x.shape[3] != dim or x.shape[2] < 1:
            raise SpecError(name, f"shape (H, K, M, {'D' if name == 'mem_k' else 'Dv'}) = ({heads}, {clusters}, M >= 1, {dim})",
                            f"shape {x.shape}")  # fmt: skip
    if mem_k.shape[2] != mem_v.shape[2]:
        raise SpecError("mem_v", f"M = {mem_k.shape[2]} memory slots (as mem_k)", f"shape {mem_v.shape}")
    return mem_k, mem_v


def check_routing_inputs(q, k, v, *, centroids, cluster_size, shared_qk, causal, key_padding_mask, mem_k, mem_v,
                         preset, **preset_params) -> RoutingInputs:  # fmt: skip
    """Check every argument of ``routing_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = checks.qkv(q, k, v)
    if shape.kv_heads != shape.q_heads:
        raise SpecError("k", f"{shape.q_heads} heads, as q (routing attention has no grouped-query heads)", f"{shape.kv_heads} heads")
    if shape.kv_len != shape.q_len:
        raise SpecError("k", f"{shape.q_len} tokens, as q (routing is self-attention)", f"{shape.kv_len} tokens")
    p = resolve(preset, **preset_params)
    centroids = check_centroids(centroids, shape.q_heads, shape.head_dim)
    mem_k, mem_v = _check_memory(mem_k, mem_v, shape.q_heads, centroids.shape[1], shape.head_dim, shape.value_dim)
    inputs = RoutingInputs(
        q=q, k=k, v=v, centroids=centroids, mem_k=mem_k, mem_v=mem_v,
        key_padding_mask=check_key_padding_mask(key_padding_mask, shape.batch, shape.q_len),
        cluster_size=check_cluster_size(cluster_size, shape.q_len),
        shared_qk=checks.flag(shared_qk, "shared_qk"),
        causal=checks.flag(causal, "causal"),
        routing_norm=checks.choice(p["routing_norm"], "routing_norm", ROUTING_NORMS),
        norm_eps=checks.real_number(p["norm_eps"], "norm_eps", minimum=0.0, inclusive=False),
        query_prescale=check_query_prescale(p["query_prescale"], shape.head_dim),
        attend_on=checks.choice(p["attend_on"], "attend_on", ATTEND_ON),
        normalize_shared_keys=checks.flag(p["normalize_shared_keys"], "normalize_shared_keys"),
        scale=checks.scale(p["scale"], shape.head_dim),
        causal_by=checks.choice(p["causal_by"], "causal_by", CAUSAL_BY),
        order=checks.choice(p["order"], "order", ORDERS),
        mask_value=_optional_number(p["mask_value"], "mask_value"),
        mask_mode=checks.choice(p["mask_mode"], "mask_mode", MASK_MODES),
        self_mask=checks.flag(p["self_mask"], "self_mask"),
        self_mask_value=_optional_number(p["self_mask_value"], "self_mask_value"),
        query_padding=checks.choice(p["query_padding"], "query_padding", QUERY_PADDING),
        scatter_eps=checks.real_number(p["scatter_eps"], "scatter_eps", minimum=0.0),
    )  # fmt: skip
    # (1)-(2) form |prescale · x|² to normalise; (7) attends on routing vectors (|r| <= sqrt(D) after a layer
    # norm, 1 after L2) or on q and k as given, the memory keys among the keys.
    routed_norm = np.sqrt(shape.head_dim) if inputs.routing_norm == "layer" else 1.0
    checks.scores_within_range(
        routed_norm if inputs.attend_on == "normalized" else q,
        (routed_norm if inputs.normalized_keys else k,) + (() if mem_k is None else (mem_k,)), inputs.scale,
        "q, k, mem_k", normalised=((q, inputs.query_prescale), (k, inputs.key_prescale)),
    )  # fmt: skip
    return inputs
