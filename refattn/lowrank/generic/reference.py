"""Generic low-rank attention ``U (W V) ⊘ U (W 1)``: the executable specification.

The form every kernelised or landmark attention reduces to (spec/low_rank.md,
"Generic low-rank attention"): the (Nq, Nk) attention matrix is never formed,
only its factors ``U`` (Nq, r) and ``W`` (r, Nk). Performer is the normalised
form with ``U = φ(Q)``, ``W = φ(K)ᵀ`` (Choromanski et al. 2021, eq. 5);
Nyströmformer the unnormalised form with ``U = kernel₁ Z⁺``, ``W = kernel₃``
(Xiong et al. 2021, eq. 15).

Einsum letters: b batch, h head, q query position, k key position, r rank
(factor dimension), e value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result


def lowrank_attention(u, w, v, *, normalized=True, precision=None, backend="reference") -> Result:
    """Attention through low-rank factors: ``out = U (W V) ⊘ U (W 1)``, or ``U (W V)``.

    Parameters
    ----------
    u : ndarray (B, H, Nq, r)
        Left factor: one r-vector per query.
    w : ndarray (B, H, r, Nk)
        Right factor: one r-vector per key (columns).
    v : ndarray (B, H, Nk, Dv)
    normalized : bool
        ``True``: divide each output row by ``Σ_j (U W)_ij`` (the implied
        matrix's row sum), which must not be 0 in any row; ``False``: the
        plain product ``U (W V)`` (Nyströmformer's form).

    Returns
    -------
    Result
        ``out`` (B, H, Nq, Dv), float64. ``lse`` is None (no softmax is
        taken); ``aux`` is empty.
    """
    return registry.call_forward("lowrank", locals())


lowrank_attention_vjp = registry.vjp_function(
    lowrank_attention, "lowrank", grads="""    ``u`` (B, H, Nq, r), ``w`` (B, H, r, Nk) and ``v`` (B, H, Nk, Dv).""",
)


@dataclass(frozen=True)
class LowRankInputs:
    """Checked u (B, H, Nq, r), w (B, H, r, Nk), v (B, H, Nk, Dv), in the caller's dtype, and ``normalized``."""

    u: np.ndarray
    w: np.ndarray
    v: np.ndarray
    normalized: bool

    def cotangent_shapes(self) -> dict:
        """``dout`` has the shape of ``out``; there is no ``lse``."""
        return {"dout": self.u.shape[:3] + self.v.shape[3:], "dlse": None}


def check_inputs(u, w, v, *, normalized) -> LowRankInputs:
    """Check every argument of ``lowrank_attention``; raise :class:`SpecError` on the first bad one."""
    for name, x, layout in (("u", u, "(B, H, Nq, r)"), ("w", w, "(B, H, r, Nk)"), ("v", v, "(B, H, Nk, Dv)")):
        if isinstance(x, np.ndarray) and x.ndim != 4:
            raise SpecError(name, f"4 dimensions {layout}", f"shape {x.shape}")
        checks.float_array(x, name)
    if min(u.shape + w.shape + v.shape) == 0:
        raise SpecError("u, w, v", "non-empty dimensions", f"shapes {u.shape}, {w.shape}, {v.shape}")
    if w.shape[:2] != u.shape[:2] or w.shape[2] != u.shape[3]:
        raise SpecError("w", f"(B, H, r, Nk) with (B, H, r) = {u.shape[:2] + u.shape[3:]} (u's batch, heads, rank)",
                        f"shape {w.shape}")  # fmt: skip
    if v.shape[:2] != u.shape[:2] or v.shape[2] != w.shape[3]:
        raise SpecError("v", f"(B, H, Nk, Dv) with (B, H, Nk) = {u.shape[:2] + w.shape[3:]}", f"shape {v.shape}")
    normalized = checks.flag(normalized, "normalized")
    if normalized:
        row_sums = np.einsum("bhqr,bhr->bhq", u.astype(np.float64), w.astype(np.float64).sum(axis=-1))
        if np.any(row_sums == 0):
            bad = tuple(int(i) for i in np.argwhere(row_sums == 0)[0])
            raise SpecError("u, w", "factors whose implied matrix U W has no zero row sum (normalized=True)",
                            f"row sum 0 at (b, h, q) = {bad}")  # fmt: skip
    return LowRankInputs(u, w, v, normalized)


def forward(x: LowRankInputs, num: Numerics) -> Result:
    """The reference backend: steps (1)-(3) in precision ``num``."""
    return Result(out=_forward_steps(x, num)["out"], lse=None, aux={})


def _forward_steps(x: LowRankInputs, num: Numerics) -> dict:
    """Steps (1)-(3) of spec/low_rank.md, "Generic low-rank attention"; every intermediate the VJP needs."""
    u, w, v = num.load(x.u), num.load(x.w), num.load(x.v)  # (B, H, Nq, r), (B, H, r, Nk), (B, H, Nk, Dv)
    # (1) Key summaries: S = W V and the key mass s = W 1.
    summary = num.store(np.einsum("bhrk,bhke->bhre", w, v, optimize=True))  # (B, H, r, Dv)
    # (2) Numerator U S.
    numerator = num.store(np.einsum("bhqr,bhre->bhqe", u, summary, optimize=True))  # (B, H, Nq, Dv)
    steps = dict(u=u, w=w, v=v, summary=summary, out=numerator)
    if x.normalized:
        # (3) Row normaliser U s and the division.
        key_mass = num.store(w.sum(axis=-1))  # (B, H, r)
        denominator = num.store(np.einsum("bhqr,bhr->bhq", u, key_mass, optimize=True))  # (B, H, Nq)
        steps.update(key_mass=key_mass, denominator=denominator, out=num.store(numerator / denominator[..., None]))
    return steps


def vjp(x: LowRankInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (3')-(1') in precision ``num``."""
    f = _forward_steps(x, num)
    dout = num.load(cotangents.dout)  # (B, H, Nq, Dv)
    d_numerator = dout
    if x.normalized:
        # (3') out = n / δ: dn = dout / δ, dδ = -Σ_e dout · out / δ.
        d_numerator = num.store(dout / f["denominator"][..., None])
        d_denominator = num.store(-np.sum(d_numerator * f["out"], axis=-1))  # (B, H, Nq)
    # (2') n = U S.
    du = np.einsum("bhqe,bhre->bhqr", d_numerator, f["summary"], optimize=True)  # (B, H, Nq, r)
    d_summary = num.store(np.einsum("bhqr,bhqe->bhre", f["u"], d_numerator, optimize=True))  # (B, H, r, Dv)
    # (1') S = W V.
    dw = np.einsum("bhre,bhke->bhrk", d_summary, f["v"], optimize=True)  # (B, H, r, Nk)
    dv = num.store(np.einsum("bhrk,bhre->bhke", f["w"], d_summary, optimize=True))  # (B, H, Nk, Dv)
    if x.normalized:
        # (3') δ = U s, s = W 1: dU += dδ sᵀ, ds = Uᵀ dδ, dW += ds 1ᵀ.
        du = du + d_denominator[..., None] * f["key_mass"][:, :, None, :]
        d_key_mass = num.store(np.einsum("bhqr,bhq->bhr", f["u"], d_denominator, optimize=True))  # (B, H, r)
        dw = dw + d_key_mass[..., None]
    return Grads(u=num.store(du), w=num.store(dw), v=dv)
