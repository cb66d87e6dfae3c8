"""Cosine attention, the executable specification (cosine.md).

Liu et al. 2022, "Swin Transformer V2", eq. (2): the logit of query i and key
j is their cosine similarity times a positive logit scale,
``softmax(tau · cos(q_i, k_j)) v``. It is dense attention (refattn/dense) on
the L2-normalised q and k with ``scale = tau``, so steps (2)-(3) are dense's
and only the normalisation (1) and its adjoint are this mechanism's own.

Einsum letters: b batch, h head, q query position, k key position, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from refattn.core import checks, registry
from refattn.core.errors import SpecError
from refattn.core.precision import Numerics
from refattn.core.results import Cotangents, Grads, Result
from refattn.dense import reference as dense
from refattn.dense.inputs import DenseInputs, check_dense_inputs


def cosine_attention(q, k, v, *, logit_scale=10.0, eps=1e-12, causal=False, precision=None,
                     backend="reference") -> Result:  # fmt: skip
    """Cosine attention ``softmax(tau · q̂ k̂ᵀ) v`` with ``q̂ = q / max(|q|, eps)``.

    Parameters
    ----------
    q : ndarray (B, H, Nq, D)
    k : ndarray (B, H, Nk, D)
    v : ndarray (B, H, Nk, Dv)
    logit_scale : float > 0
        ``tau``, the logit of two parallel vectors.
    eps : float > 0
        Floor of the norms (a zero vector stays zero).
    causal : bool
        Bottom-right causal mask, as dense attention.
    precision, backend
        As every mechanism (spec/README.md).

    Returns
    -------
    Result
        ``out`` (B, H, Nq, Dv) and ``lse`` (B, H, Nq).
    """
    return registry.call_forward("cosine", locals())


cosine_attention_vjp = registry.vjp_function(
    cosine_attention, "cosine", grads="    ``q``, ``k``, ``v``, of the inputs' shapes."
)


@dataclass(frozen=True)
class CosineInputs:
    """Checked arguments: the dense inputs (q, k, v, causal) and the two numbers."""

    dense: DenseInputs
    logit_scale: float
    eps: float

    def cotangent_shapes(self) -> dict:
        return self.dense.cotangent_shapes()


def check_cosine_inputs(q, k, v, *, logit_scale, eps, causal) -> CosineInputs:
    """Every check of :func:`cosine_attention`; raises :class:`SpecError`."""
    logit_scale = checks.real_number(logit_scale, "logit_scale", minimum=0.0, inclusive=False)
    eps = checks.real_number(eps, "eps", minimum=0.0, inclusive=False)
    x = check_dense_inputs(q, k, v, mask=None, bias=None, causal=causal, causal_alignment="bottom_right",
                           window=None, scale=logit_scale, softcap=0.0, dropout_keep=None, dropout_p=0.0)  # fmt: skip
    if x.shape.group != 1:
        raise SpecError("k", "as many heads as q (cosine attention has no GQA)", f"{x.shape.kv_heads} heads")
    return CosineInputs(x, logit_scale, eps)


def _normalise(x: np.ndarray, eps: float, num: Numerics) -> tuple[np.ndarray, np.ndarray]:
    """(1) ``x / max(|x|, eps)`` per row, and the norms (B, H, N, 1)."""
    norm = np.maximum(np.linalg.norm(num.load(x), axis=-1, keepdims=True), eps)
    return num.store(x / norm), norm


def _dense_on_unit_vectors(x: CosineInputs, num: Numerics) -> tuple[DenseInputs, np.ndarray, np.ndarray]:
    q_unit, q_norm = _normalise(x.dense.q, x.eps, num)  # (B, H, Nq, D)
    k_unit, k_norm = _normalise(x.dense.k, x.eps, num)  # (B, H, Nk, D)
    return replace(x.dense, q=q_unit, k=k_unit), q_norm, k_norm


def forward(x: CosineInputs, num: Numerics) -> Result:
    """(1) normalise q and k; (2)-(3) dense attention with scale tau."""
    unit, _, _ = _dense_on_unit_vectors(x, num)
    return dense.forward(unit, num)


def _normalise_vjp(d_unit: np.ndarray, raw: np.ndarray, norm: np.ndarray, eps: float) -> np.ndarray:
    """(1') Adjoint of ``u = x / |x|``: ``(du - u (u · du)) / |x|``; below ``eps`` it is ``du / eps``."""
    unit = raw / norm
    radial = np.sum(unit * d_unit, axis=-1, keepdims=True)  # (B, H, N, 1)
    return np.where(np.linalg.norm(raw, axis=-1, keepdims=True) > eps, (d_unit - unit * radial) / norm, d_unit / eps)


def vjp(x: CosineInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """(3')-(2') are dense's VJP; (1') takes dq̂, dk̂ through the normalisation."""
    unit, q_norm, k_norm = _dense_on_unit_vectors(x, num)
    grads = dense.vjp(unit, cotangents, num)
    return Grads(
        q=_normalise_vjp(grads["q"], x.dense.q, q_norm, x.eps),
        k=_normalise_vjp(grads["k"], x.dense.k, k_norm, x.eps),
        v=grads["v"],
    )
