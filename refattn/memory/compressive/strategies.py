"""Hypothesis strategies of Compressive Transformer problems, with the margins of their discrete decisions.

Every ``f_c`` (mean and max pooling, convolutions, dilated convolutions with
each divisor of the rate, most-used selection) at rates 1 to 4, segments of
up to :data:`MAX_SEGMENT` tokens, memories of up to :data:`MAX_MEMORY_RUNS`
runs of the rate (plus an offset, when a state is given), compressed memories
of up to :data:`MAX_COMPRESSED` entries, a logit scale, and sometimes a given
state (memories shorter than their lengths, 0 entries included; usages for
most-used). The rate must divide every block the memory evicts; the blocks
are multiples of it exactly when the segment length, the last segment's and
``mem_len − m₀`` are, so the sizes are drawn that way (rate 1 leaves them
free: any stream length, any segment length). Everything shrinks toward one
head, few tokens, mean pooling at rate 1 and an empty state.

Two ``f_c`` make discrete decisions, and every draw keeps them at least
:func:`refattn.strategies.tie_margin` of the precision under test from a
tie, so an implementation in that precision makes each one as the oracle:

* max pooling picks the largest entry of each run of ``rate`` evicted entries,
  per feature (:func:`max_pool_margins`); the entries of a run short of the
  margin are redrawn;
* most-used selection keeps the evicted entries of largest accumulated
  attention (:func:`usage_margins`); q and k are redrawn.

A draw still short after :data:`MAX_REDRAWS` rounds is rejected.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import reject
from hypothesis import strategies as st

from ...core.precision import STORAGE_DTYPES
from ...strategies import MechanismProblem, tie_margin
from ..xl_recurrence.strategies import Stream, optional_scale, streams
from .reference import CONVOLUTIONS

#: ``f_c`` in shrinking order: the default first.
COMPRESSIONS = ("mean_pool", "max_pool", "conv", "dilated_conv", "most_used")
RATES = (1, 2, 3, 4)
MAX_SEGMENT = 12
#: Whole segments before the last, shorter one.
MAX_SEGMENTS = 2
MAX_MEMORY_RUNS = 3
MAX_COMPRESSED = 4
#: Rounds of redrawing before a draw short of its margins is rejected.
MAX_REDRAWS = 20


# --- decision margins ------------------------------------------------------------


def max_pool_margins(memory: np.ndarray, stream: np.ndarray, evicted: int, rate: int) -> np.ndarray:
    """How far each max-pooling decision is from a tie, relative to its rounding scale.

    The memory evicts, over a whole stream, the first ``evicted`` entries of
    ``[memory, stream]`` (the oldest first, in blocks that are multiples of
    ``rate``), so the runs pooled are that prefix's consecutive runs of
    ``rate``. A run's decision, per feature, is its largest entry; its margin
    is the gap between the largest and the second largest divided by the sum
    of their magnitudes (rounding the inputs moves the gap by a few unit
    roundoffs of that). Runs of one entry decide nothing (infinite margin).

    Parameters
    ----------
    memory, stream : ndarray (B, H, m, F), (B, H, N, F)
        The initial memory's entries and the stream's (keys, or values).
    evicted : int
        Entries evicted over the stream, a multiple of ``rate``.
    rate : int

    Returns
    -------
    ndarray (B, H, evicted / rate, F)
    """
    b, h, _, features = stream.shape
    runs = np.concatenate([memory, stream], axis=2)[:, :, :evicted].reshape(b, h, evicted // rate, rate, features)
    if rate == 1:
        return np.full((b, h, evicted, features), np.inf)
    top_two = np.sort(runs, axis=3)[:, :, :, -2:]  # (B, H, runs, 2, F)
    gap = top_two[:, :, :, 1] - top_two[:, :, :, 0]
    return gap / np.maximum(np.abs(top_two).sum(axis=3), np.finfo(float).tiny)


def usage_margins(q, k, *, segment_len: int, mem_len: int, compressed_len: int, rate: int, memory_k, compressed_k,
                  memory_usage, scale: float | None, precision: str) -> np.ndarray:  # fmt: skip
    """How far each most-used selection is from a tie, relative to its rounding scale.

    The stream is followed step by step in float64 (keys only: values decide
    nothing). At each eviction of ``e`` entries, the ``e / rate`` of largest
    usage are kept; the decision is the boundary between the last kept and the
    first left, of usages ``a >= b``. Each usage is a sum of attention weights
    ``P = exp(s − lse)``, which rounding moves, relatively, by a few unit
    roundoffs of ``S + Λ``: ``S = scale Σ_d |q_d k_d|`` the rounding scale of
    the score and ``Λ = Σ_j P_j S_j`` that of the log-sum-exp (plus one for the
    exp and the log, and the usage itself for the sums). The margin is
    ``(a − b − T tiny) / (σ_a + σ_b)``, ``σ`` those scales summed over every
    weight in the usage, ``T`` the number of weights summed and ``tiny`` the
    smallest normal number of ``precision`` (a weight below it may flush to
    0); a tie of two exact zeros (every weight underflows, in every precision)
    has an infinite margin: the older is kept everywhere.

    Parameters
    ----------
    q, k : ndarray (B, Hq, N, D), (B, Hkv, N, D)
    memory_k, compressed_k, memory_usage : ndarray (B, Hkv, m, D), (B, Hkv, p, D), (B, Hkv, m)
        The initial state (empty arrays for none).
    segment_len, mem_len, compressed_len, rate, scale
        As :func:`refattn.memory.compressive_attention` (``scale`` None: ``1 / sqrt(D)``).
    precision : str
        Sets ``tiny``.

    Returns
    -------
    ndarray (decisions,)
        One margin per selection (per eviction, batch element and kv head).
    """
    scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else scale
    tiny = float(ml_dtypes.finfo(STORAGE_DTYPES[precision]).tiny)
    memory, compressed = memory_k, compressed_k
    usage, rounding, terms = memory_usage, np.abs(memory_usage), np.zeros(memory_usage.shape)
    margins = []
    for start in range(0, q.shape[2], segment_len):
        segment = slice(start, start + segment_len)
        keys = np.concatenate([compressed, memory, k[:, :, segment]], axis=2)  # (B, Hkv, p + m + n, D)
        received, received_rounding, received_terms = _received(q[:, :, segment], keys, scale)
        held = compressed.shape[2]
        grow = lambda x, new: new[:, :, held:] + np.pad(x, ((0, 0), (0, 0), (0, new.shape[2] - held - x.shape[2])))  # noqa: E731
        usage = grow(usage, received)  # (B, Hkv, m + n)
        rounding = grow(rounding, received_rounding) + usage
        terms = grow(terms, received_terms)
        grown = keys[:, :, held:]
        evicted = grown.shape[2] - min(mem_len, grown.shape[2])
        if evicted:
            kept, margin = _selection(usage[:, :, :evicted], rounding[:, :, :evicted], terms[:, :, :evicted],
                                      evicted // rate, tiny)  # fmt: skip
            margins.append(margin.ravel())
            squeezed = np.take_along_axis(grown[:, :, :evicted], kept[..., None], axis=2)
            compressed = np.concatenate([compressed, squeezed], axis=2)
            compressed = compressed[:, :, compressed.shape[2] - min(compressed_len, compressed.shape[2]):]
        memory, usage, rounding, terms = (x[:, :, evicted:] for x in (grown, usage, rounding, terms))
    return np.concatenate(margins) if margins else np.zeros(0)


def _received(q: np.ndarray, keys: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The attention each key receives from the causal (bottom-right) queries of ``q`` (B, Hq, n, D), summed
    over them and the query heads reading it, with its rounding scale and its number of weights: (B, Hkv, K) each."""
    group = q.shape[1] // keys.shape[1]
    keys = np.repeat(keys, group, axis=1)  # (B, Hq, K, D)
    n, total = q.shape[2], keys.shape[2]
    allowed = np.arange(total)[None, :] <= np.arange(n)[:, None] + total - n  # (n, K)
    scores = np.where(allowed, scale * np.einsum("bhnd,bhkd->bhnk", q, keys), -np.inf)  # (B, Hq, n, K)
    score_rounding = abs(scale) * np.einsum("bhnd,bhkd->bhnk", np.abs(q), np.abs(keys))
    top = scores.max(axis=-1, keepdims=True)
    lse = top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))  # (B, Hq, n, 1)
    weights = np.where(allowed, np.exp(scores - lse), 0.0)
    lse_rounding = (weights * score_rounding).sum(axis=-1, keepdims=True) + 1.0
    by_kv_head = lambda x: x.sum(axis=2).reshape(x.shape[0], -1, group, total).sum(axis=2)  # noqa: E731
    return (by_kv_head(weights), by_kv_head(weights * (score_rounding + lse_rounding + 1.0)),
            by_kv_head(np.broadcast_to(allowed, weights.shape).astype(float)))  # fmt: skip


def _selection(usage, rounding, terms, count: int, tiny: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` entries of largest ``usage`` (B, H, e), ties to the older, in stream order, and the
    margin of the boundary (B, H) (:func:`usage_margins`)."""
    order = np.argsort(-usage, axis=-1, kind="stable")
    kept = np.sort(order[..., :count], axis=-1)
    if count == usage.shape[-1]:
        return kept, np.full(usage.shape[:2], np.inf)
    last_kept, first_left = order[..., count - 1 : count], order[..., count : count + 1]
    at = lambda x, i: np.take_along_axis(x, i, axis=-1)[..., 0]  # noqa: E731
    a, b = at(usage, last_kept), at(usage, first_left)
    slack = a - b - tiny * (at(terms, last_kept) + at(terms, first_left))
    spread = at(rounding, last_kept) + at(rounding, first_left)
    margin = np.where(spread > 0, slack / np.where(spread > 0, spread, 1.0), -np.inf)
    return kept, np.where((a == 0) & (b == 0), np.inf, margin)


# --- problems -----------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _spread_max_pool(memory: np.ndarray, stream: np.ndarray, evicted: int, rate: int, std: float, rng,
                     precision: str) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``memory`` and ``stream`` with the entries of every run short of its max-pooling margin redrawn
    (:func:`max_pool_margins`); rejects the draw after :data:`MAX_REDRAWS` rounds."""
    joined = np.concatenate([memory, stream], axis=2)  # (B, H, m + N, F)
    held = memory.shape[2]
    for _ in range(MAX_REDRAWS):
        short = max_pool_margins(joined[:, :, :held], joined[:, :, held:], evicted, rate) < tie_margin(precision)
        if not short.any():
            return joined[:, :, :held], joined[:, :, held:]
        b, h, run, feature = np.nonzero(short)
        for offset in range(rate):
            joined[b, h, run * rate + offset, feature] = std * rng.standard_normal(b.size)
    reject()


@st.composite
def _sizes(draw) -> dict:
    """The rate, ``f_c``, its dilation and the lengths, so that the rate divides every evicted block."""
    compression, rate = draw(st.sampled_from(COMPRESSIONS)), draw(st.sampled_from(RATES))
    segment_len = rate * draw(st.integers(1, MAX_SEGMENT // rate))
    last = rate * draw(st.integers(0, segment_len // rate - 1))
    given = draw(st.booleans())
    offset = draw(st.integers(0, rate - 1)) if given else 0  # m₀ ≡ mem_len (mod rate)
    memory_runs = draw(st.integers(0, MAX_MEMORY_RUNS))
    return dict(
        compression=compression, rate=rate, segment_len=segment_len,
        length=draw(st.integers(0, MAX_SEGMENTS)) * segment_len + last or segment_len,
        mem_len=rate * memory_runs + offset, compressed_len=draw(st.integers(0, MAX_COMPRESSED)),
        dilation=draw(st.sampled_from(_divisors(rate))) if compression == "dilated_conv" else 1,
        held=rate * draw(st.integers(0, memory_runs)) + offset if given else None,
    )  # fmt: skip


def _state(draw, stream: Stream, sizes: dict) -> dict:
    """A given initial state (both memories; usages for most-used), or none."""
    if sizes["held"] is None:
        return {}
    compressed = draw(st.integers(0, sizes["compressed_len"]))
    state = dict(memory_k=stream.keys(sizes["held"]), memory_v=stream.values(sizes["held"]),
                 compressed_k=stream.keys(compressed), compressed_v=stream.values(compressed))  # fmt: skip
    if sizes["compression"] == "most_used":
        state["memory_usage"] = stream.rng.uniform(0.1, 2.0, (stream.shape.batch, stream.shape.kv_heads, sizes["held"]))
    return state


def _weights(stream: Stream, taps: int) -> dict:
    """Convolution weights (out, in, taps) of std 1 / sqrt(F · taps): compressed entries of their inputs' scale."""
    s = stream.shape
    weight = lambda f: stream.rng.standard_normal((f, f, taps)) / np.sqrt(f * taps)  # noqa: E731
    return {"conv_weight_k": weight(s.head_dim), "conv_weight_v": weight(s.value_dim)}


def _far_from_ties(stream: Stream, arguments: dict, precision: str) -> dict:
    """``arguments`` with the decisions of max pooling or most-used selection at least ``tie_margin`` from ties."""
    s, rate = stream.shape, arguments["rate"]
    empty = lambda f: np.zeros((s.batch, s.kv_heads, 0, f))  # noqa: E731
    memory_k, memory_v = arguments.get("memory_k", empty(s.head_dim)), arguments.get("memory_v", empty(s.value_dim))
    if arguments["compression"] == "max_pool":
        evicted = max(0, memory_k.shape[2] + s.q_len - arguments["mem_len"])  # all the memory evicts, over the stream
        memory_k, k = _spread_max_pool(memory_k, stream.k, evicted, rate, stream.value_scale, stream.rng, precision)
        memory_v, v = _spread_max_pool(memory_v, stream.v, evicted, rate, 1.0, stream.rng, precision)
        state = {"memory_k": memory_k, "memory_v": memory_v} if "memory_k" in arguments else {}
        return {**arguments, "k": k, "v": v, **state}
    if arguments["compression"] == "most_used":
        options = {name: arguments[name] for name in ("segment_len", "mem_len", "compressed_len", "rate")}
        state = dict(memory_k=memory_k, compressed_k=arguments.get("compressed_k", empty(s.head_dim)),
                     memory_usage=arguments.get("memory_usage", np.zeros((s.batch, s.kv_heads, 0))))  # fmt: skip
        q, k = stream.q, stream.k
        for _ in range(MAX_REDRAWS):
            margins = usage_margins(q, k, **options, **state, scale=arguments.get("scale"), precision=precision)
            if np.min(margins, initial=np.inf) >= tie_margin(precision):
                return {**arguments, "q": q, "k": k}
            q, k = (stream.value_scale * stream.rng.standard_normal(x.shape) for x in (q, k))
        reject()
    return arguments


@st.composite
def _problems(draw, precision: str) -> MechanismProblem:
    sizes = draw(_sizes())
    stream = draw(streams(length=sizes["length"]))
    arguments = {name: sizes[name] for name in ("segment_len", "mem_len", "compressed_len", "rate", "compression")}
    if sizes["compression"] in CONVOLUTIONS:
        arguments.update(_weights(stream, sizes["rate"] // sizes["dilation"]))
    if sizes["dilation"] > 1:
        arguments["dilation"] = sizes["dilation"]
    arguments = {**stream.arguments(), **arguments, **_state(draw, stream, sizes), **optional_scale(draw)}
    return MechanismProblem("compressive", _far_from_ties(stream, arguments, precision))


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Compressive Transformer problems whose max-pooling and most-used decisions are far from ties at ``precision``."""
    return _problems(precision)
