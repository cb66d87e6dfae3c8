"""Performer (FAVOR+) over an array namespace ``xp`` (NumPy or CuPy): the GPU path, O(N·(m + D + Dv)) memory.

Steps (1)-(6) of spec/low_rank.md, "Performer", as the Numba backend computes
them (refattn/lowrank/performer/numba.py), batched over (batch, kv head) and
written over ``xp``: features exist only for one tile of rows at a time,
never as a whole (N, m) array. With ``W = d^−¼ ωᵀ`` (D, m), ``c = ½ d^−½`` and
``r = m^−½``, a tile's features are one product and one exponential,

    E = exp(x W − c‖x‖² − ℓ),   φ(q) = r (E_q + ε),   κ = E_k,

ℓ the query's row level or the key's level L_j (0, the global maximum, or the
prefix maximum of the keys' ``max_f (k W)``, computed first from one product
per key tile; the prefix maximum runs on the host, O(N)).

Not causal: one pass over key tiles sums ``S = κᵀV`` (m, Dv), ``z = κᵀ1`` and
``σ = Vᵀ1``; each query tile then takes ``n = r (φ S + ε s σᵀ)`` and
``D = r (φ z + ε s Nk) + δ s`` (s = Σ_f φ), the guard, and ``out = n / D``.
The VJP sums ``R = Σ φ dnᵀ``, ``ρ = Σ φ dD`` and ``ψ = Σ s dn`` over the
queries, then gives every key tile ``dκ = r (V Rᵀ + ρᵀ)`` and
``dV = r (κ R + ε ψ)``.

Causal (one tile size for queries and keys, which are the same positions):
the prefix sums S, z, σ over earlier tiles are carried at the level of the
last key before the tile, so that a query adds ``e^{L_prev − L_i} φ S``; a
tile's own pairs are the masked (T, T) product ``A = (φ κᵀ) ⊙ G``,
``G_ij = e^{L_j − L_i}`` for j <= i. Its VJP takes ``dφ`` in that same forward
sweep and ``dκ``, ``dV`` in a backward sweep that carries the suffix sums R,
ρ, ψ over later queries at the level of the first key after the tile. Every
exponent is <= 0.

Finally ``dx = (dE ⊙ E) Wᵀ − 2c (Σ_f dE ⊙ E) x`` (step (1')). float32 for
float32 or narrower inputs, float64 otherwise.

Shape letters: B batch, Hkv kv head, G query heads per kv head, T tile rows,
m features, D head dim, Dv value dim.
"""

from __future__ import annotations

import numpy as np

from ...core.results import Cotangents, Grads, Result
from ...core.xp import blocks, compute_dtype, to_host
from .reference import PerformerInputs

BLOCK_Q = 128  # query rows per tile; causal: rows of both queries and keys, so that (T, T) stays below (T, m)
BLOCK_K = 1024  # key rows per tile, not causal


def _t(a, xp):
    """The last two axes swapped."""
    return xp.swapaxes(a, -1, -2)


class _Features:
    """The inputs on the device, grouped for GQA, and steps (1)-(3) on a tile of rows."""

    def __init__(self, x: PerformerInputs, xp):
        s = x.shape
        self.x, self.xp, self.dtype = x, xp, compute_dtype(x.q.dtype)
        group = s.q_heads // s.kv_heads
        # (B, Hkv, G, Nq, D): query head g·G + r reads kv head g.
        self.q = xp.asarray(x.q, dtype=self.dtype).reshape(s.batch, s.kv_heads, group, s.q_len, s.head_dim)
        self.k = xp.asarray(x.k, dtype=self.dtype)[:, :, None]  # (B, Hkv, 1, Nk, D)
        self.v = xp.asarray(x.v, dtype=self.dtype)[:, :, None]  # (B, Hkv, 1, Nk, Dv)
        self.w = s.head_dim**-0.25 * _t(xp.asarray(x.omega, dtype=self.dtype), xp)  # (D, m)
        self.c = 0.5 * s.head_dim**-0.5
        self.ratio = x.omega.shape[0] ** -0.5
        self.level = self._key_levels()  # (B, Hkv, 1, Nk)

    def _key_levels(self):
        """(2) The key stabiliser L_j: 0, the global maximum or the prefix maximum of max_f (k W)."""
        xp, n = self.xp, self.k.shape[3]
        if self.x.key_stabilizer == "none":
            return xp.zeros(self.k.shape[:3] + (n,), dtype=self.dtype)
        top = xp.empty(self.k.shape[:3] + (n,), dtype=self.dtype)
        for j0, j1 in blocks(n, BLOCK_K):
            top[..., j0:j1] = (self.k[..., j0:j1, :] @ self.w).max(axis=-1)
        if self.x.key_stabilizer == "global":
            return xp.broadcast_to(top.max(axis=-1, keepdims=True), top.shape)
        return xp.asarray(np.maximum.accumulate(to_host(top), axis=-1))

    def query(self, i0: int, i1: int):
        """(1)-(3) for query rows i0:i1: φ (B, Hkv, G, T, m), E_q and s = Σ_f φ (B, Hkv, G, T)."""
        q = self.q[..., i0:i1, :]
        projected = q @ self.w
        level = projected.max(axis=-1, keepdims=True) if self.x.query_stabilizer == "row" else 0.0
        exponential = self.xp.exp(projected - self.c * (q * q).sum(axis=-1, keepdims=True) - level)
        phi = self.ratio * (exponential + self.x.feature_eps)
        return phi, exponential, phi.sum(axis=-1)

    def key(self, j0: int, j1: int):
        """(1)-(3) for key rows j0:j1: κ (B, Hkv, 1, T, m)."""
        k = self.k[..., j0:j1, :]
        return self.xp.exp(k @ self.w - self.c * (k * k).sum(axis=-1, keepdims=True) - self.level[..., j0:j1, None])

    def chain(self, rows, d_projected):
        """(1') dx (…, T, D) of rows x from ``dE ⊙ E`` (…, T, m); the levels are constants."""
        return d_projected @ _t(self.w, self.xp) - 2 * self.c * d_projected.sum(axis=-1, keepdims=True) * rows

    def finish(self, numerator, denominator, phi_sum):
        """(5)-(6): δ s added to D, the guard, and ``out = n / D``; returns out and D (…, T)."""
        x = self.x
        denominator = denominator + x.denominator_feature_eps * phi_sum
        guarded = (self.xp.abs(denominator) <= x.denominator_guard).astype(denominator.dtype)  # (a bool would promote)
        denominator = denominator + 2 * x.denominator_guard * guarded
        return numerator / denominator[..., None], denominator

    def d_finish(self, dout, out, denominator):
        """(6') ``dn = dout / D`` and ``dD = −dn·out`` (the guard's step has slope 1)."""
        d_numerator = dout / denominator[..., None]
        return d_numerator, -(d_numerator * out).sum(axis=-1)


def _grouped_sum(a):
    """A per-query-head array (B, Hkv, G, …) summed over the group G, kept as (B, Hkv, 1, …)."""
    return a.sum(axis=2, keepdims=True)


# --- not causal -----------------------------------------------------------------


def _key_sums(f: _Features):
    """S = κᵀV (B, Hkv, 1, m, Dv), z = κᵀ1 (…, m, 1) and σ = Vᵀ1 (…, 1, Dv), key tile by key tile."""
    xp, n = f.xp, f.k.shape[3]
    summary = xp.zeros(f.k.shape[:3] + (f.w.shape[1], f.v.shape[-1]), dtype=f.dtype)
    mass = xp.zeros(f.k.shape[:3] + (f.w.shape[1], 1), dtype=f.dtype)
    for j0, j1 in blocks(n, BLOCK_K):
        kappa = f.key(j0, j1)
        summary += _t(kappa, xp) @ f.v[..., j0:j1, :]
        mass += _t(kappa.sum(axis=-2, keepdims=True), xp)
    return summary, mass, f.v.sum(axis=-2, keepdims=True)


def _bidirectional_rows(f: _Features, sums, i0: int, i1: int):
    """Steps (3)-(6) for query rows i0:i1 over every key: φ, E_q, s, out, D."""
    summary, mass, value_sum = sums
    phi, exponential, phi_sum = f.query(i0, i1)
    n_keys, eps = f.k.shape[3], f.x.feature_eps
    numerator = f.ratio * (phi @ summary + eps * phi_sum[..., None] * value_sum)
    denominator = f.ratio * ((phi @ mass)[..., 0] + eps * n_keys * phi_sum)
    return (phi, exponential, phi_sum) + f.finish(numerator, denominator, phi_sum)


def _bidirectional_vjp(f: _Features, dout, dq, dk, dv):
    xp, x, r = f.xp, f.x, f.ratio
    sums = _key_sums(f)
    summary, mass, value_sum = sums
    n_keys = f.k.shape[3]
    r_sum = xp.zeros_like(summary)  # R = Σ_i φ_i dn_iᵀ
    rho = xp.zeros_like(mass)  # ρ = Σ_i φ_i dD_i
    psi = xp.zeros_like(value_sum)  # ψ = Σ_i s_i dn_i
    for i0, i1 in blocks(f.q.shape[3], BLOCK_Q):
        phi, exponential, phi_sum, out, denominator = _bidirectional_rows(f, sums, i0, i1)
        d_num, d_den = f.d_finish(dout[..., i0:i1, :], out, denominator)
        # (5')-(4') dφ_i = r (S dn_i + z dD_i) + r ε (σ·dn_i + Nk dD_i) + δ dD_i.
        d_phi = (r * (d_num @ _t(summary, xp) + d_den[..., None] * _t(mass, xp))
                 + (r * x.feature_eps * ((d_num * value_sum).sum(axis=-1) + n_keys * d_den)
                    + x.denominator_feature_eps * d_den)[..., None])  # fmt: skip
        dq[..., i0:i1, :] = f.chain(f.q[..., i0:i1, :], r * d_phi * exponential)
        r_sum += _grouped_sum(_t(phi, xp) @ d_num)
        rho += _grouped_sum(_t(phi, xp) @ d_den[..., None])
        psi += _grouped_sum((phi_sum[..., None] * d_num).sum(axis=-2, keepdims=True))
    for j0, j1 in blocks(n_keys, BLOCK_K):
        # dκ_j = r (R v_j + ρ), dv_j = r (Rᵀ κ_j + ε ψ).
        kappa = f.key(j0, j1)
        d_kappa = r * (f.v[..., j0:j1, :] @ _t(r_sum, xp) + _t(rho, xp))
        dv[..., j0:j1, :] = r * (kappa @ r_sum + x.feature_eps * psi)
        dk[..., j0:j1, :] = f.chain(f.k[..., j0:j1, :], d_kappa * kappa)


# --- causal ---------------------------------------------------------------------


class _CausalTile:
    """One tile of rows i0:i1 (queries and keys alike): features, levels, G and A = (φ κᵀ) ⊙ G."""

    def __init__(self, f: _Features, i0: int, i1: int):
        self.xp = xp = f.xp
        self.phi, self.exponential, self.phi_sum = f.query(i0, i1)  # (B, Hkv, G, T, m), …, (B, Hkv, G, T)
        self.kappa = f.key(i0, i1)  # (B, Hkv, 1, T, m)
        self.values = f.v[..., i0:i1, :]  # (B, Hkv, 1, T, Dv)
        self.level = f.level[..., i0:i1]  # (B, Hkv, 1, T)
        lower = xp.tril(xp.ones((i1 - i0, i1 - i0), dtype=bool))  # key j <= query i
        exponent = xp.minimum(self.level[..., None, :] - self.level[..., :, None], 0.0)  # L_j − L_i
        self.growth = xp.where(lower, xp.exp(exponent), 0.0)  # (B, Hkv, 1, T, T)
        self.products = (self.phi @ _t(self.kappa, xp)) * self.growth  # A (B, Hkv, G, T, T)
        self.counts = xp.arange(i0 + 1, i1 + 1, dtype=f.dtype)  # keys each query sees

    def rows(self, f: _Features, state):
        """Steps (4)-(6) for the tile's queries from the state of earlier tiles: out, D, and the decay
        ``e^{L_prev − L_i}`` (…, T, 1) and values' prefix sums σ_i (…, T, Dv) the VJP reuses."""
        summary, mass, value_sum, carried = state
        eps = f.x.feature_eps
        decay = f.xp.exp(carried - self.level)[..., None]
        prefix_values = value_sum + f.xp.cumsum(self.values, axis=-2)
        numerator = f.ratio * (decay * (self.phi @ summary) + self.products @ self.values
                               + eps * self.phi_sum[..., None] * prefix_values)  # fmt: skip
        denominator = f.ratio * ((decay * (self.phi @ mass))[..., 0] + self.products.sum(axis=-1)
                                 + eps * self.counts * self.phi_sum)  # fmt: skip
        return f.finish(numerator, denominator, self.phi_sum) + (decay, prefix_values)

    def advance(self, f: _Features, state):
        """The state after this tile's keys, carried at the level of its last key."""
        summary, mass, value_sum, carried = state
        xp, last = f.xp, self.level[..., -1:]
        weighted = self.kappa * xp.exp(self.level - last)[..., None]  # κ_j e^{L_j − L_last}
        rescale = xp.exp(carried - last)[..., None]
        return (rescale * summary + _t(weighted, xp) @ self.values,
                rescale * mass + _t(weighted.sum(axis=-2, keepdims=True), xp),
                value_sum + self.values.sum(axis=-2, keepdims=True), last)  # fmt: skip

    def d_pairs(self, d_num, d_den):
        """M = G ⊙ (dn vᵀ + dD 1ᵀ) (B, Hkv, G, T, T): ∂L/∂Â on the tile's own pairs over r."""
        return self.growth * (d_num @ _t(self.values, self.xp) + d_den[..., None])


def _causal_start(f: _Features):
    """The state before the first tile: S, z, σ at 0, carried at the first key's level."""
    xp, heads, m, dv = f.xp, f.k.shape[:3], f.w.shape[1], f.v.shape[-1]
    zeros = (xp.zeros(heads + shape, dtype=f.dtype) for shape in ((m, dv), (m, 1), (1, dv)))
    return (*zeros, f.level[..., :1])


def _causal_vjp(f: _Features, dout, dq, dk, dv):
    xp, x, r = f.xp, f.x, f.ratio
    tiles = blocks(f.q.shape[3], BLOCK_Q)
    d_num_all = xp.empty(f.q.shape[:4] + (f.v.shape[-1],), dtype=f.dtype)  # dn (B, Hkv, G, N, Dv)
    d_den_all = xp.empty(f.q.shape[:4], dtype=f.dtype)  # dD (B, Hkv, G, N)
    # Forward sweep:
    # dφ_i = r [e^{L_prev − L_i} (S dn_i + z dD_i) + (M κ)_i + ε (σ_i·dn_i + (i+1) dD_i)] + δ dD_i.
    state = _causal_start(f)
    for i0, i1 in tiles:
        tile = _CausalTile(f, i0, i1)
        out, denominator, decay, prefix_values = tile.rows(f, state)
        d_num, d_den = f.d_finish(dout[..., i0:i1, :], out, denominator)
        d_num_all[..., i0:i1, :], d_den_all[..., i0:i1] = d_num, d_den
        summary, mass = state[:2]
        d_phi = r * (decay * (d_num @ _t(summary, xp) + d_den[..., None] * _t(mass, xp))
                     + tile.d_pairs(d_num, d_den) @ tile.kappa
                     + x.feature_eps * ((d_num * prefix_values).sum(axis=-1) + tile.counts * d_den)[..., None])
        d_phi = d_phi + x.denominator_feature_eps * d_den[..., None]
        dq[..., i0:i1, :] = f.chain(f.q[..., i0:i1, :], r * d_phi * tile.exponential)
        state = tile.advance(f, state)
    # Backward sweep: R, ρ, ψ over later queries, carried at the level λ of the first key after the tile.
    r_sum = xp.zeros_like(state[0])
    rho = xp.zeros_like(state[1])
    psi = xp.zeros_like(state[2])
    carried = f.level[..., -1:]
    for i0, i1 in reversed(tiles):
        tile = _CausalTile(f, i0, i1)
        d_num, d_den = d_num_all[..., i0:i1, :], d_den_all[..., i0:i1]
        later = xp.exp(tile.level - carried)[..., None]  # e^{L_j − λ} (…, T, 1)
        own = d_num * tile.phi_sum[..., None]  # s_i dn_i
        suffix = xp.cumsum(own, axis=-2)
        suffix = suffix[..., -1:, :] - suffix + own  # Σ_{i >= j in the tile} s_i dn_i
        d_kappa = r * (later * (tile.values @ _t(r_sum, xp) + _t(rho, xp))
                       + _grouped_sum(_t(tile.d_pairs(d_num, d_den), xp) @ tile.phi))  # fmt: skip
        dv[..., i0:i1, :] = r * (later * (tile.kappa @ r_sum) + x.feature_eps * psi
                                 + _grouped_sum(_t(tile.products, xp) @ d_num + x.feature_eps * suffix))  # fmt: skip
        dk[..., i0:i1, :] = f.chain(f.k[..., i0:i1, :], d_kappa * tile.kappa)
        first = tile.level[..., :1]
        weighted = tile.phi * xp.exp(first - tile.level)[..., None]  # φ_i e^{λ' − L_i}
        rescale = xp.exp(first - carried)[..., None]
        r_sum = rescale * r_sum + _grouped_sum(_t(weighted, xp) @ d_num)
        rho = rescale * rho + _grouped_sum(_t(weighted, xp) @ d_den[..., None])
        psi = psi + _grouped_sum(own.sum(axis=-2, keepdims=True))
        carried = first


# --- the backend's functions ----------------------------------------------------


def forward(x: PerformerInputs, xp) -> Result:
    """Steps (1)-(6), tile by tile."""
    f = _Features(x, xp)
    s = x.shape
    out = xp.empty(f.q.shape[:4] + (s.value_dim,), dtype=f.dtype)  # (B, Hkv, G, Nq, Dv)
    if x.causal:
        state = _causal_start(f)
        for i0, i1 in blocks(s.q_len, BLOCK_Q):
            tile = _CausalTile(f, i0, i1)
            out[..., i0:i1, :] = tile.rows(f, state)[0]
            state = tile.advance(f, state)
    else:
        sums = _key_sums(f)
        for i0, i1 in blocks(s.q_len, BLOCK_Q):
            out[..., i0:i1, :] = _bidirectional_rows(f, sums, i0, i1)[3]
    return Result(out=out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim), lse=None, aux={})


def vjp(x: PerformerInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """Steps (6')-(1'), tile by tile; ω is not differentiated and the levels are constants."""
    f = _Features(x, xp)
    s = x.shape
    dout = xp.asarray(cotangents.dout, dtype=f.dtype).reshape(f.q.shape[:4] + (s.value_dim,))
    dq = xp.empty_like(f.q)
    dk = xp.empty_like(f.k)
    dv = xp.empty_like(f.v)
    (_causal_vjp if x.causal else _bidirectional_vjp)(f, dout, dq, dk, dv)
    return Grads(q=dq.reshape(x.q.shape), k=dk[:, :, 0], v=dv[:, :, 0])
