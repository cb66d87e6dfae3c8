"""Performer (FAVOR+): the executable specification.

Choromanski et al. 2021, "Rethinking Attention with Performers", eqs. (5),
(7)-(8) and Lemma 1: positive random features

    φ(x) = m^−½ exp(ωᵀx − ‖x‖²/2),   x = d^−¼ q (or k),

give ``softmax(q kᵀ/√d) ≈ φ(q)ᵀφ(k)`` in expectation over ω ~ N(0, I), and
attention ``D⁻¹ φ(Q)(φ(K)ᵀ V)`` (causal: prefix sums over keys). ω (m, D) is
an input; :func:`orthogonal_features` draws the paper's orthogonal blocks.

Stabilisers subtract a maximum inside ``exp``: exact when ``feature_eps = 0``
(the constant cancels between numerator and denominator), a change of the
function when a library adds ``ε`` after ``exp``. The reference forms the
implied (Nq, Nk) matrix Â from the features so that every option reads as one
formula; the prefix sums are the Numba kernel's business. Steps match
spec/low_rank.md, "Performer".

Einsum letters: b batch, h query head, q query, k key, f feature, d head dim,
e value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.presets import FROM_PRESET
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads, sum_kv_heads
from .presets import KEY_STABILIZERS, PRESETS, QUERY_STABILIZERS, resolve


def performer_attention(q, k, v, *, omega, causal=False, preset=None, query_stabilizer=FROM_PRESET,
                        key_stabilizer=FROM_PRESET, feature_eps=FROM_PRESET, denominator_feature_eps=FROM_PRESET,
                        denominator_guard=FROM_PRESET, precision=None, backend="reference") -> Result:  # fmt: skip
    """FAVOR+ attention ``D⁻¹ φ(Q) (φ(K)ᵀ V)`` with positive random features.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
        ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
    v : ndarray (B, Hkv, Nk, Dv)
    omega : ndarray (m, D)
        The random features ω (one per row), shared by every head.
    causal : bool
        Query i sees keys j <= i (prefix sums); needs Nq == Nk.
    preset : {None, "lucidrains", "google"}
        Sets the five parameters below (spec/low_rank.md table).
    query_stabilizer : {"none", "row"}
        Subtract each query row's maximum of ωᵀq' before ``exp``.
    key_stabilizer : {"none", "global", "prefix"}
        Subtract from ωᵀk' the maximum over all keys and features of the
        (b, h) (``"global"``: in causal mode key j then depends on later
        keys whenever ``feature_eps > 0``), or, for query i, the maximum over
        keys j <= i (``"prefix"``, causal only). Canonical: ``"prefix"`` when
        causal, else ``"global"``.
    feature_eps : float >= 0
        Added to every feature after ``exp``: ``φ = m^−½ (exp(...) + ε)``.
    denominator_feature_eps : float >= 0
        Added to every feature of the key sum in the denominator,
        ``D_i = φ(q_i)·(Σ_j φ(k_j) + δ)`` (lucidrains' causal 1e-6).
    denominator_guard : float >= 0
        ``D ← D + 2g [|D| <= g]`` (Google's).

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv), float64; ``lse`` is None; ``aux`` is empty.
    """
    return registry.call_forward("performer", locals())


performer_attention_vjp = registry.vjp_function(
    performer_attention, "performer", grads="""    ``q``, ``k``, ``v`` (shapes of the inputs). ω is a random draw, not
    differentiated; stabilising maxima are held fixed (as performer-pytorch's ``.detach()``).""",
)


@dataclass(frozen=True)
class PerformerInputs:
    """Checked inputs, the preset's values resolved."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    omega: np.ndarray
    causal: bool
    query_stabilizer: str
    key_stabilizer: str
    feature_eps: float
    denominator_feature_eps: float
    denominator_guard: float
    shape: checks.AttentionShape

    def cotangent_shapes(self) -> dict:
        s = self.shape
        return {"dout": (s.batch, s.q_heads, s.q_len, s.value_dim), "dlse": None}


def check_inputs(q, k, v, *, omega, causal, preset, **preset_controlled) -> PerformerInputs:
    """Check every argument of ``performer_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = checks.qkv(q, k, v)
    checks.float_array(omega, "omega")
    if omega.ndim != 2 or omega.shape[1] != shape.head_dim or omega.shape[0] == 0:
        raise SpecError("omega", f"shape (m, D={shape.head_dim}) with m >= 1", f"shape {omega.shape}")
    causal = checks.flag(causal, "causal")
    if causal and shape.q_len != shape.kv_len:
        raise SpecError("k", f"Nk = Nq = {shape.q_len} when causal (query i sees keys 0..i)", f"Nk = {shape.kv_len}")
    if not (preset is None or isinstance(preset, str)) or preset not in PRESETS:
        raise SpecError("preset", f"None or one of {[p for p in PRESETS if p]}", repr(preset))
    p = resolve(preset, causal)
    p.update({name: value for name, value in preset_controlled.items() if value is not FROM_PRESET})
    query_stabilizer = checks.choice(p["query_stabilizer"], "query_stabilizer", QUERY_STABILIZERS)
    key_stabilizer = checks.choice(p["key_stabilizer"], "key_stabilizer", KEY_STABILIZERS)
    if key_stabilizer == "prefix" and not causal:
        raise SpecError("key_stabilizer", "'none' or 'global' when not causal (a prefix needs an order)", "'prefix'")
    eps = {name: checks.real_number(p[name], name, minimum=0.0)
           for name in ("feature_eps", "denominator_feature_eps", "denominator_guard")}  # fmt: skip
    return PerformerInputs(q, k, v, omega, causal, query_stabilizer, key_stabilizer, shape=shape, **eps)


def orthogonal_features(rng: np.random.Generator, m: int, d: int, norms: str = "chi") -> np.ndarray:
    """ω (m, d): stacked orthogonal blocks (QR of Gaussian d × d matrices), rows rescaled.

    ``norms="chi"`` gives each row the norm of a Gaussian d-vector (χ_d, the
    paper's and both libraries' ``scaling=0``); ``"sqrt_d"`` gives √d (``scaling=1``).
    A helper outside the mechanism: the mechanism takes ω as an input.
    """
    blocks = []
    for _ in range(-(-m // d)):
        orthonormal, _ = np.linalg.qr(rng.standard_normal((d, d)))
        blocks.append(orthonormal.T)
    directions = np.concatenate(blocks)[:m]  # (m, d), orthonormal within each block
    if norms == "chi":
        lengths = np.linalg.norm(rng.standard_normal((m, d)), axis=1)
    elif norms == "sqrt_d":
        lengths = np.full(m, np.sqrt(d))
    else:
        raise SpecError("norms", "'chi' or 'sqrt_d'", repr(norms))
    return lengths[:, None] * directions


# --------------------------------------------------------------------------
# Features (shared with numba.py): steps (1)-(3).
# --------------------------------------------------------------------------


def features(x: PerformerInputs, num: Numerics) -> dict:
    """Steps (1)-(3): query features φ(q) (B, Hq, Nq, m), key exponentials κ (B, Hq, Nk, m) and levels L (B, Hq, Nk).

    ``κ_jf = exp(ωᵀk'_j − ‖k'_j‖²/2 − L_j)``, with ``L_j`` the key
    stabiliser at key j (0, the global maximum, or the prefix maximum up to
    j). The feature of key j as query i sees it is ``m^−½ (κ_jf e^{L_j − L_i} + ε)``.
    """
    d = x.shape.head_dim
    omega = num.load(x.omega)  # (m, D)
    ratio = omega.shape[0] ** -0.5
    # (1) Inputs scaled by d^−¼, projected on ω, with half their squared norms.
    q = num.store(d**-0.25 * num.load(x.q))  # (B, Hq, Nq, D)
    k = num.store(d**-0.25 * repeat_kv_heads(num.load(x.k), x.shape.group))  # (B, Hq, Nk, D)
    q_proj = num.store(np.einsum("bhqd,fd->bhqf", q, omega, optimize=True))  # (B, Hq, Nq, m)
    k_proj = num.store(np.einsum("bhkd,fd->bhkf", k, omega, optimize=True))  # (B, Hq, Nk, m)
    q_half = num.store(0.5 * np.sum(q * q, axis=-1, keepdims=True))  # (B, Hq, Nq, 1)
    k_half = num.store(0.5 * np.sum(k * k, axis=-1, keepdims=True))  # (B, Hq, Nk, 1)
    # (2) Stabilisers (constants: no gradient flows through them).
    q_level = q_proj.max(axis=-1, keepdims=True) if x.query_stabilizer == "row" else 0.0
    key_max = k_proj.max(axis=-1)  # (B, Hq, Nk)
    k_level = {
        "none": np.zeros_like(key_max),
        "global": np.broadcast_to(key_max.max(axis=-1, keepdims=True), key_max.shape),
        "prefix": np.maximum.accumulate(key_max, axis=-1),
    }[x.key_stabilizer]
    # (3) Features.
    q_exp = num.store(np.exp(q_proj - q_half - q_level))  # (B, Hq, Nq, m)
    phi_q = num.store(ratio * (q_exp + x.feature_eps))
    kappa = num.store(np.exp(k_proj - k_half - k_level[..., None]))  # (B, Hq, Nk, m)
    return dict(q=q, k=k, omega=omega, ratio=ratio, q_exp=q_exp, phi_q=phi_q, kappa=kappa, k_level=k_level)


def chain_features(x: PerformerInputs, s: dict, d_phi_q: np.ndarray, d_kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps (3')-(1'): dq (B, Hq, Nq, D) and dk (B, Hkv, Nk, D) from the feature gradients."""
    d = x.shape.head_dim
    d_qproj = d_phi_q * s["ratio"] * s["q_exp"]  # (B, Hq, Nq, m); the stabiliser is a constant
    d_kproj = d_kappa * s["kappa"]
    dq = np.einsum("bhqf,fd->bhqd", d_qproj, s["omega"]) - d_qproj.sum(axis=-1, keepdims=True) * s["q"]
    dk = np.einsum("bhkf,fd->bhkd", d_kproj, s["omega"]) - d_kproj.sum(axis=-1, keepdims=True) * s["k"]
    return d**-0.25 * dq, sum_kv_heads(d**-0.25 * dk, x.shape.group)


# --------------------------------------------------------------------------
# The reference backend: steps (4)-(6) through the implied matrix.
# --------------------------------------------------------------------------


def _implied(x: PerformerInputs, s: dict, num: Numerics) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step (4): Â (B, Hq, Nq, Nk) = m^−½ [(φ(q) κᵀ) ⊙ G + ε Σ_f φ(q)], G_ij = e^{L_j − L_i} on allowed pairs."""
    nq, nk = x.shape.q_len, x.shape.kv_len
    allowed = np.tril(np.ones((nq, nk), bool)) if x.causal else np.ones((nq, nk), bool)
    level = s["k_level"]  # (B, Hq, Nk); for "prefix" L_i is the level at key i = query i
    growth = np.where(allowed, np.exp(np.minimum(level[..., None, :] - level[..., :, None], 0.0)) if x.key_stabilizer == "prefix"
                      else 1.0, 0.0)  # fmt: skip
    phi_sum = s["phi_q"].sum(axis=-1)  # (B, Hq, Nq)
    products = np.einsum("bhqf,bhkf->bhqk", s["phi_q"], s["kappa"], optimize=True)
    implied = num.store(s["ratio"] * (products * growth + x.feature_eps * phi_sum[..., None] * allowed))
    return implied, growth, allowed


def forward(x: PerformerInputs, num: Numerics) -> Result:
    """The reference backend: steps (1)-(6) in precision ``num``."""
    return Result(out=_forward_steps(x, num)["out"], lse=None, aux={})


def _forward_steps(x: PerformerInputs, num: Numerics) -> dict:
    s = features(x, num)
    v = repeat_kv_heads(num.load(x.v), x.shape.group)  # (B, Hq, Nk, Dv)
    implied, growth, allowed = _implied(x, s, num)
    # (5) Numerator Â V and denominator Â 1 (+ δ Σ_f φ(q)), with the guard.
    numerator = num.store(implied @ v)  # (B, Hq, Nq, Dv)
    denominator = implied.sum(axis=-1) + x.denominator_feature_eps * s["phi_q"].sum(axis=-1)
    denominator = num.store(denominator + 2 * x.denominator_guard * (np.abs(denominator) <= x.denominator_guard))
    # (6) out = numerator / denominator.
    s.update(v=v, implied=implied, growth=growth, allowed=allowed, denominator=denominator)
    s["out"] = num.store(numerator / denominator[..., None])
    return s


def implied_attention(q, k, v, *, omega, causal=False, preset=None, **options) -> np.ndarray:
    """The row-normalised matrix (B, Hq, Nq, Nk) whose product with V is the output (for the distance diagnostic)."""
    from ...core.precision import FLOAT64

    x = check_inputs(q, k, v, omega=omega, causal=causal, preset=preset,
                     **{name: options.get(name, FROM_PRESET) for name in PRESETS[None]})  # fmt: skip
    s = _forward_steps(x, FLOAT64)
    return s["implied"] / s["denominator"][..., None]


def vjp(x: PerformerInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (6')-(1') in precision ``num``."""
    s = _forward_steps(x, num)
    dout = num.load(cotangents.dout)
    # (6') out = n / D.
    d_numerator = dout / s["denominator"][..., None]  # (B, Hq, Nq, Dv)
    d_denominator = -np.sum(d_numerator * s["out"], axis=-1)  # (B, Hq, Nq)
    # (5') n = Â V, D = Â 1 + δ Σ_f φ(q) (the guard's step has slope 1).
    dv = np.swapaxes(s["implied"], -1, -2) @ d_numerator
    d_implied = (d_numerator @ np.swapaxes(s["v"], -1, -2) + d_denominator[..., None]) * s["allowed"]
    # (4') Â = m^−½ [(φ(q) κᵀ) ⊙ G + ε Σ_f φ(q)] on allowed pairs.
    weighted = s["ratio"] * d_implied * s["growth"]
    d_phi_q = (np.einsum("bhqk,bhkf->bhqf", weighted, s["kappa"])
               + s["ratio"] * x.feature_eps * d_implied.sum(axis=-1, keepdims=True)
               + x.denominator_feature_eps * d_denominator[..., None])  # fmt: skip
    d_kappa = np.einsum("bhqk,bhqf->bhkf", weighted, s["phi_q"])
    dq, dk = chain_features(x, s, d_phi_q, d_kappa)
    return Grads(q=num.store(dq), k=num.store(dk), v=num.store(sum_kv_heads(dv, x.shape.group)))
