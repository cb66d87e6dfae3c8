"""Linformer: the executable specification.

Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity", eq. (7):
each head attends over keys and values projected along the sequence,
``softmax(Q (E K)ᵀ / √d) (F V)``, with E, F (k × N) explicit inputs. It is
dense attention (refattn.dense) over the k projected keys and values, which
is how the reference computes it. Steps match spec/low_rank.md, "Linformer".

Einsum letters: b batch, h kv head, p projected position (k of the paper),
n key position, d head dim, e value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...dense import dense_attention, dense_attention_vjp


def linformer_attention(q, k, v, *, e, f=None, key_padding_mask=None, slice_projections=False, scale=None,
                        causal=False, precision=None, backend="reference") -> Result:  # fmt: skip
    """Linformer attention ``softmax(scale · Q (E K)ᵀ) (F V)``.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
        ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
    v : ndarray (B, Hkv, Nk, Dv)
    e : ndarray (P, Nmax) or (Hkv, P, Nmax)
        The key projection E: one matrix shared by every head (lucidrains'
        and fairseq's default), or one per kv head (the paper's headwise
        sharing). Layer-wise sharing is passing the same array to each layer.
    f : ndarray of e's shape, optional
        The value projection F; ``None`` means key-value sharing, F = E.
    key_padding_mask : bool ndarray (B, Nk), optional
        ``True`` = a real token. Padded keys and values are set to 0 *before*
        projecting, so they contribute nothing to E K and F V.
    slice_projections : bool
        ``True``: inputs shorter than the projections' Nmax use their leading
        ``Nk`` columns (lucidrains slices ``proj[:n]``). ``False``: Nmax must
        equal Nk.
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.
    causal : bool
        Must be False: E and F mix every position, so no projected key is
        free of future tokens (spec/low_rank.md, "Why Linformer cannot be causal").

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), the log-sum-exp of
        the logits over the P projected keys. ``aux`` is empty.
    """
    return registry.call_forward("linformer", locals())


linformer_attention_vjp = registry.vjp_function(
    linformer_attention, "linformer", grads="""    ``q``, ``k``, ``v`` (shapes of the inputs), ``e`` and, when given, ``f``
    (their own shapes; with ``f=None`` the gradient of E includes F's share).""",
)


@dataclass(frozen=True)
class LinformerInputs:
    """Checked inputs; ``e`` and ``f`` are as given (full Nmax columns), ``f`` None under key-value sharing."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    e: np.ndarray
    f: np.ndarray | None
    key_padding_mask: np.ndarray | None
    scale: float
    shape: checks.AttentionShape

    def cotangent_shapes(self) -> dict:
        s = self.shape
        return {"dout": (s.batch, s.q_heads, s.q_len, s.value_dim), "dlse": (s.batch, s.q_heads, s.q_len)}

    def used_columns(self, projection: np.ndarray) -> np.ndarray:
        """(Hkv or 1, P, Nk): the projection's leading Nk columns, with a head axis."""
        projection = projection[..., : self.shape.kv_len]
        return projection if projection.ndim == 3 else projection[None]


def check_inputs(q, k, v, *, e, f, key_padding_mask, slice_projections, scale, causal) -> LinformerInputs:
    """Check every argument of ``linformer_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = checks.qkv(q, k, v)
    if checks.flag(causal, "causal"):
        raise SpecError("causal", "False (Linformer's E and F mix every position, so a projected key already "
                        "contains future tokens: no mask on the projected keys can make it causal)", "True")  # fmt: skip
    slice_projections = checks.flag(slice_projections, "slice_projections")
    for name, projection in (("e", e), ("f", f)):
        if projection is None and name == "f":
            continue
        checks.float_array(projection, name)
        n = shape.kv_len
        if projection.ndim not in (2, 3) or (projection.ndim == 3 and projection.shape[0] != shape.kv_heads):
            raise SpecError(name, f"shape (P, Nmax) or (Hkv={shape.kv_heads}, P, Nmax)", f"shape {projection.shape}")
        if projection.shape[-1] != n and not (slice_projections and projection.shape[-1] > n):
            expected = f"at least Nk = {n} columns" if slice_projections else f"Nk = {n} columns (or slice_projections=True)"
            raise SpecError(name, expected, f"shape {projection.shape}")
    if f is not None and f.shape != e.shape:
        raise SpecError("f", f"e's shape {e.shape} (or None: F = E)", f"shape {f.shape}")
    if key_padding_mask is not None:
        want = (shape.batch, shape.kv_len)
        if not isinstance(key_padding_mask, np.ndarray) or key_padding_mask.dtype != np.bool_ or key_padding_mask.shape != want:
            raise SpecError("key_padding_mask", f"a bool array of shape {want} (True = real token)",
                            f"{type(key_padding_mask).__name__} of shape {getattr(key_padding_mask, 'shape', None)}")  # fmt: skip
    return LinformerInputs(q, k, v, e, f, key_padding_mask, checks.scale(scale, shape.head_dim), shape)


def projected_keys_values(x: LinformerInputs, num: Numerics) -> tuple[np.ndarray, np.ndarray]:
    """Steps (1)-(2): padded keys and values zeroed, then E K (B, Hkv, P, D) and F V (B, Hkv, P, Dv)."""
    k, v = num.load(x.k), num.load(x.v)  # (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)
    # (1) Padded keys and values are zeroed before projecting.
    if x.key_padding_mask is not None:
        keep = x.key_padding_mask[:, None, :, None]
        k, v = np.where(keep, k, 0.0), np.where(keep, v, 0.0)
    e = num.load(x.used_columns(x.e))  # (Hkv or 1, P, Nk)
    f = e if x.f is None else num.load(x.used_columns(x.f))
    # (2) Projection along the sequence.
    k_proj = num.store(np.einsum("hpn,bhnd->bhpd", e, k, optimize=True))  # (B, Hkv, P, D)
    v_proj = num.store(np.einsum("hpn,bhne->bhpe", f, v, optimize=True))  # (B, Hkv, P, Dv)
    return k_proj, v_proj


def forward(x: LinformerInputs, num: Numerics) -> Result:
    """The reference backend: steps (1)-(3) in precision ``num``."""
    k_proj, v_proj = projected_keys_values(x, num)
    # (3) Dense attention of the queries over the P projected keys and values.
    return dense_attention(num.load(x.q), k_proj, v_proj, scale=x.scale, precision=num)


def vjp(x: LinformerInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (3')-(1') in precision ``num``."""
    k_proj, v_proj = projected_keys_values(x, num)
    # (3') Dense attention's own VJP, with respect to q and the projected keys and values.
    dense = dense_attention_vjp(cotangents.dout, num.load(x.q), k_proj, v_proj, dlse=cotangents.dlse,
                                scale=x.scale, precision=num)  # fmt: skip
    return chain_projection(x, dense, num)


def chain_projection(x: LinformerInputs, dense: Grads, num: Numerics) -> Grads:
    """Steps (2')-(1'): from the gradients of (q, E K, F V) to those of q, k, v, e, f."""
    k, v = num.load(x.k), num.load(x.v)
    keep = None if x.key_padding_mask is None else x.key_padding_mask[:, None, :, None]
    if keep is not None:
        k, v = np.where(keep, k, 0.0), np.where(keep, v, 0.0)
    e = num.load(x.used_columns(x.e))
    f = e if x.f is None else num.load(x.used_columns(x.f))
    d_kp, d_vp = num.load(dense["k"]), num.load(dense["v"])  # (B, Hkv, P, D), (B, Hkv, P, Dv)
    # (2') k̃ = E k: dk = Eᵀ dk̃, dE = Σ_b dk̃ kᵀ (summed over heads too when E is shared).
    dk = np.einsum("hpn,bhpd->bhnd", e, d_kp, optimize=True)
    dv = np.einsum("hpn,bhpe->bhne", f, d_vp, optimize=True)
    de = np.einsum("bhpd,bhnd->hpn", d_kp, k, optimize=True).astype(np.float64)
    df = np.einsum("bhpe,bhne->hpn", d_vp, v, optimize=True).astype(np.float64)
    # (1') Padded positions got 0, a constant.
    if keep is not None:
        dk, dv = np.where(keep, dk, 0.0), np.where(keep, dv, 0.0)
    grads = Grads(q=np.asarray(dense["q"], np.float64), k=num.store(dk).astype(np.float64), v=num.store(dv).astype(np.float64))
    grads["e"] = _to_projection_shape(de + df if x.f is None else de, x.e)
    if x.f is not None:
        grads["f"] = _to_projection_shape(df, x.f)
    return grads


def _to_projection_shape(grad: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """(Hkv, P, Nk) summed -> the projection's own shape: heads summed if shared, unused columns 0."""
    grad = grad if projection.ndim == 3 else grad.sum(axis=0)
    full = np.zeros(projection.shape, np.float64)
    full[..., : grad.shape[-1]] = grad
    return full


def implied_attention(q, k, v, *, e, f=None, key_padding_mask=None, slice_projections=False, scale=None) -> np.ndarray:
    """The matrix Â = softmax(scale · Q (E K)ᵀ) F (B, Hq, Nq, Nk) that multiplies V (padded columns 0)."""
    from ...core.precision import FLOAT64
    from ...core.shapes import repeat_kv_heads
    from ...core.softmax import masked_softmax

    x = check_inputs(q, k, v, e=e, f=f, key_padding_mask=key_padding_mask, slice_projections=slice_projections,
                     scale=scale, causal=False)  # fmt: skip
    k_proj, _ = projected_keys_values(x, FLOAT64)
    k_proj = repeat_kv_heads(k_proj, x.shape.group)
    weights, _ = masked_softmax(x.scale * np.einsum("bhqd,bhpd->bhqp", x.q.astype(np.float64), k_proj), None)
    f_used = x.used_columns(x.e if x.f is None else x.f)  # (Hkv or 1, P, Nk)
    f_used = repeat_kv_heads(np.broadcast_to(f_used, (x.shape.kv_heads,) + f_used.shape[1:])[None], x.shape.group)
    implied = weights @ f_used  # (B, Hq, Nq, Nk)
    if x.key_padding_mask is not None:
        implied = implied * x.key_padding_mask[:, None, None, :]
    return implied
