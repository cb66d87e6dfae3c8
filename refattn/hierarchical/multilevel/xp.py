"""Multi-level attention over an array namespace ``xp`` (NumPy or CuPy): the GPU path (spec/hierarchical.md).

A level's units are contiguous runs of its elements, so each level is laid
out as (B, U, Lmax, ·): unit ``u``'s elements in row ``u``, padded to the
longest unit with a copy of its last element that ``valid`` (U, Lmax) marks
as absent. Attention inside the units (step (2)) is then dense attention's
tiled algorithm with the units as heads and the absent keys masked, so memory
is O(U · Lmax) = O(N) for units of similar lengths, never (N, N); G (step (3))
is a masked reduction over the Lmax axis, and a unit's outputs return to the
elements by ``[:, valid]`` (each element sits in exactly one valid slot).
Inputs compute in float32 when they are float32 or narrower, in float64
otherwise.

Einsum letters (in comments): b batch, u unit, t slot in its unit, i element
of a level, c feature, d projected query/key dim, a pooling dim.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype, scatter_add
from ...dense import xp as dense_xp
from .inputs import MultilevelInputs
from .reference import ancestors

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # rows and columns of a tile of step (2)


class _Units:
    """One level's units as padded rows: ``index`` (U, Lmax) into its elements, ``valid`` (U, Lmax) bool."""

    def __init__(self, units: np.ndarray, xp):
        starts = np.flatnonzero(np.diff(units, prepend=-1))  # (U,) first element of each unit
        lengths = np.diff(np.append(starts, units.shape[0]))  # (U,)
        slot = np.arange(lengths.max())[None, :]  # (1, Lmax)
        self.valid_host = slot < lengths[:, None]  # (U, Lmax)
        self.starts = xp.asarray(starts)
        self.index = xp.asarray(np.minimum(starts[:, None] + slot, units.shape[0] - 1))  # (U, Lmax)
        self.valid = xp.asarray(self.valid_host)
        self.slot = xp.asarray(slot)
        self.valid_slots = tuple(xp.asarray(axis) for axis in np.nonzero(self.valid_host))  # unit, slot of each element

    def rows(self, a):
        """(B, M, ...) per element -> (B, U, Lmax, ...) per unit and slot."""
        return a[:, self.index]

    def elements(self, a):
        """The inverse of :meth:`rows`: (B, U, Lmax, ...) -> (B, M, ...), each element from its valid slot."""
        return a[(slice(None),) + self.valid_slots]

    def attention(self, q, k, v, scale: float):
        """Step (2)'s dense inputs: the units as heads (B, U, Lmax, ·), absent keys masked."""
        return dense_xp.inputs_over(q, k, v, scale, self.valid_host[None, :, None, :])


def forward(x: MultilevelInputs, xp) -> Result:
    """Steps (1)-(4), level by level."""
    f = _forward_steps(x, xp)
    return Result(out=f["out"], lse=None, aux=f["aux"])


def _forward_steps(x: MultilevelInputs, xp) -> dict:
    dtype = compute_dtype(x.x.dtype)
    w = {name: None if getattr(x, name) is None else xp.asarray(getattr(x, name), dtype=dtype)
         for name in ("wq", "wk", "wv", "pool_w", "pool_b", "context", "pool_weights")}  # fmt: skip
    h = xp.asarray(x.x, dtype=dtype)  # (B, N, C): level 0's elements are tokens
    levels, aux = [], {}
    for level in range(x.levels):
        units = _Units(x.units(level), xp)
        # (1) This level's queries, keys and values.
        q, k, v = h @ w["wq"][level], h @ w["wk"][level], h @ w["wv"][level]  # (B, M, D), (B, M, D), (B, M, C)
        # (2) Attention inside each unit: dense attention over the padded rows.
        attention = units.attention(units.rows(q), units.rows(k), units.rows(v), x.scale)
        out, _ = dense_xp.attend(attention, xp, (BLOCK_Q, BLOCK_K))  # (B, U, Lmax, C)
        o = units.elements(out)  # (B, M, C)
        # (3) G: one vector per unit.
        pooled, state = _aggregate(x, level, units, o, w, xp)  # (B, U, C)
        if x.aggregate == "max":
            aux[f"argmax_{level}"], aux[f"margin_{level}"] = state["argmax"], state["margin"]
        levels.append(dict(h=h, attention=attention, units=units, o=o, state=state))
        h = pooled
    # (4) The output: per top unit, or per token with what flows down from the levels above.
    used = [lv["o"] for lv in levels][: None if x.token_rule == "sum" else 1]
    out = h if x.output == "per_unit" else sum(o[:, xp.asarray(ancestors(x, level))] for level, o in enumerate(used))
    return dict(levels=levels, out=out, aux=aux, weights=w)


def _aggregate(x: MultilevelInputs, level: int, units: _Units, o, w: dict, xp):
    """(3) G over each unit of ``o`` (B, M, C): (B, U, C) and what its VJP needs."""
    rows = units.rows(o)  # (B, U, Lmax, C)
    if x.aggregate == "attention_pool":
        # (3a) u_i = tanh(o_i W + b); e_i = u_i · context; α = softmax of e within the unit; g = Σ α o.
        hidden = xp.tanh(o @ w["pool_w"][level] + w["pool_b"][level])  # (B, M, A)
        energy = xp.where(units.valid, units.rows(hidden @ w["context"][level]), -np.inf)  # (B, U, Lmax)
        alpha = xp.exp(energy - energy.max(axis=-1, keepdims=True))  # every unit has an element
        alpha = alpha / alpha.sum(axis=-1, keepdims=True)
        return (alpha[..., None] * rows).sum(axis=2), dict(hidden=hidden, alpha=alpha, rows=rows)
    if x.aggregate == "max":
        # (3b) Feature-wise maximum; the first slot attaining it is the argmax; margin to the runner-up.
        masked = xp.where(units.valid[..., None], rows, -np.inf)  # (B, U, Lmax, C)
        slot = xp.argmax(masked, axis=2)  # (B, U, C)
        top = masked.max(axis=2)
        at_top = units.slot[..., None] == slot[:, :, None]  # (B, U, Lmax, C)
        runner_up = xp.where(at_top, -np.inf, masked).max(axis=2)
        margin = xp.where(xp.isfinite(runner_up), top - runner_up, 0.0)  # no decision in a unit of one element
        argmax = (units.starts[None, :, None] + slot).astype(np.int64)  # the element, as the reference numbers it
        return top, dict(argmax=argmax, margin=margin, at_top=at_top)
    # (3c) Linear aggregations g = Σ_t R_ut o_ut (mean, first, given weights).
    matrix = _pooling_rows(x, level, units, w, xp)  # (U, Lmax)
    return (matrix[..., None] * rows).sum(axis=2), dict(matrix=matrix, rows=rows)


def _pooling_rows(x: MultilevelInputs, level: int, units: _Units, w: dict, xp):
    """(3c) The weights R of the linear aggregations per unit and slot, (U, Lmax); 0 on absent slots."""
    valid = units.valid.astype(w["wq"].dtype)
    if x.aggregate == "mean":
        return valid / valid.sum(axis=1, keepdims=True)
    if x.aggregate == "first":
        return valid * (units.slot == 0)
    return valid * w["pool_weights"][level][units.index]


def vjp(x: MultilevelInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (4')-(1'), from the top level down; the forward is recomputed."""
    f = _forward_steps(x, xp)
    w, dtype = f["weights"], compute_dtype(x.x.dtype)
    grads = {name: xp.zeros(value.shape, dtype=dtype) for name, value in w.items() if value is not None}
    dout = xp.asarray(cotangents.dout, dtype=dtype)
    d_pooled = dout if x.output == "per_unit" else None  # (B, U_top, C)
    for level in range(x.levels - 1, -1, -1):
        lv = f["levels"][level]
        # (3') G's adjoint, then (4'): a token's output reads its ancestors' outputs, so their cotangents sum.
        if d_pooled is None:  # per_token: nothing above the top level
            d_o = xp.zeros(lv["o"].shape, dtype=dtype)
        else:
            d_o = _aggregate_vjp(x, level, lv, d_pooled, w, grads, xp)
        if x.output == "per_token" and (level == 0 or x.token_rule == "sum"):
            scatter_add(xp, d_o, (slice(None), xp.asarray(ancestors(x, level))), dout)
        # (2') Attention inside the units: the padded query rows have cotangent 0.
        units = lv["units"]
        d_rows = xp.zeros((d_o.shape[0],) + units.valid.shape + d_o.shape[2:], dtype=dtype)  # (B, U, Lmax, C)
        d_rows[(slice(None),) + units.valid_slots] = d_o
        d_qkv = dense_xp.attend_vjp(lv["attention"], Cotangents(d_rows, None), xp, (BLOCK_Q, BLOCK_K))
        dq, dk, dv = (units.elements(d_qkv[name]) for name in "qkv")  # (B, M, ·): absent slots' gradient is 0
        # (1') Projections: dW = Σ_b hᵀ dq; dh = dq Wqᵀ + dk Wkᵀ + dv Wvᵀ.
        h = lv["h"]
        grads["wq"][level] = xp.einsum("bic,bid->cd", h, dq)
        grads["wk"][level] = xp.einsum("bic,bid->cd", h, dk)
        grads["wv"][level] = xp.einsum("bic,bie->ce", h, dv)
        d_pooled = dq @ w["wq"][level].T + dk @ w["wk"][level].T + dv @ w["wv"][level].T  # (B, M, C)
    grads["x"] = d_pooled
    return Grads(grads)


def _aggregate_vjp(x: MultilevelInputs, level: int, lv: dict, d_g, w: dict, grads: dict, xp):
    """(3') The cotangent of the level's outputs o (B, M, C) from that of its pooled vectors d_g (B, U, C)."""
    units, state = lv["units"], lv["state"]
    if x.aggregate == "attention_pool":
        alpha, hidden, rows = state["alpha"], state["hidden"], state["rows"]  # (B, U, Lmax), (B, M, A), (…, C)
        d_alpha = (d_g[:, :, None] * rows).sum(axis=-1)  # (B, U, Lmax)
        d_energy = units.elements(alpha * (d_alpha - (alpha * d_alpha).sum(axis=-1, keepdims=True)))  # (B, M)
        grads["context"][level] = xp.einsum("bi,bia->a", d_energy, hidden)
        d_pre = d_energy[..., None] * w["context"][level] * (1.0 - hidden**2)  # (B, M, A): through tanh
        grads["pool_w"][level] = xp.einsum("bic,bia->ca", lv["o"], d_pre)
        grads["pool_b"][level] = d_pre.sum(axis=(0, 1))
        return units.elements(alpha[..., None] * d_g[:, :, None]) + d_pre @ w["pool_w"][level].T
    if x.aggregate == "max":  # the gradient goes to the first slot attaining the maximum
        return units.elements(state["at_top"] * d_g[:, :, None])
    matrix = state["matrix"]  # (U, Lmax)
    if x.aggregate == "weights":
        d_matrix = (d_g[:, :, None] * state["rows"]).sum(axis=(0, -1))  # (U, Lmax)
        grads["pool_weights"][level, : lv["o"].shape[1]] = d_matrix[units.valid_slots]
    return units.elements(matrix[..., None] * d_g[:, :, None])
