"""Performer (FAVOR+) on CPU: BLAS products over row tiles, O(N·(m + D + Dv)) memory, float32 for float32.

Steps (1)-(6) of refattn/lowrank/performer/reference.py, for each
(batch, head) in parallel (``prange``, SciPy's BLAS single-threaded inside),
over tiles of rows so that the (N, m) features never exist whole. With
``W = d^−¼ ωᵀ`` (D, m) and ``c = ½ d^−½``, a tile's features are one product
and one exponential:

    E = exp(x W − c‖x‖² − ℓ)          (T, m); ℓ the row's (query) or key level,
    φ(q) = m^−½ (E_q + ε),  κ = E_k,   feature of key j seen from query i: m^−½ (κ_j e^{L_j − L_i} + ε).

Not causal: one pass over key tiles sums ``S = κᵀV`` (m, Dv), ``z = κᵀ1``
and ``σ = Vᵀ1``, rescaled by ``e^{L_old − L_new}`` whenever the global key
level L grows (so keys are projected once); then per query tile

    n = m^−½ (φ S + ε s σᵀ),   D = m^−½ (φ z + ε s N) + δ s,   out = n / D,   s = Σ_f φ.

Causal: one pass over tiles of ``CAUSAL_TILE`` rows carries S, z, σ over the
earlier tiles at the level ``L_prev`` of the last key before the tile; a
tile's own pairs are the masked (T, T) product ``A = (φ κᵀ) ⊙ G``,
``G_ij = e^{L_j − L_i}`` for j <= i, and its queries add ``e^{L_prev − L_i} φ S``.
Every exponent is <= 0.

VJP (dn = dout / D, dD = −dn·out): ``dφ_i = m^−½ Σ_j G_ij κ_j (v_j·dn_i + dD_i)
+ m^−½ ε (σ_i·dn_i + c_i dD_i) + δ dD_i``, ``dκ_j = m^−½ Σ_i G_ij φ_i (v_j·dn_i + dD_i)``,
``dv_j = Σ_i Â_ij dn_i``: the sums over earlier keys through the forward's
state, over later queries through the suffix sums ``R = Σ φ_i dn_iᵀ``,
``ρ = Σ φ_i dD_i``, ``ψ = Σ s_i dn_i`` carried backwards tile by tile (at
the level of the tile's last key), and a tile's own pairs by (T, T) products.
Then ``dx = (dE ⊙ E) W ᵀ − 2c (Σ_f dE ⊙ E) x`` (step (1')).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ...core.results import Cotangents, Grads, Result
from ...core.shapes import sum_kv_heads
from ...core.tiles import exp_nonpositive
from ..kernels import as_compute, compute_dtype, returned, single_threaded_blas
from .reference import PerformerInputs

TILE = 1024  # rows per tile, not causal
CAUSAL_TILE = 128  # rows per tile, causal: the (T, T) product of a tile's own pairs stays below the (T, m) ones
NO_LEVEL, GLOBAL_LEVEL, PREFIX_LEVEL = 0, 1, 2  # key stabilisers


# --------------------------------------------------------------------------
# Steps (1)-(3) and (1') on one tile.
# --------------------------------------------------------------------------


@njit(cache=True)
def _projected(x, w, c):
    """``x W − c‖x‖²`` (T, m) and the row maxima of ``x W`` (T,): the exponent before its level."""
    p = np.dot(x, w)
    top = np.empty(x.shape[0], p.dtype)
    for i in range(x.shape[0]):
        top[i] = p[i].max()
        p[i] -= c * np.dot(x[i], x[i])
    return p, top


@njit(cache=True)
def _exp_rows(p, level, stabilised):
    """``p ← exp(p − level)`` row-wise in place; vectorised when stabilised (every exponent <= 0)."""
    for i in range(p.shape[0]):
        row, shift = p[i], level[i]
        if stabilised:
            for f in range(p.shape[1]):
                row[f] = exp_nonpositive(row[f] - shift)
        else:
            for f in range(p.shape[1]):
                row[f] = math.exp(row[f] - shift)


@njit(cache=True)
def _query_features(q, w, c, row_stabilised, ratio, eps):
    """E (T, m), φ(q) (T, m) and s = Σ_f φ (T,) of a query tile."""
    e, top = _projected(q, w, c)
    _exp_rows(e, top if row_stabilised else np.zeros_like(top), row_stabilised)
    phi = ratio * (e + eps)
    return e, phi, phi.sum(axis=1)


@njit(cache=True)
def _input_grad(d_e, e, x, w, c):
    """Step (1'): dx (T, D) from dE (T, m): ``(dE ⊙ E) Wᵀ − 2c (Σ_f dE ⊙ E) x``."""
    d_p = d_e * e
    dx = np.dot(d_p, w.T)
    for i in range(x.shape[0]):
        dx[i] -= 2.0 * c * d_p[i].sum() * x[i]
    return dx


@njit(cache=True)
def _finish(numerator, den, out, den_out, i0, guard):
    """(6) out = n / D with the guard ``D ← D + 2g [|D| <= g]``, written to rows i0.. of out and den_out."""
    for i in range(numerator.shape[0]):
        d = den[i]
        if abs(d) <= guard:
            d += 2.0 * guard
        den_out[i0 + i] = d
        out[i0 + i] = numerator[i] / d


@njit(cache=True)
def _row_grads(dout, out, den, i0, i1):
    """dn = dout / D (T, Dv) and dD = −dn·out (T,) of rows i0..i1."""
    dn = np.empty((i1 - i0, dout.shape[1]), dout.dtype)
    dd = np.empty(i1 - i0, dout.dtype)
    for i in range(i1 - i0):
        dn[i] = dout[i0 + i] / den[i0 + i]
        dd[i] = -np.dot(dn[i], out[i0 + i])
    return dn, dd


# --------------------------------------------------------------------------
# Not causal.
# --------------------------------------------------------------------------


@njit(cache=True)
def _key_sums(k, v, w, c, key_mode):
    """S = κᵀV (m, Dv), z = κᵀ1 (m), σ = Vᵀ1 (Dv) over every key, at the final key level L (returned)."""
    m, dv = w.shape[1], v.shape[1]
    state = np.zeros((m, dv), w.dtype)
    mass = np.zeros(m, w.dtype)
    value_sum = np.zeros(dv, w.dtype)
    level = -np.inf if key_mode == GLOBAL_LEVEL else 0.0
    for j0 in range(0, k.shape[0], TILE):
        j1 = min(j0 + TILE, k.shape[0])
        kappa, top = _projected(k[j0:j1], w, c)
        if key_mode == GLOBAL_LEVEL and top.max() > level:
            shrink = math.exp(level - top.max())  # rescale what was summed under the old level
            state *= shrink
            mass *= shrink
            level = top.max()
        _exp_rows(kappa, np.full(j1 - j0, level, w.dtype), key_mode != NO_LEVEL)
        state += np.dot(kappa.T, v[j0:j1])
        mass += kappa.sum(axis=0)
        value_sum += v[j0:j1].sum(axis=0)
    return state, mass, value_sum, level


@njit(parallel=True, cache=True)
def _forward(q, k, v, w, c, row_stabilised, key_mode, ratio, eps, den_eps, guard, count):
    """out (B, Hq, Nq, Dv) and D (B, Hq, Nq), not causal; ``count`` is Nk in the compute dtype."""
    batch, heads, nq = q.shape[:3]
    group, nk = heads // k.shape[1], k.shape[2]
    out = np.empty((batch, heads, nq, v.shape[3]), q.dtype)
    den = np.empty((batch, heads, nq), q.dtype)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        state, mass, value_sum, _ = _key_sums(k[b, h // group], v[b, h // group], w, c, key_mode)
        for i0 in range(0, nq, TILE):
            i1 = min(i0 + TILE, nq)
            _, phi, s = _query_features(q[b, h, i0:i1], w, c, row_stabilised, ratio, eps)
            numerator = ratio * (np.dot(phi, state) + eps * np.outer(s, value_sum))
            _finish(numerator, ratio * (np.dot(phi, mass) + eps * count * s) + den_eps * s, out[b, h], den[b, h], i0, guard)
    return out, den


@njit(parallel=True, cache=True)
def _vjp(q, k, v, w, c, row_stabilised, key_mode, ratio, eps, den_eps, count, out, den, dout):
    """dq (B, Hq, Nq, D), dk (B, Hq, Nk, D), dv (B, Hq, Nk, Dv) per query head, not causal."""
    batch, heads, nq = q.shape[:3]
    group, nk = heads // k.shape[1], k.shape[2]
    dq, dk, dv = np.empty_like(q), np.empty((batch, heads) + k.shape[2:], q.dtype), np.empty((batch, heads) + v.shape[2:], q.dtype)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        keys, values = k[b, h // group], v[b, h // group]
        state, mass, value_sum, level = _key_sums(keys, values, w, c, key_mode)
        # Queries: dφ through the key sums, and the sums R, ρ, ψ over every query.
        suffix = np.zeros(state.shape, q.dtype)
        rho = np.zeros(mass.shape, q.dtype)
        psi = np.zeros(value_sum.shape, q.dtype)
        for i0 in range(0, nq, TILE):
            i1 = min(i0 + TILE, nq)
            e, phi, s = _query_features(q[b, h, i0:i1], w, c, row_stabilised, ratio, eps)
            dn, dd = _row_grads(dout[b, h], out[b, h], den[b, h], i0, i1)
            d_phi = ratio * (np.dot(dn, state.T) + np.outer(dd, mass))
            d_phi += np.outer(ratio * eps * (np.dot(dn, value_sum) + count * dd) + den_eps * dd, np.ones_like(mass))
            dq[b, h, i0:i1] = _input_grad(ratio * d_phi, e, q[b, h, i0:i1], w, c)
            suffix += np.dot(phi.T, dn)
            rho += np.dot(dd, phi)
            psi += np.dot(s, dn)
        # Keys: dκ = m^−½ (R v + ρ), dv = m^−½ (Rᵀκ + ε ψ).
        for j0 in range(0, nk, TILE):
            j1 = min(j0 + TILE, nk)
            kappa, _ = _projected(keys[j0:j1], w, c)
            _exp_rows(kappa, np.full(j1 - j0, level, w.dtype), key_mode != NO_LEVEL)
            d_kappa = ratio * (np.dot(values[j0:j1], suffix.T) + np.outer(np.ones(j1 - j0, q.dtype), rho))
            dv[b, h, j0:j1] = ratio * (np.dot(kappa, suffix) + eps * np.outer(np.ones(j1 - j0, q.dtype), psi))
            dk[b, h, j0:j1] = _input_grad(d_kappa, kappa, keys[j0:j1], w, c)
    return dq, dk, dv


# --------------------------------------------------------------------------
# Causal: tiles of CAUSAL_TILE rows, the earlier tiles through the carried sums.
# --------------------------------------------------------------------------


@njit(cache=True)
def _global_key_level(k, w):
    """The maximum of ``k W`` over every key and feature (the key-global level)."""
    level = -np.inf
    for j0 in range(0, k.shape[0], TILE):
        level = max(level, np.dot(k[j0 : j0 + TILE], w).max())
    return level


@njit(cache=True)
def _causal_keys(k, w, c, key_mode, level_prev, fixed_level):
    """κ (T, m) and the key levels L (T,) of a tile: the running maximum after ``level_prev``, or ``fixed_level``."""
    kappa, top = _projected(k, w, c)
    levels = np.full(k.shape[0], fixed_level, w.dtype)
    if key_mode == PREFIX_LEVEL:
        running = level_prev
        for j in range(k.shape[0]):
            running = max(running, top[j])
            levels[j] = running
    _exp_rows(kappa, levels, key_mode != NO_LEVEL)
    return kappa, levels


@njit(cache=True)
def _growth(levels, level_prev):
    """G (T, T), ``e^{L_j − L_i}`` for j <= i and 0 above the diagonal, and the carried sums' factor ``e^{L_prev − L_i}`` (T,)."""
    n = levels.shape[0]
    growth = np.zeros((n, n), levels.dtype)
    carried = np.empty(n, levels.dtype)
    for i in range(n):
        carried[i] = exp_nonpositive(level_prev - levels[i])
        for j in range(i + 1):
            growth[i, j] = exp_nonpositive(levels[j] - levels[i])
    return growth, carried


@njit(cache=True)
def _advance(state, mass, kappa, v, levels, level_prev):
    """S, z from the level before the tile to the level of its last key, its keys added."""
    level_end = levels[-1]
    shrink = math.exp(level_prev - level_end)
    state *= shrink
    mass *= shrink
    weighted = kappa.copy()
    for j in range(kappa.shape[0]):
        weighted[j] *= exp_nonpositive(levels[j] - level_end)
    state += np.dot(weighted.T, v)
    mass += weighted.sum(axis=0)


@njit(cache=True)
def _prefix_sums(rows, start):
    """``start + Σ_{j<=i} rows_j`` (T, E)."""
    out = np.empty_like(rows)
    running = start.copy()
    for i in range(rows.shape[0]):
        running += rows[i]
        out[i] = running
    return out


@njit(cache=True)
def _causal_tile(q, k, w, c, row_stabilised, key_mode, ratio, eps, level_prev, fixed_level):
    """Everything one tile needs: E, φ, s of its queries, κ and L of its keys, G, the carried factor, ``φκᵀ ⊙ G``."""
    e, phi, s = _query_features(q, w, c, row_stabilised, ratio, eps)
    kappa, levels = _causal_keys(k, w, c, key_mode, level_prev, fixed_level)
    growth, carried = _growth(levels, level_prev)
    return e, phi, s, kappa, levels, growth, carried, np.dot(phi, kappa.T) * growth


@njit(cache=True)
def _start_level(k, w, key_mode):
    """The level before the first key (−∞ for the prefix maximum) and the fixed level of the other modes."""
    fixed = _global_key_level(k, w) if key_mode == GLOBAL_LEVEL else 0.0
    return (-np.inf if key_mode == PREFIX_LEVEL else fixed), fixed


@njit(parallel=True, cache=True)
def _causal_forward(q, k, v, w, c, row_stabilised, key_mode, ratio, eps, den_eps, guard):
    """out (B, Hq, N, Dv) and D (B, Hq, N), causal."""
    batch, heads, n = q.shape[:3]
    group = heads // k.shape[1]
    out = np.empty((batch, heads, n, v.shape[3]), q.dtype)
    den = np.empty((batch, heads, n), q.dtype)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        keys, values = k[b, h // group], v[b, h // group]
        state = np.zeros((w.shape[1], v.shape[3]), q.dtype)
        mass = np.zeros(w.shape[1], q.dtype)
        value_sum = np.zeros(v.shape[3], q.dtype)
        level_prev, fixed = _start_level(keys, w, key_mode)
        for i0 in range(0, n, CAUSAL_TILE):
            i1 = min(i0 + CAUSAL_TILE, n)
            tile_v = values[i0:i1]
            _, phi, s, kappa, levels, _, carried, pairs = _causal_tile(q[b, h, i0:i1], keys[i0:i1], w, c, row_stabilised,
                                                                       key_mode, ratio, eps, level_prev, fixed)  # fmt: skip
            counts = np.arange(i0 + 1, i1 + 1).astype(q.dtype)
            seen = _prefix_sums(tile_v, value_sum)  # σ_i (T, Dv)
            numerator = ratio * (np.dot(pairs, tile_v) + np.outer(carried, np.ones(v.shape[3], q.dtype)) * np.dot(phi, state)
                                 + np.outer(eps * s, np.ones(v.shape[3], q.dtype)) * seen)  # fmt: skip
            _finish(numerator, ratio * (pairs.sum(axis=1) + carried * np.dot(phi, mass) + eps * s * counts) + den_eps * s,
                    out[b, h], den[b, h], i0, guard)  # fmt: skip
            _advance(state, mass, kappa, tile_v, levels, level_prev)
            value_sum = seen[-1].copy()
            level_prev = levels[-1]
    return out, den


@njit(cache=True)
def _suffix_sums(rows, start):
    """``start + Σ_{i>=j} rows_i`` (T, E)."""
    out = np.empty_like(rows)
    running = start.copy()
    for j in range(rows.shape[0] - 1, -1, -1):
        running += rows[j]
        out[j] = running
    return out


@njit(parallel=True, cache=True)
def _causal_vjp(q, k, v, w, c, row_stabilised, key_mode, ratio, eps, den_eps, out, den, dout):
    """dq (B, Hq, N, D), dk (B, Hq, N, D), dv (B, Hq, N, Dv) per query head, causal."""
    batch, heads, n = q.shape[:3]
    group, m, dv_dim = heads // k.shape[1], w.shape[1], v.shape[3]
    dq, dk, dv = np.empty_like(q), np.empty((batch, heads) + k.shape[2:], q.dtype), np.empty((batch, heads) + v.shape[2:], q.dtype)
    for item in prange(batch * heads):
        b, h = item // heads, item % heads
        keys, values = k[b, h // group], v[b, h // group]
        ones_m = np.ones(m, q.dtype)
        # Forward sweep: dφ (and dq) through the carried S, z, σ and the tile's own pairs; the levels kept.
        state = np.zeros((m, dv_dim), q.dtype)
        mass = np.zeros(m, q.dtype)
        value_sum = np.zeros(dv_dim, q.dtype)
        level_start, fixed = _start_level(keys, w, key_mode)
        level_prev = level_start
        all_levels = np.empty(n, q.dtype)
        for i0 in range(0, n, CAUSAL_TILE):
            i1 = min(i0 + CAUSAL_TILE, n)
            tile_v = values[i0:i1]
            e, phi, s, kappa, levels, growth, carried, _ = _causal_tile(q[b, h, i0:i1], keys[i0:i1], w, c, row_stabilised,
                                                                         key_mode, ratio, eps, level_prev, fixed)  # fmt: skip
            dn, dd = _row_grads(dout[b, h], out[b, h], den[b, h], i0, i1)
            counts = np.arange(i0 + 1, i1 + 1).astype(q.dtype)
            seen = _prefix_sums(tile_v, value_sum)
            pair_grads = (np.dot(dn, tile_v.T) + np.outer(dd, np.ones(i1 - i0, q.dtype))) * growth  # (v_j·dn_i + dD_i) G_ij
            d_phi = ratio * (np.dot(pair_grads, kappa) + np.outer(carried, ones_m) * (np.dot(dn, state.T) + np.outer(dd, mass)))
            row_dots = np.empty(i1 - i0, q.dtype)
            for i in range(i1 - i0):
                row_dots[i] = np.dot(dn[i], seen[i])
            d_phi += np.outer(ratio * eps * (row_dots + counts * dd) + den_eps * dd, ones_m)
            dq[b, h, i0:i1] = _input_grad(ratio * d_phi, e, q[b, h, i0:i1], w, c)
            _advance(state, mass, kappa, tile_v, levels, level_prev)
            value_sum = seen[-1].copy()
            all_levels[i0:i1] = levels
            level_prev = levels[-1]
        # Backward sweep: dκ, dv through R, ρ, ψ over later tiles (at the level of this tile's last key) and the own pairs.
        suffix = np.zeros((m, dv_dim), q.dtype)
        rho = np.zeros(m, q.dtype)
        psi = np.zeros(dv_dim, q.dtype)
        last = ((n - 1) // CAUSAL_TILE) * CAUSAL_TILE
        for i0 in range(last, -1, -CAUSAL_TILE):
            i1 = min(i0 + CAUSAL_TILE, n)
            tile_v = values[i0:i1]
            level_prev = all_levels[i0 - 1] if i0 > 0 else level_start
            _, phi, s, kappa, levels, growth, carried, pairs = _causal_tile(q[b, h, i0:i1], keys[i0:i1], w, c, row_stabilised,
                                                                            key_mode, ratio, eps, level_prev, fixed)  # fmt: skip
            dn, dd = _row_grads(dout[b, h], out[b, h], den[b, h], i0, i1)
            pair_grads = (np.dot(dn, tile_v.T) + np.outer(dd, np.ones(i1 - i0, q.dtype))) * growth
            to_end = np.empty(i1 - i0, q.dtype)  # e^{L_j − L_end}
            for j in range(i1 - i0):
                to_end[j] = exp_nonpositive(levels[j] - levels[-1])
            d_kappa = ratio * (np.dot(pair_grads.T, phi)
                               + np.outer(to_end, ones_m) * (np.dot(tile_v, suffix.T) + np.outer(np.ones(i1 - i0, q.dtype), rho)))  # fmt: skip
            weighted = kappa * np.outer(to_end, ones_m)
            later = _suffix_sums(np.outer(s, np.ones(dv_dim, q.dtype)) * dn, psi)  # ψ_j = Σ_{i>=j} s_i dn_i
            dv[b, h, i0:i1] = ratio * (np.dot(pairs.T, dn) + np.dot(weighted, suffix) + eps * later)
            dk[b, h, i0:i1] = _input_grad(d_kappa, kappa, keys[i0:i1], w, c)
            # This tile's queries join R, ρ, ψ, referred to the level before the tile.
            shrink = math.exp(level_prev - levels[-1])
            suffix *= shrink
            rho *= shrink
            scaled = phi * np.outer(carried, ones_m)
            suffix += np.dot(scaled.T, dn)
            rho += np.dot(dd, scaled)
            psi = later[0].copy()
    return dq, dk, dv


# --------------------------------------------------------------------------
# The backend.
# --------------------------------------------------------------------------


def _prepared(x: PerformerInputs) -> tuple:
    """q, k, v and ``W = d^−¼ ωᵀ`` (D, m) in the compute dtype, and the scalars the kernels take, in it too."""
    dtype = compute_dtype(x.q)
    d, m = x.shape.head_dim, x.omega.shape[0]
    w = as_compute(d**-0.25 * np.asarray(x.omega, np.float64).T, dtype)  # (D, m)
    key_mode = {"none": NO_LEVEL, "global": GLOBAL_LEVEL, "prefix": PREFIX_LEVEL}[x.key_stabilizer]
    scalars = tuple(dtype.type(value) for value in (0.5 / math.sqrt(d), m**-0.5, x.feature_eps, x.denominator_feature_eps))
    c, ratio, eps, den_eps = scalars
    arrays = tuple(as_compute(a, dtype) for a in (x.q, x.k, x.v))
    return arrays + (w, c, x.query_stabilizer == "row", key_mode, ratio, eps, den_eps)


def _run_forward(x: PerformerInputs, arguments: tuple) -> tuple[np.ndarray, np.ndarray]:
    """out (B, Hq, Nq, Dv) and D (B, Hq, Nq) in the compute dtype."""
    guard = arguments[0].dtype.type(x.denominator_guard)
    with single_threaded_blas():
        if x.causal:
            return _causal_forward(*arguments, guard)
        return _forward(*arguments, guard, arguments[0].dtype.type(x.shape.kv_len))


def forward(x: PerformerInputs) -> Result:
    """Steps (1)-(6): ``out`` (B, Hq, Nq, Dv) in the inputs' dtype."""
    out, _ = _run_forward(x, _prepared(x))
    return Result(out=out.astype(x.q.dtype, copy=False), lse=None, aux={})


def vjp(x: PerformerInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (6')-(1'): ``q``, ``k``, ``v`` in the inputs' dtype (the forward is run again for its denominators)."""
    arguments = _prepared(x)
    out, den = _run_forward(x, arguments)
    dout = as_compute(cotangents.dout, out.dtype)
    with single_threaded_blas():
        if x.causal:
            dq, dk, dv = _causal_vjp(*arguments, out, den, dout)
        else:
            dq, dk, dv = _vjp(*arguments, arguments[0].dtype.type(x.shape.kv_len), out, den, dout)
    group = x.shape.group
    return Grads(returned(dict(q=dq, k=sum_kv_heads(dk, group), v=sum_kv_heads(dv, group)), x.q))
