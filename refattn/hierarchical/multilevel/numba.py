"""Multi-level attention on CPU: attention inside units in Numba, O(N) memory.

The same function as :mod:`refattn.hierarchical.multilevel.reference`, with
its step numbers (spec/hierarchical.md). Units are contiguous (their ids are
sorted), so a level is a list of (start, stop) ranges. Step (2), attention
inside each unit, runs in parallel over (batch, unit) work items: a query's
scores are formed against its unit's keys only, two passes (maximum, then
exponentials), so nothing larger than one unit's row exists and no mask is
built; time is ``Σ_u |u|² (D + C)`` per level, O(N · largest unit). Its VJP
recomputes the weights from the forward's log-sum-exp (FlashAttention's
backward), each work item writing only its own unit's rows, so there are no
races. Projections (1) are BLAS products; G (3) is a segment reduction
(``numpy.ufunc.reduceat`` for the linear ones and the softmax of attention
pooling, a kernel for max pooling's argmax and margin).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ...core.results import Cotangents, Grads, Result
from ...core.tiles import compute_dtype
from .inputs import MultilevelInputs


def _ranges(units: np.ndarray) -> np.ndarray:
    """(U + 1,) the first element of each unit, and M at the end."""
    return np.concatenate([np.flatnonzero(np.diff(units, prepend=-1)), [units.shape[0]]]).astype(np.int64)


def _cast(x: MultilevelInputs, name: str, dtype):
    value = getattr(x, name)
    return None if value is None else np.ascontiguousarray(value, dtype=dtype)


def forward(x: MultilevelInputs) -> Result:
    f = _forward_steps(x)
    return Result(out=f["out"], lse=None, aux=f["aux"])


def _forward_steps(x: MultilevelInputs) -> dict:
    dtype = compute_dtype(x.x)
    p = {name: _cast(x, name, dtype) for name in ("wq", "wk", "wv", "pool_w", "pool_b", "context", "pool_weights")}
    h = np.ascontiguousarray(x.x, dtype=dtype)
    levels, aux = [], {}
    for level in range(x.levels):
        starts = _ranges(x.units(level))
        # (1) Projections; (2) attention inside each unit.
        q, k, v = (np.ascontiguousarray(h @ p[w][level]) for w in ("wq", "wk", "wv"))
        o = np.zeros(v.shape, dtype)
        lse = np.zeros(v.shape[:2], dtype)
        _unit_attention(q, k, v, starts, dtype.type(x.scale), o, lse)
        # (3) G.
        pooled, state = _aggregate(x, p, level, starts, o)
        if x.aggregate == "max":
            aux[f"argmax_{level}"], aux[f"margin_{level}"] = state["argmax"], state["margin"]
        levels.append(dict(h=h, q=q, k=k, v=v, o=o, lse=lse, starts=starts, state=state))
        h = pooled
    if x.output == "per_unit":
        out = h
    else:  # (4) tokens read their ancestors' outputs
        used = levels if x.token_rule == "sum" else levels[:1]
        out = sum(lv["o"][:, np.arange(x.x.shape[1]) if i == 0 else x.segments[i - 1]] for i, lv in enumerate(used))
    return dict(levels=levels, out=np.asarray(out, dtype), aux=aux, params=p)


def _segment_softmax(energy: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Softmax of ``energy`` (B, M) within each unit."""
    sizes = np.diff(starts)
    top = np.repeat(np.maximum.reduceat(energy, starts[:-1], axis=1), sizes, axis=1)
    e = np.exp(energy - top)
    return e / np.repeat(np.add.reduceat(e, starts[:-1], axis=1), sizes, axis=1)


def _aggregate(x: MultilevelInputs, p: dict, level: int, starts: np.ndarray, o: np.ndarray):
    """(3) G over each unit of ``o`` (B, M, C) -> (B, U, C)."""
    sizes, first = np.diff(starts), starts[:-1]
    if x.aggregate == "attention_pool":
        hidden = np.tanh(o @ p["pool_w"][level] + p["pool_b"][level])  # (B, M, A)
        alpha = _segment_softmax(hidden @ p["context"][level], starts)  # (B, M)
        return np.add.reduceat(alpha[..., None] * o, first, axis=1), dict(hidden=hidden, alpha=alpha)
    if x.aggregate == "max":
        top = np.zeros((o.shape[0], sizes.shape[0], o.shape[2]), o.dtype)
        argmax = np.zeros(top.shape, np.int64)
        margin = np.zeros(top.shape, np.float64)
        _unit_max(o, starts, top, argmax, margin)
        return top, dict(argmax=argmax, margin=margin)
    if x.aggregate == "mean":
        weight = np.repeat(1.0 / sizes, sizes).astype(o.dtype)
    elif x.aggregate == "first":
        weight = np.zeros(o.shape[1], o.dtype)
        weight[first] = 1.0
    else:
        weight = p["pool_weights"][level, : o.shape[1]]
    return np.add.reduceat(weight[None, :, None] * o, first, axis=1), dict(weight=weight)


@njit(parallel=True, cache=True)
def _unit_attention(q, k, v, starts, scale, o, lse):
    """(2) o_i = Σ_{j in i's unit} softmax(scale q_i·k_j) v_j, and lse_i; work items (batch, unit)."""
    batch, units = q.shape[0], starts.shape[0] - 1
    for item in prange(batch * units):
        b, u = item // units, item % units
        start, stop = starts[u], starts[u + 1]
        for i in range(start, stop):
            s = scale * np.dot(k[b, start:stop], q[b, i])
            top = s.max()
            e = np.exp(s - top)
            total = e.sum()
            o[b, i] = np.dot(e, v[b, start:stop]) / total
            lse[b, i] = top + np.log(total)


@njit(parallel=True, cache=True)
def _unit_attention_vjp(q, k, v, o, lse, do, starts, scale, dq, dk, dv):
    """(2') FlashAttention's backward inside each unit: P from lse, dS = P (dP - delta)."""
    batch, units = q.shape[0], starts.shape[0] - 1
    for item in prange(batch * units):
        b, u = item // units, item % units
        start, stop = starts[u], starts[u + 1]
        for i in range(start, stop):
            weights = np.exp(scale * np.dot(k[b, start:stop], q[b, i]) - lse[b, i])
            delta = np.dot(do[b, i], o[b, i])
            d_scores = weights * (np.dot(v[b, start:stop], do[b, i]) - delta)
            for j in range(start, stop):
                dv[b, j] += weights[j - start] * do[b, i]
                dk[b, j] += scale * d_scores[j - start] * q[b, i]
            dq[b, i] = scale * np.dot(d_scores, k[b, start:stop])


@njit(parallel=True, cache=True)
def _unit_max(o, starts, top, argmax, margin):
    """(3) Feature-wise maximum of each unit, its first argmax and the margin to the runner-up."""
    batch, units, features = o.shape[0], starts.shape[0] - 1, o.shape[2]
    for item in prange(batch * units):
        b, u = item // units, item % units
        for c in range(features):
            best, second, where = -np.inf, -np.inf, starts[u]
            for i in range(starts[u], starts[u + 1]):
                value = o[b, i, c]
                if value > best:
                    best, second, where = value, best, i
                elif value > second:
                    second = value
            top[b, u, c] = best
            argmax[b, u, c] = where
            margin[b, u, c] = best - second if second > -np.inf else 0.0


def vjp(x: MultilevelInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    f = _forward_steps(x)
    p, dtype = f["params"], f["out"].dtype
    grads = {name: np.zeros(getattr(x, name).shape, dtype) for name in ("wq", "wk", "wv", "pool_w", "pool_b",
                                                                        "context", "pool_weights") if getattr(x, name) is not None}  # fmt: skip
    dout = np.asarray(cotangents.dout, dtype)
    d_pooled = dout if x.output == "per_unit" else None
    for level in range(x.levels - 1, -1, -1):
        lv = f["levels"][level]
        d_o = np.zeros(lv["o"].shape, dtype) if d_pooled is None else _aggregate_vjp(x, p, level, lv, d_pooled, grads)
        if x.output == "per_token" and (level == 0 or x.token_rule == "sum"):  # (4')
            np.add.at(d_o, (slice(None), np.arange(x.x.shape[1]) if level == 0 else x.segments[level - 1]), dout)
        dq, dk, dv = (np.zeros(lv[name].shape, dtype) for name in ("q", "k", "v"))
        _unit_attention_vjp(lv["q"], lv["k"], lv["v"], lv["o"], lv["lse"], np.ascontiguousarray(d_o), lv["starts"],
                            dtype.type(x.scale), dq, dk, dv)  # fmt: skip
        h = lv["h"]  # (1')
        grads["wq"][level] = np.einsum("bic,bid->cd", h, dq)
        grads["wk"][level] = np.einsum("bic,bid->cd", h, dk)
        grads["wv"][level] = np.einsum("bic,bie->ce", h, dv)
        d_pooled = dq @ p["wq"][level].T + dk @ p["wk"][level].T + dv @ p["wv"][level].T
    return Grads(x=d_pooled, **grads)


def _aggregate_vjp(x: MultilevelInputs, p: dict, level: int, lv: dict, d_g: np.ndarray, grads: dict) -> np.ndarray:
    """(3') The cotangent of the level's outputs (B, M, C) from that of its pooled vectors (B, U, C)."""
    o, state, starts = lv["o"], lv["state"], lv["starts"]
    sizes = np.diff(starts)
    d_g_rows = np.repeat(d_g, sizes, axis=1)  # (B, M, C): each element's unit cotangent
    if x.aggregate == "attention_pool":
        alpha, hidden = state["alpha"], state["hidden"]
        d_alpha = np.sum(d_g_rows * o, axis=-1)  # (B, M)
        mean_d_alpha = np.repeat(np.add.reduceat(alpha * d_alpha, starts[:-1], axis=1), sizes, axis=1)
        d_energy = alpha * (d_alpha - mean_d_alpha)
        grads["context"][level] = np.einsum("bi,bia->a", d_energy, hidden)
        d_pre = d_energy[..., None] * p["context"][level] * (1.0 - hidden**2)
        grads["pool_w"][level] = np.einsum("bic,bia->ca", o, d_pre)
        grads["pool_b"][level] = d_pre.sum(axis=(0, 1))
        return alpha[..., None] * d_g_rows + d_pre @ p["pool_w"][level].T
    if x.aggregate == "max":
        d_o = np.zeros(o.shape, o.dtype)
        b, _, c = np.indices(d_g.shape)
        np.add.at(d_o, (b, state["argmax"], c), d_g)
        return d_o
    if x.aggregate == "weights":
        grads["pool_weights"][level, : o.shape[1]] = np.einsum("bic,bic->i", d_g_rows, o)
    return state["weight"][None, :, None] * d_g_rows
