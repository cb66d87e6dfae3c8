"""Hypothesis strategies of Routing Transformer problems, for every preset and option.

Sizes shrink toward one batch element, one head, one cluster, few tokens, a
head dim of 3 and the canonical preset with no overrides. Drawn: ``N`` up to
24 (cluster sizes anywhere in [1, N], so clusters overlap, or leave tokens
unrouted), up to four centroids of any direction and length (explicit
``centroids``, standard normal), shared-QK or not, causal or not, key
padding, memory key/values, the value scales of
:data:`refattn.strategies.VALUE_SCALES`, and overrides of the preset's
parameters (normalisation, prescale, what attention reads, causal rule, slot
order, mask values and mode, self mask, query padding, scatter eps).

Head dims are 3, 8 and 17, not 1: a one-dimensional routing vector is 0 after
a layer norm and ±1 after L2, so every token ties with every other.

A numeric mask value must be a finite number of the precision under test,
with room for a score added to it (``mask_mode="add"``): where the preset's
(google-research -1e9, lucidrains ``-finfo(float32).max``) is not, a problem
takes :data:`SMALL_MASK_VALUE` instead (:func:`held_mask_value`), as the
conformance case ``google_add_empty_rows`` does for float16.

Every discrete decision (each token's nearest centroid, each centroid's
top-``cluster_size`` members and, with ``order="similarity"``, their order)
has a margin (:func:`token_margins`) of at least
:func:`refattn.strategies.tie_margin` of the precision under test: the tokens
of a decision within it are redrawn, and a draw still short of it after
:data:`MAX_REDRAWS` rounds is rejected.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import reject
from hypothesis import strategies as st

from ..core.precision import STORAGE_DTYPES
from ..strategies import VALUE_SCALES, MechanismProblem, generators, tie_margin
from .presets import preset_value
from .reference import cluster_similarity, normalize

#: Presets in shrinking order: canonical first.
PRESET_NAMES = (None, "google_research", "lucidrains")
#: Head dims of q and k (module docstring: why not 1), and of v.
HEAD_DIMS, VALUE_DIMS = (3, 8, 17), (1, 3, 8)
MAX_LEN = 24
MAX_CLUSTERS = 4
#: The mask value that replaces a preset's where the precision under test cannot hold it (see :func:`held_mask_value`).
SMALL_MASK_VALUE = -1e4
#: Rounds of redrawing the tokens of a decision short of its margin before the draw is rejected.
MAX_REDRAWS = 50
#: Preset parameters a problem may override, each with its values (the simplest first).
OVERRIDES = {
    "routing_norm": ("layer", "l2"),
    "query_prescale": (None, 1.0, 0.5),
    "attend_on": ("normalized", "raw"),
    "normalize_shared_keys": (False, True),
    "scale": (None, 1.0),
    "causal_by": ("position", "slot"),
    "order": ("position", "similarity"),
    "mask_value": (None, -1e4, -1e9),
    "mask_mode": ("replace", "add"),
    "self_mask": (True, False),
    "self_mask_value": (None, -5e4),
    "query_padding": ("mask_row", "mask_window", "none"),
    "scatter_eps": (0.0, 1e-5, 1e-2),
}


# --- decision margins ------------------------------------------------------------


def token_margins(similarity: np.ndarray, rounding_scale: np.ndarray, cluster_size: int, order: str) -> np.ndarray:
    """The smallest margin of the decisions each token takes part in, (B, H, N), relative to rounding.

    A decision compares two similarities ``S[n, c]`` (B, H, N, K); rounding
    moves each by a few unit roundoffs of ``rounding_scale`` (``Σ_d |r_d| |μ_cd|``,
    :func:`rounding_scales`), so a gap is divided by the larger scale of its two
    entries. The decisions: a token's best against its second-best centroid
    (none with one centroid); a centroid's last member against the first token
    it leaves out (none when ``cluster_size = N``); with ``order="similarity"``,
    consecutive members. ``inf`` for a token in no decision.
    """
    rounding_scale = np.maximum(rounding_scale, np.finfo(np.float64).tiny)  # a zero routing vector ties: margin 0
    margins = np.full(similarity.shape[:3], np.inf)
    if similarity.shape[-1] > 1:
        best_two = np.argsort(-similarity, axis=-1, kind="stable")[..., :2]  # (B, H, N, 2)
        top = np.take_along_axis(similarity, best_two, axis=-1)
        scale = np.take_along_axis(rounding_scale, best_two, axis=-1).max(axis=-1)
        margins = (top[..., 0] - top[..., 1]) / scale
    by_cluster = np.moveaxis(similarity, -1, -2)  # (B, H, K, N)
    ranked = np.argsort(-by_cluster, axis=-1, kind="stable")  # (B, H, K, N), best first
    ranked_similarity = np.take_along_axis(by_cluster, ranked, axis=-1)
    ranked_scale = np.take_along_axis(np.moveaxis(rounding_scale, -1, -2), ranked, axis=-1)
    gap_scale = np.maximum(ranked_scale[..., :-1], ranked_scale[..., 1:])
    gaps = (ranked_similarity[..., :-1] - ranked_similarity[..., 1:]) / gap_scale  # (B, H, K, N - 1)
    decided = np.zeros(gaps.shape[-1], dtype=bool)  # between ranks i and i + 1
    if cluster_size < similarity.shape[2]:
        decided[cluster_size - 1] = True
    if order == "similarity":
        decided[: cluster_size - 1] = True
    gaps = np.where(decided, gaps, np.inf)
    edge = np.full(gaps.shape[:-1] + (1,), np.inf)
    by_rank = np.minimum(np.concatenate([edge, gaps], axis=-1), np.concatenate([gaps, edge], axis=-1))  # (B, H, K, N)
    by_token = np.empty_like(by_rank)
    np.put_along_axis(by_token, ranked, by_rank, axis=-1)
    return np.minimum(margins, by_token.min(axis=-2))


def rounding_scales(r: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``Σ_d |r_d| |μ_cd|`` (B, H, N, K): what rounding r and μ moves a similarity by, in unit roundoffs."""
    return np.einsum("bhnd,hcd->bhnc", np.abs(r), np.abs(centroids))


def routed_margins(x: np.ndarray, centroids: np.ndarray, params: dict, prescale: float,
                   cluster_size: int | None) -> np.ndarray:  # fmt: skip
    """:func:`token_margins` (B, H, N) of the vectors ``x`` (B, H, N, D) routed as the call with keyword
    arguments ``params`` routes them (its normalisation; ``prescale`` times x first). ``cluster_size=None``:
    nearest centroids only (a centroid update)."""
    head_dim = x.shape[-1]
    r, _ = normalize(prescale * x, norm=preset_value(params, "routing_norm", head_dim),
                     eps=preset_value(params, "norm_eps", head_dim))  # fmt: skip
    similarity = cluster_similarity(r, centroids)
    if cluster_size is None:
        cluster_size, order = x.shape[2], "position"
    else:
        order = preset_value(params, "order", head_dim)
    return token_margins(similarity, rounding_scales(r, centroids), cluster_size, order)


def redraw_ties(rng: np.random.Generator, arrays: dict, centroids: np.ndarray, params: dict, *, std: float,
                min_margin: float, cluster_size: int | None, heads=slice(None)) -> dict:  # fmt: skip
    """``arrays`` with the tokens of every decision short of ``min_margin`` redrawn (q, and k unless shared-QK:
    each routed by its own lists), over ``heads`` of them (the routing heads of a hybrid layer); rejects the draw
    (``hypothesis.reject``) when :data:`MAX_REDRAWS` rounds leave one short."""
    head_dim = arrays["q"].shape[-1]
    query_prescale = preset_value(params, "query_prescale", head_dim)
    routed = {"q": query_prescale} if params.get("shared_qk") else {"q": query_prescale, "k": 1.0}
    arrays = dict(arrays)
    for name, prescale in routed.items():
        x = arrays[name].copy()
        view = x[:, heads]  # (B, H', N, D), a view: redrawn in place
        for _ in range(MAX_REDRAWS):
            low = routed_margins(view, centroids, params, prescale, cluster_size) < min_margin  # (B, H', N)
            if not low.any():
                break
            view[low] = std * rng.standard_normal((int(low.sum()), head_dim))
        else:
            reject()
        arrays[name] = x
    return arrays


def held_mask_value(params: dict, head_dim: int, precision: str) -> dict:
    """``params`` with ``mask_value`` set to :data:`SMALL_MASK_VALUE` where the resolved one exceeds a quarter
    of the largest finite number of ``precision`` (a masked logit, score added or a log-sum-exp, would overflow)."""
    value = preset_value(params, "mask_value", head_dim)
    if value is not None and abs(value) > float(ml_dtypes.finfo(STORAGE_DTYPES[precision]).max) / 4:
        return dict(params, mask_value=SMALL_MASK_VALUE)
    return params


# --- the strategy --------------------------------------------------------------------


@st.composite
def overrides(draw, names=tuple(OVERRIDES)) -> dict:
    """Some of the preset parameters ``names``, each with a value of :data:`OVERRIDES` (none when shrunk)."""
    return {name: draw(st.sampled_from(OVERRIDES[name])) for name in names if draw(st.booleans())}


@st.composite
def routed_problem(draw, heads: int, *, max_len: int = MAX_LEN,
                   override_names=tuple(OVERRIDES)) -> tuple[dict, dict, np.random.Generator, float]:  # fmt: skip
    """Arrays and parameters shared by the routing mechanisms, before margins: ``(arrays, params, rng, std)``.

    ``arrays``: q, k (B, H, N, D), v (B, H, N, Dv), centroids (H, K, D) and
    sometimes a ``key_padding_mask`` (B, N) whose first token is real.
    ``params``: preset, shared_qk and overrides of some of ``override_names``.
    """
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, max_len))
    head_dim, value_dim = draw(st.sampled_from(HEAD_DIMS)), draw(st.sampled_from(VALUE_DIMS))
    clusters = draw(st.integers(1, MAX_CLUSTERS))
    std = draw(st.sampled_from(VALUE_SCALES))
    params = {"preset": draw(st.sampled_from(PRESET_NAMES)), "shared_qk": draw(st.booleans()),
              **draw(overrides(override_names))}
    rng = draw(generators())
    arrays = {
        "q": std * rng.standard_normal((batch, heads, length, head_dim)),
        "k": std * rng.standard_normal((batch, heads, length, head_dim)),
        "v": rng.standard_normal((batch, heads, length, value_dim)),
        "centroids": rng.standard_normal((heads, clusters, head_dim)),
    }
    if draw(st.booleans()):
        real = rng.random((batch, length)) >= 0.25
        real[:, 0] = True
        arrays["key_padding_mask"] = real
    return arrays, params, rng, std


def memory(rng: np.random.Generator, heads: int, clusters: int, slots: int, head_dim: int, value_dim: int) -> dict:
    """Memory key/values ``mem_k`` (H, K, M, D) and ``mem_v`` (H, K, M, Dv), standard normal."""
    return {"mem_k": rng.standard_normal((heads, clusters, slots, head_dim)),
            "mem_v": rng.standard_normal((heads, clusters, slots, value_dim))}  # fmt: skip


@st.composite
def _problems(draw, precision: str) -> MechanismProblem:
    arrays, params, rng, std = draw(routed_problem(draw(st.integers(1, 2))))
    heads, clusters, head_dim = arrays["centroids"].shape
    params["cluster_size"] = draw(st.integers(1, arrays["q"].shape[2]))
    params["causal"] = draw(st.booleans())
    params = held_mask_value(params, head_dim, precision)
    slots = draw(st.integers(0, 2))
    if slots:
        arrays.update(memory(rng, heads, clusters, slots, head_dim, arrays["v"].shape[-1]))
    arrays = redraw_ties(rng, arrays, arrays["centroids"], params, std=std, min_margin=tie_margin(precision),
                         cluster_size=params["cluster_size"])  # fmt: skip
    return MechanismProblem("routing", {**arrays, **params})


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Routing problems whose nearest-centroid and cluster-membership decisions are far from ties at ``precision``."""
    return _problems(precision)
