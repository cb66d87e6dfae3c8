"""Multi-level attention with an aggregation G: the executable specification.

Hierarchical Attention Networks (Yang et al. 2016, "Hierarchical Attention
Networks for Document Classification"), generalised: tokens are grouped into
units (sentences), units into units of the next level (documents), and so on.
At each level ``l`` attention runs inside each unit with that level's own
projections; G aggregates each unit's outputs into one vector, and those
vectors are the elements the next level attends over. HAN's G is attention
pooling with a context vector, ``softmax(tanh(W h + b)ᵀ u)``; mean, max,
first element and a given weight matrix are the other choices.

Equations and the step numbers below are in spec/hierarchical.md,
"Multi-level attention".

Einsum letters: b batch, i, j elements of a level, u unit, c feature,
d projected query/key dim, a pooling dim.
"""

from __future__ import annotations

import numpy as np

from ...core import registry
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...core.softmax import masked_softmax
from ...dense import dense_attention, dense_attention_vjp
from .inputs import MultilevelInputs


def multilevel_attention(
    x, *,
    segments, wq, wk, wv, aggregate="attention_pool", pool_w=None, pool_b=None, context=None, pool_weights=None,
    output="per_token", token_rule="sum", scale=None, precision=None, backend="reference") -> Result:
    """Attention inside the units of each level, aggregated by G and passed up.

    Parameters
    ----------
    x : ndarray (B, N, C)
        Token representations.
    segments : int ndarray (L, N)
        ``segments[l, i]``: the level-``l`` unit holding token ``i``. Per level
        the ids are sorted, start at 0 and rise in steps of 0 or 1; a unit of
        level ``l`` lies inside one unit of level ``l + 1``. The elements of
        level 0 are tokens, those of level ``l >= 1`` the units of level ``l - 1``.
    wq, wk : ndarray (L, C, D)
        Per-level query and key projections.
    wv : ndarray (L, C, C)
        Per-level value projections (a level's outputs are the next level's inputs).
    aggregate : {"attention_pool", "mean", "max", "first", "weights"}
        G. ``"attention_pool"``: ``α = softmax over the unit of tanh(o W + b)·u``,
        ``g = Σ α o``. ``"max"``: feature-wise maximum; its gradient goes to the
        first element attaining it (``aux`` holds the argmax and the margin to
        the runner-up). ``"weights"``: ``g = Σ w o`` with given weights.
    pool_w : ndarray (L, C, A), pool_b : ndarray (L, A), context : ndarray (L, A)
        ``W``, ``b`` and the context vector ``u`` of attention pooling (only then).
    pool_weights : ndarray (L, N)
        ``[l, e]``: the weight of element ``e`` of level ``l`` in its unit
        (only with ``"weights"``); entries past the level's element count are
        not read (their gradient is 0).
    output : {"per_token", "per_unit"}
        One vector per token, or G over the top level: one per top unit.
    token_rule : {"own", "sum"}
        per_token: a token's level-0 output alone, or plus the outputs of
        every element above it (its sentence's at level 1, ...).
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, N, C) or (B, U_top, C); ``lse`` None (one softmax per
        level and unit). With ``"max"``, ``aux["argmax_<l>"]`` (B, U_l, C) int64
        and ``aux["margin_<l>"]``, the gap between the maximum and the
        runner-up (0 in a unit of one element, where there is no decision).
    """
    return registry.call_forward("multilevel", locals())


def same_unit(units: np.ndarray) -> np.ndarray:
    """(M, M) bool: elements i and j lie in one unit."""
    return units[:, None] == units[None, :]


def membership(units: np.ndarray, count: int) -> np.ndarray:
    """(U, M) bool: element i belongs to unit u."""
    return np.arange(count)[:, None] == units[None, :]


def pooling_matrix(x: MultilevelInputs, level: int, units: np.ndarray) -> np.ndarray:
    """(3) The (U, M) matrix R of the linear aggregations: g = R o."""
    member = membership(units, x.unit_count(level)).astype(np.float64)
    if x.aggregate == "mean":
        return member / member.sum(axis=1, keepdims=True)
    if x.aggregate == "first":
        return (np.cumsum(member, axis=1) == 1) * member
    return member * x.pool_weights[level, : units.shape[0]][None, :]


def forward(x: MultilevelInputs, num: Numerics) -> Result:
    f = _forward_steps(x, num)
    return Result(out=f["out"], lse=None, aux=f["aux"])


def _forward_steps(x: MultilevelInputs, num: Numerics) -> dict:
    h = num.load(x.x)  # (B, N, C): level 0's elements are tokens
    levels, aux = [], {}
    for level in range(x.levels):
        units = x.units(level)  # (M,)
        # (1) This level's queries, keys and values.
        q = num.store(h @ num.load(x.wq[level]))  # (B, M, D)
        k = num.store(h @ num.load(x.wk[level]))
        v = num.store(h @ num.load(x.wv[level]))  # (B, M, C)
        # (2) Attention inside each unit (dense attention with a block-diagonal mask).
        attended = dense_attention(q[:, None], k[:, None], v[:, None], mask=same_unit(units), scale=x.scale, precision=num)
        o = num.store(attended.out[:, 0])  # (B, M, C)
        # (3) G: one vector per unit.
        pooled, state = _aggregate(x, level, units, o, num)  # (B, U, C)
        if x.aggregate == "max":
            aux[f"argmax_{level}"], aux[f"margin_{level}"] = state["argmax"], state["margin"]
        levels.append(dict(h=h, q=q, k=k, v=v, units=units, o=o, state=state))
        h = pooled
    # (4) The output: per top unit, or per token with what flows down from the levels above.
    out = h if x.output == "per_unit" else _per_token(x, [lv["o"] for lv in levels])
    return dict(levels=levels, out=num.store(out), aux=aux)


def ancestors(x: MultilevelInputs, level: int) -> np.ndarray:
    """(N,) the element of ``level`` above each token: the token itself at 0, its level-(l-1) unit above."""
    return np.arange(x.x.shape[1]) if level == 0 else x.segments[level - 1]


def _per_token(x: MultilevelInputs, outputs: list) -> np.ndarray:
    """(4) out_i = o⁰_i (+ Σ_l oˡ at token i's level-l element, with token_rule "sum")."""
    used = outputs if x.token_rule == "sum" else outputs[:1]
    return sum(o[:, ancestors(x, level)] for level, o in enumerate(used))


def _aggregate(x: MultilevelInputs, level: int, units: np.ndarray, o: np.ndarray, num: Numerics):
    """(3) G over each unit of ``o`` (B, M, C): (B, U, C) and what its VJP needs."""
    count = x.unit_count(level)
    if x.aggregate == "attention_pool":
        # (3a) u_i = tanh(o_i W + b); e_i = u_i · context; α = softmax of e within the unit; g = Σ α o.
        hidden = num.store(np.tanh(o @ num.load(x.pool_w[level]) + num.load(x.pool_b[level])))  # (B, M, A)
        energy = num.store(hidden @ num.load(x.context[level]))  # (B, M)
        alpha, _ = masked_softmax(np.broadcast_to(energy[:, None, :], (o.shape[0], count, o.shape[1])),
                                  membership(units, count), num)  # (B, U, M)  # fmt: skip
        return num.store(np.einsum("bui,bic->buc", alpha, o)), dict(hidden=hidden, alpha=alpha)
    if x.aggregate == "max":
        # (3b) Feature-wise maximum; the first element attaining it is the argmax; margin to the runner-up.
        member = membership(units, count)[None, :, :, None]  # (1, U, M, 1)
        masked = np.where(member, o[:, None], -np.inf)  # (B, U, M, C)
        argmax = np.argmax(masked, axis=2)  # (B, U, C)
        top = np.take_along_axis(masked, argmax[:, :, None], axis=2)[:, :, 0]
        np.put_along_axis(masked, argmax[:, :, None], -np.inf, axis=2)
        runner_up = masked.max(axis=2)
        margin = np.where(np.isfinite(runner_up), top - runner_up, 0.0)  # no decision in a unit of one element
        return top, dict(argmax=argmax.astype(np.int64), margin=margin)
    # (3c) Linear aggregations: g = R o (mean, first, given weights).
    matrix = pooling_matrix(x, level, units)  # (U, M)
    return num.store(np.einsum("ui,bic->buc", num.load(matrix), o)), dict(matrix=matrix)


multilevel_attention_vjp = registry.vjp_function(
    multilevel_attention, "multilevel", grads="""    ``x``, ``wq``, ``wk``, ``wv`` (shapes of the inputs), and ``pool_w``,
    ``pool_b``, ``context`` (attention pooling) or ``pool_weights`` (given
    weights; 0 for entries past each level's element count). Max pooling's
    gradient goes to the first element attaining the maximum.""",
)


def vjp(x: MultilevelInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    f = _forward_steps(x, num)
    grads = {name: np.zeros(getattr(x, name).shape) for name in ("wq", "wk", "wv")}
    for name in ("pool_w", "pool_b", "context", "pool_weights"):
        if getattr(x, name) is not None:
            grads[name] = np.zeros(getattr(x, name).shape)
    dout = num.load(cotangents.dout)
    d_pooled = dout if x.output == "per_unit" else 0.0  # (B, U_top, C)
    for level in range(x.levels - 1, -1, -1):
        lv = f["levels"][level]
        # (4') A token's output reads its ancestors' outputs: their cotangents sum over the tokens below.
        d_o = _aggregate_vjp(x, level, lv, d_pooled, grads, num) if not np.isscalar(d_pooled) else np.zeros(lv["o"].shape)
        if x.output == "per_token" and (level == 0 or x.token_rule == "sum"):
            np.add.at(d_o, (slice(None), ancestors(x, level)), dout)
        # (2') Attention inside the units.
        d_qkv = dense_attention_vjp(num.store(d_o)[:, None], lv["q"][:, None], lv["k"][:, None], lv["v"][:, None],
                                    mask=same_unit(lv["units"]), scale=x.scale, precision=num)  # fmt: skip
        dq, dk, dv = (num.store(d_qkv[name][:, 0]) for name in "qkv")
        # (1') Projections.
        h = lv["h"]
        grads["wq"][level] = np.einsum("bic,bid->cd", h, dq)
        grads["wk"][level] = np.einsum("bic,bid->cd", h, dk)
        grads["wv"][level] = np.einsum("bic,bie->ce", h, dv)
        d_pooled = num.store(dq @ x.wq[level].T + dk @ x.wk[level].T + dv @ x.wv[level].T)  # (B, M, C): dh
    grads["x"] = d_pooled
    return Grads({name: np.asarray(value, np.float64) for name, value in grads.items()})


def _aggregate_vjp(x: MultilevelInputs, level: int, lv: dict, d_g: np.ndarray, grads: dict, num: Numerics) -> np.ndarray:
    """(3') The cotangent of the level's outputs o (B, M, C) from that of its pooled vectors (B, U, C)."""
    o, state = lv["o"], lv["state"]
    if x.aggregate == "attention_pool":
        alpha, hidden = state["alpha"], state["hidden"]  # (B, U, M), (B, M, A)
        d_o = np.einsum("bui,buc->bic", alpha, d_g)
        d_alpha = np.einsum("buc,bic->bui", d_g, o)
        d_energy = np.sum(alpha * (d_alpha - np.sum(alpha * d_alpha, axis=2, keepdims=True)), axis=1)  # (B, M)
        grads["context"][level] = np.einsum("bi,bia->a", d_energy, hidden)
        d_pre = num.store(d_energy[..., None] * x.context[level] * (1.0 - hidden**2))  # (B, M, A): through tanh
        grads["pool_w"][level] = np.einsum("bic,bia->ca", o, d_pre)
        grads["pool_b"][level] = d_pre.sum(axis=(0, 1))
        return num.store(d_o + d_pre @ x.pool_w[level].T)
    if x.aggregate == "max":
        d_o = np.zeros(o.shape)
        b, u, c = np.indices(d_g.shape)
        np.add.at(d_o, (b, state["argmax"], c), d_g)
        return d_o
    matrix = state["matrix"]
    if x.aggregate == "weights":
        member = membership(lv["units"], x.unit_count(level))
        grads["pool_weights"][level, : o.shape[1]] = np.einsum("buc,bic,ui->i", d_g, o, member)
    return num.store(np.einsum("ui,buc->bic", matrix, d_g))
