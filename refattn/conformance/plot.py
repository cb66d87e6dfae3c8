"""``refattn plot``: the attention pattern of a case (or of a mechanism on random inputs), drawn.

What is drawn is first computed as a :class:`Picture`, so that tests can
assert on the data a figure shows:

* the **weights** of one batch element and query head, (Nq, Nk): for every
  mechanism whose output is linear in ``v`` (all but differential
  attention's normalised output), the output for ``v`` = the identity
  minus the output for ``v`` = 0, i.e. the matrix that multiplies ``v``;
* the **unattended** entries, weight exactly 0 (masked, outside a window,
  another bucket or cluster), drawn in grey;
* **bands**: LSH's bucket of each token (first hash round) or routing's
  cluster of each query and key, as coloured strips beside the axes;
* **bounds**: the causal bound and the window's edges as lines ``j = i + offset``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

from ..core import registry
from .suite import LoadedCase, json_argument

#: Colour of entries that get no weight.
UNATTENDED_GREY = (0.82, 0.82, 0.82, 1.0)


@dataclass(frozen=True)
class Picture:
    """What one figure shows.

    Attributes
    ----------
    title : str
    weights : ndarray (Nq, Nk)
        The attention pattern of one batch element and query head.
    unattended : ndarray of bool (Nq, Nk)
        Entries with weight exactly 0.
    query_bands, key_bands : ndarray of int (Nq,) and (Nk,), or None
        Group of each query and key (LSH bucket, routing cluster); -1 for none.
    band_label : str
        What the bands are ("bucket (round 0)", "cluster").
    bounds : list of (str, int)
        Lines ``key = query + offset``: the causal bound, the window's edges.
    """

    title: str
    weights: np.ndarray
    unattended: np.ndarray
    query_bands: np.ndarray | None = None
    key_bands: np.ndarray | None = None
    band_label: str = ""
    bounds: list = field(default_factory=list)


def json_parameter(value):
    """A parameter given as JSON on the command line, as the public functions take it (lists as tuples)."""
    return json_argument(value)


def case_picture(case: LoadedCase, *, batch: int = 0, head: int = 0) -> Picture:
    """The picture of one case of a suite."""
    arguments = {**case.inputs, **case.array_params, **{n: json_argument(x) for n, x in case.params.items()}}
    return _picture(case.mechanism, arguments, case.id, batch, head)


def mechanism_picture(name: str, *, n: int = 64, d: int = 16, seed: int = 0, params: dict | None = None,
                      head: int = 0) -> Picture:  # fmt: skip
    """The picture of mechanism ``name`` on standard-normal inputs of length ``n`` (batch 1, 2 heads).

    ``params`` are its keyword arguments; arrays it requires that are not
    inputs (LSH's ``rotations``, routing's ``centroids``) are drawn too,
    shaped by ``params`` (``num_buckets``, ``num_hashes``; ``num_clusters``).
    """
    params = dict(params or {})
    mechanism = registry.get(name)
    rng = np.random.default_rng(seed)
    heads = 2
    arguments = {input_name: rng.standard_normal((1, heads, n, d)) for input_name in mechanism.positional}
    if "rotations" in _required(mechanism) and "rotations" not in params:
        num_buckets, num_hashes = int(params.get("num_buckets", 8)), int(params.get("num_hashes", 1))
        params.setdefault("num_buckets", num_buckets)
        params.setdefault("num_hashes", num_hashes)
        params.setdefault("chunk_len", max(1, n // num_buckets))
        arguments["rotations"] = rng.standard_normal((heads, num_hashes, d, num_buckets // 2))
    if "centroids" in _required(mechanism) and "centroids" not in params:
        num_clusters = int(params.pop("num_clusters", 4))
        params.setdefault("cluster_size", max(1, n // num_clusters))
        arguments["centroids"] = rng.standard_normal((heads, num_clusters, d))
    described = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return _picture(name, {**arguments, **params}, f"{name} (n={n}{', ' + described if described else ''})", 0, head)


def _required(mechanism) -> set[str]:
    """The keyword arguments of a mechanism's function that have no default."""
    parameters = inspect.signature(mechanism.forward).parameters.values()
    return {p.name for p in parameters if p.default is inspect.Parameter.empty and p.kind == p.KEYWORD_ONLY}


def _picture(name: str, arguments: dict, title: str, batch: int, head: int) -> Picture:
    mechanism = registry.get(name)
    v = arguments["v"]
    batches, kv_heads, keys = v.shape[0], v.shape[1], v.shape[2]
    identity = np.broadcast_to(np.eye(keys), (batches, kv_heads, keys, keys)).copy()
    try:
        with_identity = mechanism.forward(**{**arguments, "v": identity})
        with_zero = mechanism.forward(**{**arguments, "v": np.zeros_like(identity)})
    except (ValueError, TypeError) as error:
        raise ValueError(f"cannot draw {name}: its output for v = the identity is not defined ({error})") from None
    weights = (with_identity.out - with_zero.out)[batch, head]  # (Nq, Nk)
    query_bands, key_bands, band_label = _bands(with_identity.aux, batch, head)
    return Picture(
        title=f"{title}: batch {batch}, head {head}",
        weights=weights,
        unattended=weights == 0,
        query_bands=query_bands,
        key_bands=key_bands,
        band_label=band_label,
        bounds=_bounds(arguments, *weights.shape),
    )


def _bands(aux: dict, batch: int, head: int) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """LSH buckets (the first round's, the same for queries and keys) or routing clusters, when ``aux`` has them."""
    if "buckets" in aux and aux["buckets"].ndim == 4:  # LSH (B, H, R, N)
        buckets = aux["buckets"][batch, head, 0]
        return buckets, buckets, "bucket (round 0)"
    if "assignment" in aux:  # routing (B, H, N): a token's cluster; -1 for a query in no cluster (aux.unrouted)
        queries = aux["assignment"][batch, head].copy()
        if "unrouted" in aux:
            queries[aux["unrouted"][batch, head]] = -1
        keys = aux.get("key_assignment", aux["assignment"])[batch, head]
        return queries, keys, "cluster"
    return None, None, ""


def _bounds(arguments: dict, num_queries: int, num_keys: int) -> list[tuple[str, int]]:
    """The causal bound and the window's edges, as ``(label, offset)`` of the lines ``key = query + offset``."""
    alignment = arguments.get("causal_alignment", "bottom_right")
    offset = num_keys - num_queries if alignment == "bottom_right" else 0
    bounds = []
    if arguments.get("causal") is True:
        bounds.append(("causal bound", offset))
    window = arguments.get("window")
    if isinstance(window, tuple) and len(window) == 2:
        left, right = window
        if left is not None:
            bounds.append(("window, left edge", offset - int(left)))
        if right is not None:
            bounds.append(("window, right edge", offset + int(right)))
    return bounds


def draw(picture: Picture, path=None):
    """Draw ``picture`` (and save it to ``path`` when given); return the matplotlib Figure.

    The heatmap's image holds ``picture.weights`` with the unattended entries
    masked (drawn grey); the band strips hold the bands; each bound is one line.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_queries, num_keys = picture.weights.shape
    figure = plt.figure(figsize=(7.5, 6.5))
    has_bands = picture.query_bands is not None
    grid = figure.add_gridspec(2, 3, width_ratios=[0.04 if has_bands else 0.001, 1, 0.05],
                               height_ratios=[0.04 if has_bands else 0.001, 1], wspace=0.05, hspace=0.05)  # fmt: skip
    axes = figure.add_subplot(grid[1, 1])
    colours = plt.get_cmap("viridis").with_extremes(bad=UNATTENDED_GREY)
    shown = np.ma.masked_array(picture.weights, mask=picture.unattended)
    image = axes.imshow(shown, cmap=colours, interpolation="nearest", aspect="auto",
                        extent=(-0.5, num_keys - 0.5, num_queries - 0.5, -0.5))  # fmt: skip
    image.set_label("weights")
    figure.colorbar(image, cax=figure.add_subplot(grid[1, 2]), label="weight (grey: none)")
    queries = np.arange(num_queries)
    for label, offset in picture.bounds:
        axes.plot(np.clip(queries + offset, -0.5, num_keys - 0.5), queries, "--", color="red", linewidth=1, label=label)
    if picture.bounds:
        axes.legend(loc="lower left", fontsize=7)
    axes.set_xlabel("key position")
    axes.set_ylabel("query position")
    axes.set_xlim(-0.5, num_keys - 0.5)
    axes.set_ylim(num_queries - 0.5, -0.5)
    if has_bands:
        top, left = figure.add_subplot(grid[0, 1], sharex=axes), figure.add_subplot(grid[1, 0], sharey=axes)
        bands = plt.get_cmap("tab20").with_extremes(bad="white")
        key_strip = top.imshow(np.ma.masked_less(picture.key_bands[None, :], 0), cmap=bands, aspect="auto",
                               interpolation="nearest", extent=(-0.5, num_keys - 0.5, 0.5, -0.5), vmin=0, vmax=19)  # fmt: skip
        key_strip.set_label(f"key {picture.band_label}")
        query_strip = left.imshow(np.ma.masked_less(picture.query_bands[:, None], 0), cmap=bands, aspect="auto",
                                  interpolation="nearest", extent=(-0.5, 0.5, num_queries - 0.5, -0.5), vmin=0, vmax=19)  # fmt: skip
        query_strip.set_label(f"query {picture.band_label}")
        top.set_title(f"{picture.title}\ncoloured bands: {picture.band_label}", fontsize=9)
        for strip in (top, left):
            strip.tick_params(labelbottom=False, labelleft=False, bottom=False, left=False)
        axes.yaxis.set_tick_params(labelleft=True)
    else:
        axes.set_title(picture.title, fontsize=9)
    if path is not None:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    return figure
