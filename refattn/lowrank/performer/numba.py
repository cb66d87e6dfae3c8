"""Performer (FAVOR+) on CPU: prefix sums in O(N·m) time per value dim and O(m·Dv) state.

Steps (1)-(3) (features, stabilisers) are vectorised NumPy by the reference's
own :func:`~refattn.lowrank.performer.reference.features`, in the compute
dtype (float32 for float32/float16/bfloat16 inputs, float64 otherwise). Steps
(4)-(6) never form Â: for each (batch, head), in parallel, one sweep over the
queries keeps

    S = Σ_{j<=i} κ_j v_jᵀ e^{L_j − L_i} (m × Dv),  z = Σ κ_j e^{L_j − L_i} (m),
    σ = Σ_{j<=i} v_j,  c = #{j <= i}

(all keys when not causal), rescaled by ``e^{L_{i−1} − L_i} <= 1`` whenever
the prefix stabiliser L grows (the online-softmax trick), so that

    n_i = m^−½ (φ(q_i)·S + ε s_i σ),   D_i = m^−½ (φ(q_i)·z + ε s_i c) + δ s_i,

with ``s_i = Σ_f φ(q_i)_f``. The VJP sweeps forward for ``dφ(q)`` and
backward with the suffix sums ``R_j = Σ_{i>=j} e^{L_j − L_i} φ(q_i) dn_iᵀ``,
``ρ_j = Σ_{i>=j} e^{L_j − L_i} φ(q_i) dD_i`` and ``ψ_j = Σ_{i>=j} s_i dn_i``:
``dκ_j = m^−½ (R_j v_j + ρ_j)``, ``dv_j = m^−½ (R_jᵀ κ_j + ε ψ_j)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ...core.precision import FLOAT64
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads, sum_kv_heads
from ..kernels import as_compute, compute_dtype, returned
from .reference import PerformerInputs, chain_features, features


@njit(cache=True, inline="always")
def _add_outer(state, a, b):
    """state += a bᵀ in place, without allocating the outer product."""
    for f in range(a.shape[0]):
        for e in range(b.shape[0]):
            state[f, e] += a[f] * b[e]


@njit(cache=True)
def _key_state(kappa, v, causal):
    """S (m × Dv), z (m), σ (Dv): zero when causal, else the totals over every key."""
    state = np.zeros((kappa.shape[1], v.shape[1]), dtype=kappa.dtype)
    mass = np.zeros(kappa.shape[1], dtype=kappa.dtype)
    value_sum = np.zeros(v.shape[1], dtype=kappa.dtype)
    if not causal:
        for j in range(kappa.shape[0]):
            _add_outer(state, kappa[j], v[j])
            mass += kappa[j]
            value_sum += v[j]
    return state, mass, value_sum


@njit(cache=True)
def _advance(state, mass, value_sum, kappa, v, level, i):
    """The causal state from key i − 1 to key i: rescale by e^{L_{i−1} − L_i}, then add key i."""
    if i > 0:
        shrink = math.exp(level[i - 1] - level[i])
        state *= shrink
        mass *= shrink
    _add_outer(state, kappa[i], v[i])
    mass += kappa[i]
    value_sum += v[i]


@njit(parallel=True, cache=True)
def _forward_kernel(phi_q, kappa, level, v, ratio, eps, den_eps, guard, causal):
    """out (G, Nq, Dv) and the denominators (G, Nq)."""
    g_count, nq, m = phi_q.shape
    nk, dv = v.shape[1], v.shape[2]
    out = np.zeros((g_count, nq, dv), dtype=phi_q.dtype)
    den = np.zeros((g_count, nq), dtype=phi_q.dtype)
    for g in prange(g_count):
        state, mass, value_sum = _key_state(kappa[g], v[g], causal)
        count = 0.0 if causal else float(nk)
        for i in range(nq):
            if causal:
                _advance(state, mass, value_sum, kappa[g], v[g], level[g], i)
                count += 1.0
            s_i = phi_q[g, i].sum()
            d = ratio * (np.dot(phi_q[g, i], mass) + eps * s_i * count) + den_eps * s_i
            if abs(d) <= guard:
                d += 2.0 * guard
            den[g, i] = d
            out[g, i] = ratio * (np.dot(phi_q[g, i], state) + eps * s_i * value_sum) / d
    return out, den


@njit(parallel=True, cache=True)
def _vjp_kernel(phi_q, kappa, level, v, out, den, dout, ratio, eps, den_eps, causal):
    """dφ(q) (G, Nq, m), dκ (G, Nk, m), dv (G, Nk, Dv)."""
    g_count, nq, m = phi_q.shape
    nk, dv_dim = v.shape[1], v.shape[2]
    d_phi = np.zeros_like(phi_q)
    d_kappa = np.zeros_like(kappa)
    d_v = np.zeros_like(v)
    for g in prange(g_count):
        dn = np.empty((nq, dv_dim), dtype=phi_q.dtype)
        dd = np.empty(nq, dtype=phi_q.dtype)
        for i in range(nq):
            dn[i] = dout[g, i] / den[g, i]
            dd[i] = -np.dot(dn[i], out[g, i])
        # Forward sweep: dφ(q_i) = m^−½ (S_i dn_i + z_i dD_i + ε (σ_i·dn_i + c_i dD_i)) + δ dD_i.
        state, mass, value_sum = _key_state(kappa[g], v[g], causal)
        count = 0.0 if causal else float(nk)
        for i in range(nq):
            if causal:
                _advance(state, mass, value_sum, kappa[g], v[g], level[g], i)
                count += 1.0
            d_phi[g, i] = ratio * (np.dot(state, dn[i]) + mass * dd[i] + eps * (np.dot(value_sum, dn[i]) + count * dd[i])) + den_eps * dd[i]
        # Backward sweep over keys with the suffix sums R, ρ, ψ.
        suffix = np.zeros((m, dv_dim), dtype=phi_q.dtype)
        rho = np.zeros(m, dtype=phi_q.dtype)
        psi = np.zeros(dv_dim, dtype=phi_q.dtype)
        if not causal:
            for i in range(nq):
                _add_outer(suffix, phi_q[g, i], dn[i])
                rho += phi_q[g, i] * dd[i]
                psi += phi_q[g, i].sum() * dn[i]
        for j in range(nk - 1, -1, -1):
            if causal:
                if j < nk - 1:
                    shrink = math.exp(level[g, j] - level[g, j + 1])
                    suffix *= shrink
                    rho *= shrink
                _add_outer(suffix, phi_q[g, j], dn[j])
                rho += phi_q[g, j] * dd[j]
                psi += phi_q[g, j].sum() * dn[j]
            d_kappa[g, j] = ratio * (np.dot(suffix, v[g, j]) + rho)
            d_v[g, j] = ratio * (np.dot(kappa[g, j], suffix) + eps * psi)
    return d_phi, d_kappa, d_v


def _prepared(x: PerformerInputs):
    dtype = compute_dtype(x.q)
    s = features(x, FLOAT64)
    b, h = s["phi_q"].shape[:2]
    flat = lambda a: as_compute(a.reshape((b * h,) + a.shape[2:]), dtype)  # noqa: E731
    level = s["k_level"] if x.key_stabilizer == "prefix" else np.zeros_like(s["k_level"])
    v = repeat_kv_heads(np.asarray(x.v), x.shape.group)
    scalars = (s["ratio"], x.feature_eps, x.denominator_feature_eps)
    return s, dtype, (flat(s["phi_q"]), flat(s["kappa"]), flat(level), flat(v)), scalars


def forward(x: PerformerInputs) -> Result:
    """Steps (1)-(6): ``out`` (B, Hq, Nq, Dv) in the compute dtype."""
    s, dtype, arrays, (ratio, eps, den_eps) = _prepared(x)
    out, _ = _forward_kernel(*arrays, ratio, eps, den_eps, x.denominator_guard, x.causal)
    return Result(out=out.reshape(s["phi_q"].shape[:3] + out.shape[-1:]).astype(x.q.dtype), lse=None, aux={})


def vjp(x: PerformerInputs, cotangents: Cotangents, saved: Result | None = None) -> Grads:
    """Steps (6')-(1'): ``q``, ``k``, ``v`` in the compute dtype."""
    s, dtype, arrays, (ratio, eps, den_eps) = _prepared(x)
    out, den = _forward_kernel(*arrays, ratio, eps, den_eps, x.denominator_guard, x.causal)
    b, h = s["phi_q"].shape[:2]
    dout = as_compute(cotangents.dout.reshape((b * h,) + cotangents.dout.shape[2:]), dtype)
    d_phi, d_kappa, d_v = _vjp_kernel(*arrays, out, den, dout, ratio, eps, den_eps, x.causal)
    unflat = lambda a: a.reshape((b, h) + a.shape[1:]).astype(np.float64)  # noqa: E731
    dq, dk = chain_features(x, s, unflat(d_phi), unflat(d_kappa))
    dv = sum_kv_heads(unflat(d_v), x.shape.group)
    return Grads(returned(dict(q=dq, k=dk, v=dv), x.q))
