"""Compatibility presets of routing attention: every behaviour on which the paper's
semantics, google-research's code and lucidrains' code differ, in one dataclass.

A parameter of :func:`~refattn.routing.reference.routing_attention` (and of the
hybrid and centroid functions) that is left at
:data:`~refattn.core.presets.FROM_PRESET`
takes the preset's value; an explicit value overrides it. ``preset=None`` is the
canonical semantics (spec/routing.md, "Presets"). The sources of each value:

* google-research (google-research/google-research 2cae5b0e2a3e4b030d681d119fd8f31af1744d88):
  ``routing_transformer/utils.py`` (``multihead_attention_nd``,
  ``attention_nd``, ``clustered_local_attention_helper``,
  ``clustered_attention_bias_nd``, ``scatter_cluster_items``, ``online_kmeans``,
  ``layer_norm``) and the hyper-parameters of
  ``routing_transformer/sparse_transformer.py`` (``sparse_transformer_local``).
* lucidrains (lucidrains/routing-transformer 3f6c461a036e98dbae7e70c623d1c0e0616ef82a, the file of
  PyPI routing-transformer 1.6.1): ``routing_transformer/routing_transformer.py`` (``KmeansAttention``,
  ``Kmeans``, ``kmeans_iter``, ``scatter_mean``, ``SelfAttention``, the constants
  ``TOKEN_SELF_ATTN_VALUE`` and ``KMEAN_INIT_ITERS``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from ..core.errors import SpecError
from ..core.presets import FROM_PRESET


#: lucidrains masks with ``-torch.finfo(dots.dtype).max``; the models run in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class RoutingPreset:
    """One implementation's choice for every behaviour that differs.

    Attributes
    ----------
    routing_norm : {"layer", "l2"}
        How routing vectors are normalised: layer norm without scale or bias
        (google-research ``layer_norm(q, scaling=False)``) or L2 (lucidrains
        ``F.normalize``).
    norm_eps : float > 0
        Layer norm: added to the variance (google-research 1e-6). L2: the
        smallest norm divided by (``F.normalize``'s 1e-12).
    query_prescale : float > 0 or None
        Factor applied to q (and, under shared-QK, to k) before normalising;
        None means 1/sqrt(D). google-research scales q by 1/sqrt(D) in
        ``multihead_attention_nd`` before the layer norm, which changes the
        result only through ``norm_eps``.
    attend_on : {"normalized", "raw"}
        Whether attention uses the normalised routing vectors (google-research
        replaces q and k by their layer norms) or the raw q, k (lucidrains).
    normalize_shared_keys : bool
        With ``attend_on="raw"`` and shared-QK, normalise the keys (lucidrains:
        ``k = F.normalize(k)`` when ``shared_qk``).
    scale : float > 0 or None
        Logit scale; None means 1/sqrt(D). google-research multiplies by
        nothing after the layer norm (1.0); lucidrains by ``d ** -0.5``.
    causal_by : {"position", "slot"}
        Causal mask by the tokens' positions (lucidrains ``indices >= kv_indices``)
        or by their slots inside the cluster (google-research
        ``attention_bias_lower_triangle(attention_window)``).
    order : {"position", "similarity"}
        Order of the tokens inside a cluster: ascending position
        (google-research ``tf.sort(idx)``) or descending similarity (lucidrains
        ``topk``).
    mask_value : float or None
        None excludes masked keys exactly; a number replaces their logits
        (google-research -1e9, lucidrains ``-finfo(float32).max``), as
        ``mask_mode`` says.
    mask_mode : {"replace", "add"}
        How a numeric ``mask_value`` enters a masked logit: ``"replace"`` sets
        it to ``mask_value`` (canonical, lucidrains ``masked_fill``; a
        constant, no gradient); ``"add"`` adds it to the score (google-research
        adds the bias ``-1e9`` to the logits: ``attention_bias_lower_triangle``
        and ``embedding_to_padding`` biases), so a row with no allowed key is
        the softmax of its scores and its masked keys get gradients. The two
        differ only on such rows.
    self_mask : bool
        Under shared-QK, keep a token from attending to itself (lucidrains);
        google-research has no self mask.
    self_mask_value : float or None
        None: a token attends to itself only when no other key of its row is
        allowed (the Reformer rule). A number replaces the self logit, after
        every other mask (lucidrains ``TOKEN_SELF_ATTN_VALUE = -5e4``).
    query_padding : {"mask_row", "mask_window", "none"}
        What padding does to a padded token's own row: the whole row is masked,
        memory included (canonical); its window keys are masked but not the
        memory key/values (lucidrains pads the mask with True for memory);
        nothing (google-research masks padded keys only).
    scatter_eps : float >= 0
        ``out = sum / (count + scatter_eps)`` (google-research 1e-2,
        lucidrains 1e-5); 0 is the exact mean, 0 for unrouted tokens.
    head_order : {"routing_first", "local_first"}
        Hybrid layers: google-research splits routing heads off first
        (``tf.split(q, [sparsity_cluster_num_heads, ...])``); lucidrains
        concatenates ``[local_out, global_out]``.
    local_causal : bool or None
        Hybrid layers: whether local heads are causal; None follows ``causal``
        (google-research, and lucidrains since 57b1573, October 2020:
        ``LocalAttention(..., causal = causal)``; before it, ``causal = True``).
    centroid_update : {"vq_ema", "normalized_mean_ema"}
        google-research ``online_kmeans`` (EMA of counts and sums, Laplace
        smoothing) or lucidrains ``kmeans_iter`` + ``ema_inplace``.
    count_rule : {"per_head", "google_research"}
        ``"vq_ema"``: how a batch's count per centroid is formed. ``"per_head"``:
        head ``h``'s centroid ``c`` counts the vectors of head ``h`` nearest to
        it (right: what the paper's per-head k-means means).
        ``"google_research"`` reproduces a defect of ``online_kmeans``: the
        one-hot assignments ``[B, H, N, K]`` are reshaped to ``[-1, H, K]`` with
        no transpose and summed, so the count credited to head ``h`` comes
        from token ``s`` of head ``h'`` with ``(h'·N + s) mod H = h``: heads mixed.
    decay : float in [0, 1]
        EMA decay (0.999 in both: google-research hparams ``decay``,
        lucidrains ``kmeans_ema_decay``).
    ema_eps : float > 0
        google-research: Laplace smoothing epsilon of the counts (1e-5).
        lucidrains: ``F.normalize``'s epsilon of the new means (1e-12).
    commitment : float >= 0
        Commitment loss weight (google-research ``beta`` 1e-4, lucidrains
        ``commitment_factor`` 1e-4).
    loss_reduction : {"sum_of_means", "mean"}
        google-research adds the queries' and the keys' mean squared errors;
        lucidrains takes one mean over the queries and keys together.
    """

    name: str | None
    routing_norm: str
    norm_eps: float
    query_prescale: float | None
    attend_on: str
    normalize_shared_keys: bool
    scale: float | None
    causal_by: str
    order: str
    mask_value: float | None
    mask_mode: str
    self_mask: bool
    self_mask_value: float | None
    query_padding: str
    scatter_eps: float
    head_order: str
    local_causal: bool | None
    centroid_update: str
    count_rule: str
    decay: float
    ema_eps: float
    commitment: float
    loss_reduction: str


#: The paper's semantics, with refattn's conventions where the paper is silent.
CANONICAL = RoutingPreset(
    name=None,
    routing_norm="layer",
    norm_eps=1e-6,
    query_prescale=1.0,
    attend_on="normalized",
    normalize_shared_keys=False,
    scale=None,
    causal_by="position",
    order="position",
    mask_value=None,
    mask_mode="replace",
    self_mask=True,
    self_mask_value=None,
    query_padding="mask_row",
    scatter_eps=0.0,
    head_order="routing_first",
    local_causal=None,
    centroid_update="vq_ema",
    count_rule="per_head",
    decay=0.999,
    ema_eps=1e-5,
    commitment=1e-4,
    loss_reduction="sum_of_means",
)

PRESETS: dict[str, RoutingPreset] = {
    "google_research": replace(
        CANONICAL,
        name="google_research",
        query_prescale=None,
        scale=1.0,
        causal_by="slot",
        mask_value=-1e9,
        mask_mode="add",
        self_mask=False,
        query_padding="none",
        scatter_eps=1e-2,
        count_rule="google_research",
    ),
    "lucidrains": replace(
        CANONICAL,
        name="lucidrains",
        routing_norm="l2",
        norm_eps=1e-12,
        attend_on="raw",
        normalize_shared_keys=True,
        order="similarity",
        mask_value=-FLOAT32_MAX,
        self_mask_value=-5e4,
        query_padding="mask_window",
        scatter_eps=1e-5,
        head_order="local_first",
        centroid_update="normalized_mean_ema",
        ema_eps=1e-12,
        loss_reduction="mean",
    ),
}

#: Names that differ only by spelling: the repository is "google-research".
_ALIASES = {"google-research": "google_research"}

#: The preset-controlled parameter names.
PARAMETERS = tuple(f.name for f in fields(RoutingPreset) if f.name != "name")


def get_preset(preset) -> RoutingPreset:
    """The preset called ``preset`` ("google_research", "lucidrains"), or the canonical one for None."""
    if preset is None:
        return CANONICAL
    name = _ALIASES.get(preset, preset) if isinstance(preset, str) else preset
    if name not in PRESETS:
        raise SpecError("preset", f"None or one of {sorted(PRESETS)}", repr(preset))
    return PRESETS[name]


def resolve(preset, **given) -> dict:
    """The value of each named parameter: the given one, or the preset's where it is :data:`FROM_PRESET`."""
    chosen = get_preset(preset)
    return {name: getattr(chosen, name) if value is FROM_PRESET else value for name, value in given.items()}


def preset_value(params: dict, name: str, head_dim: int):
    """Parameter ``name`` as a call with keyword arguments ``params`` resolves it: given, or its preset's;
    a ``scale`` or ``query_prescale`` of None means ``1/sqrt(head_dim)``."""
    value = params.get(name, FROM_PRESET)
    if value is FROM_PRESET:
        value = getattr(get_preset(params.get("preset")), name)
    if name in ("scale", "query_prescale") and value is None:
        return 1.0 / np.sqrt(head_dim)
    return value
