"""Checked inputs of one multi-level attention call."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks
from ...core.errors import SpecError

#: The aggregations G of a unit's outputs into one vector.
AGGREGATES = ("attention_pool", "mean", "max", "first", "weights")
#: What the output is: one vector per token, or one per top-level unit.
OUTPUTS = ("per_token", "per_unit")
#: How a token's output is formed (per_token): its own level-0 output, or that plus every ancestor unit's output.
TOKEN_RULES = ("own", "sum")


@dataclass(frozen=True)
class MultilevelInputs:
    """Checked x (B, N, C), segments (L, N) and per-level parameters, each (L, ...)."""

    x: np.ndarray
    segments: np.ndarray  # (L, N) int64: segments[l, i] = the level-l unit holding token i
    wq: np.ndarray  # (L, C, D)
    wk: np.ndarray  # (L, C, D)
    wv: np.ndarray  # (L, C, C)
    aggregate: str
    pool_w: np.ndarray | None  # (L, C, A)
    pool_b: np.ndarray | None  # (L, A)
    context: np.ndarray | None  # (L, A)
    pool_weights: np.ndarray | None  # (L, N): entry [l, e] weighs element e of level l
    output: str
    token_rule: str
    scale: float

    @property
    def levels(self) -> int:
        return self.segments.shape[0]

    def units(self, level: int) -> np.ndarray:
        """(M_l,) the unit of each element of ``level`` (its elements are the units of level - 1; tokens at 0)."""
        if level == 0:
            return self.segments[0]
        first_token = np.flatnonzero(np.diff(self.segments[level - 1], prepend=-1))  # first token of each element
        return self.segments[level][first_token]

    def unit_count(self, level: int) -> int:
        return int(self.segments[level, -1]) + 1

    def cotangent_shapes(self) -> dict:
        b, n, c = self.x.shape
        rows = n if self.output == "per_token" else self.unit_count(self.levels - 1)
        return {"dout": (b, rows, c), "dlse": None}


def check_multilevel_inputs(x, *, segments, wq, wk, wv, aggregate, pool_w, pool_b, context, pool_weights, output,
                            token_rule, scale) -> MultilevelInputs:  # fmt: skip
    """Check every argument of ``multilevel_attention``; raise :class:`SpecError` on the first bad one."""
    if isinstance(x, np.ndarray) and x.ndim != 3:
        raise SpecError("x", "3 dimensions (B, N, C)", f"shape {x.shape}")
    x = checks.float_array(x, "x")
    if min(x.shape) == 0:
        raise SpecError("x", "non-empty dimensions", f"shape {x.shape}")
    b, n, c = x.shape
    segments = _segments(segments, n)
    levels = segments.shape[0]
    wq = _weights(wq, "wq", (levels, c, None))
    wk = _weights(wk, "wk", (levels, c, wq.shape[2]))
    wv = _weights(wv, "wv", (levels, c, c))
    aggregate = checks.choice(aggregate, "aggregate", AGGREGATES)
    pool = {"pool_w": pool_w, "pool_b": pool_b, "context": context, "pool_weights": pool_weights}
    needed = {"attention_pool": ("pool_w", "pool_b", "context"), "weights": ("pool_weights",)}.get(aggregate, ())
    for name, value in pool.items():
        if (value is None) == (name in needed):
            want = f"an array (aggregate={aggregate!r} uses it)" if name in needed else f"None (aggregate={aggregate!r})"
            raise SpecError(name, want, checks.summary(value))
    if aggregate == "attention_pool":
        pool_w = _weights(pool_w, "pool_w", (levels, c, None))
        pool_b = _weights(pool_b, "pool_b", (levels, pool_w.shape[2]))
        context = _weights(context, "context", (levels, pool_w.shape[2]))
    if aggregate == "weights":
        pool_weights = _weights(pool_weights, "pool_weights", (levels, n))
    output = checks.choice(output, "output", OUTPUTS)
    token_rule = checks.choice(token_rule, "token_rule", TOKEN_RULES)
    scale = checks.scale(scale, wq.shape[2])
    return MultilevelInputs(x, segments, wq, wk, wv, aggregate, pool_w, pool_b, context, pool_weights, output,
                            token_rule, scale)  # fmt: skip


def _weights(w, name: str, shape: tuple) -> np.ndarray:
    """A float array of ``shape`` (None = any positive size)."""
    if isinstance(w, np.ndarray) and (w.ndim != len(shape) or any(s is not None and s != g for s, g in zip(shape, w.shape))):
        want = "(" + ", ".join("any" if s is None else str(s) for s in shape) + ")"
        raise SpecError(name, f"shape {want}", f"shape {w.shape}")
    w = checks.float_array(w, name)
    if min(w.shape) == 0:
        raise SpecError(name, "non-empty dimensions", f"shape {w.shape}")
    return w


def _segments(segments, n: int) -> np.ndarray:
    """(L, N) unit ids: per level sorted, starting at 0, no empty unit, each unit inside one unit of the next level."""
    if not isinstance(segments, np.ndarray) or segments.dtype.kind not in "iu":
        raise SpecError("segments", "an integer numpy array (L, N) of unit ids", checks.summary(segments))
    if segments.ndim != 2 or segments.shape[1] != n or segments.shape[0] == 0:
        raise SpecError("segments", f"shape (L, {n}): one unit id per level and token", f"shape {segments.shape}")
    segments = segments.astype(np.int64)
    for level, ids in enumerate(segments):
        steps = np.diff(ids)
        if ids[0] != 0 or np.any(steps < 0) or np.any(steps > 1):
            raise SpecError("segments", f"level {level}: ids sorted, from 0, in steps of 0 or 1 "
                            "(units that neither overlap nor leave tokens out)", f"ids {ids.tolist()}")  # fmt: skip
        if level > 0 and np.any((steps > 0) & (np.diff(segments[level - 1]) == 0)):
            raise SpecError("segments", f"level {level}: each level-{level - 1} unit inside one level-{level} unit",
                            "a unit split between two")  # fmt: skip
    return segments
