"""Infini-attention: the executable specification.

Munkhdalai, Faruqui and Gopal 2024, "Leave No Context Behind: Efficient
Infinite Context Transformers with Infini-attention", Sec. 2.1, eqs. (3)-(6).
Each segment's queries read a compressive memory ``M`` (linear attention with
the feature map ``σ = ELU + 1``) and attend locally, causally, within the
segment; a sigmoid gate ``β`` per head mixes the two. The memory is read
*before* the segment is written into it (eq. (3) uses ``M_{s-1}``)::

    A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1} + ε)                       (3)
    M_s   = M_{s-1} + σ(K)ᵀ V,   z_s = z_{s-1} + Σ_t σ(K_t)           (4)
    M_s   = M_{s-1} + σ(K)ᵀ (V − σ(K) M_{s-1} / (σ(K) z_{s-1} + ε))   (5), delta rule
    A     = sigmoid(β) ⊙ A_mem + (1 − sigmoid(β)) ⊙ A_dot             (6)

``ε`` is a parameter (the paper writes none). The stream starts from
``M = 0, z = 0``, so the first segment's denominator is ``0 + ε``; where a
denominator is exactly 0 (``ε = 0`` and nothing written yet) the retrieval is
defined as 0 — what the public replications return for an empty memory
(Beomi/InfiniTransformer ``_retrieve_from_memory`` returns zeros).

No official code exists. Options name where replications differ:
``feature_map="identity"`` (no σ; Beomi/InfiniTransformer before 31c6a70, its
issue #4) and ``update_order="update_first"`` (the segment written before it
is read: the retrieve-after-update bug class).

The output has no log-sum-exp (it is a mixture, not one softmax): ``lse`` is
None. Steps (I1)-(I4) match spec/memory.md. Array letters: b batch, h head
(query head, or kv head for the memory), n token, d key dim, e value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads
from .. import streaming

STATE = ("memory", "norm")
UPDATES = ("linear", "delta")
FEATURE_MAPS = ("elu_plus_one", "identity")
UPDATE_ORDERS = ("retrieve_first", "update_first")


@dataclass(frozen=True)
class InfiniInputs(streaming.StreamInputs):
    """Checked q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), the gate, the initial memory and options."""

    segment_len: int
    beta: np.ndarray  # (Hq,)
    memory: np.ndarray  # (B, Hkv, D, Dv)
    norm: np.ndarray  # (B, Hkv, D)
    update: str
    eps: float
    feature_map: str
    update_order: str
    scale: float

    def cotangent_shapes(self) -> dict:
        """``dout`` (B, Hq, N, Dv); no ``dlse`` (the output has no log-sum-exp)."""
        s = self.shape
        return {"dout": (s.batch, s.q_heads, s.q_len, s.value_dim), "dlse": None}


def check_infini_inputs(q, k, v, *, segment_len, beta, memory, norm, update, eps, feature_map, update_order,
                        scale) -> InfiniInputs:  # fmt: skip
    """Check every argument of ``infini_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = streaming.self_attention_shape(q, k, v)
    segment_len = streaming.segment_length(segment_len, shape.q_len, equal=False)
    if isinstance(beta, np.ndarray) and beta.shape != (shape.q_heads,):
        raise SpecError("beta", f"shape ({shape.q_heads},), one gate per query head", f"shape {beta.shape}")
    beta = checks.float_array(beta, "beta")
    leading = (shape.batch, shape.kv_heads)
    if (memory is None) != (norm is None):
        raise SpecError("memory" if memory is None else "norm", "an array when the other half of the state is given",
                        "None")  # fmt: skip
    if memory is None:
        memory, norm = np.zeros(leading + (shape.head_dim, shape.value_dim)), np.zeros(leading + (shape.head_dim,))
    expected = leading + (shape.head_dim, shape.value_dim)
    if not isinstance(memory, np.ndarray) or memory.shape != expected:
        raise SpecError("memory", f"shape {expected} (B, Hkv, D, Dv)", checks.summary(memory))
    if not isinstance(norm, np.ndarray) or norm.shape != expected[:3]:
        raise SpecError("norm", f"shape {expected[:3]} (B, Hkv, D)", checks.summary(norm))
    memory, norm = checks.float_array(memory, "memory"), checks.float_array(norm, "norm")
    return InfiniInputs(
        q, k, v, shape, segment_len, beta, memory, norm,
        update=checks.choice(update, "update", UPDATES),
        eps=checks.real_number(eps, "eps", minimum=0.0),
        feature_map=checks.choice(feature_map, "feature_map", FEATURE_MAPS),
        update_order=checks.choice(update_order, "update_order", UPDATE_ORDERS),
        scale=checks.scale(scale, shape.head_dim),
    )  # fmt: skip


def infini_attention(
    q, k, v, *,
    segment_len, beta, memory=None, norm=None, update="linear", eps=0.0, feature_map="elu_plus_one",
    update_order="retrieve_first",
    scale=None, precision=None, backend="reference") -> Result:
    """Stream ``q, k, v`` through Infini-attention: compressive linear memory mixed with local attention.

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, Dv)
    segment_len : int >= 1
        Tokens per segment; the last may be shorter.
    beta : ndarray (Hq,)
        Gate logits: the memory's share is ``sigmoid(beta[h])``.
    memory, norm : ndarray (B, Hkv, D, Dv), (B, Hkv, D), optional
        The initial ``M`` and ``z`` (a previous call's ``aux``); None: zeros.
    update : {"linear", "delta"}
        Eq. (4), or the delta rule, eq. (5).
    eps : float >= 0
        Added to every denominator; a denominator of exactly 0 retrieves 0.
    feature_map : {"elu_plus_one", "identity"}
        ``σ``: the paper's ELU + 1, or none (a replication's bug).
    update_order : {"retrieve_first", "update_first"}
        Read ``M_{s-1}`` (the paper) or the memory already holding the segment.
    scale : float > 0, optional
        Local attention's logit scale; default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv); ``lse`` None; ``aux`` the final state
        ``memory`` (B, Hkv, D, Dv) and ``norm`` (B, Hkv, D).
    """
    return registry.call_forward("infini", locals())


infini_attention_vjp = registry.vjp_function(
    infini_attention, "infini", grads="""    ``q``, ``k``, ``v`` (the stream's shapes) and ``beta`` (Hq,): each
    segment's gradient with its incoming memory held fixed (stop-gradient),
    summed over the segments. With ``retrieve_first`` a key and value reach
    the output only through local attention; with ``update_first`` also
    through the memory they were written into.""",
)


def infini_step(state, q, k, v, *, beta, update="linear", eps=0.0, feature_map="elu_plus_one",
                update_order="retrieve_first", scale=None, precision=None, backend="reference"):  # fmt: skip
    """One segment: ``state, out = infini_step(state, q, k, v, ...)``; ``state`` is a previous ``aux`` or None."""
    memory = state or {}
    result = infini_attention(
        q, k, v, segment_len=streaming.step_length(q), beta=beta,
        memory=memory.get("memory"), norm=memory.get("norm"), update=update, eps=eps, feature_map=feature_map,
        update_order=update_order, scale=scale, precision=precision, backend=backend,
    )  # fmt: skip
    return streaming.as_step(result)


# --------------------------------------------------------------------------
# The pieces: feature map, retrieval, and their derivatives.
# --------------------------------------------------------------------------


def features(x: np.ndarray, feature_map: str) -> np.ndarray:
    """σ(x): ELU(x) + 1 = x + 1 for x > 0, exp(x) otherwise (always > 0); or x itself."""
    if feature_map == "identity":
        return x
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def feature_slope(x: np.ndarray, feature_map: str) -> np.ndarray:
    """σ'(x): 1 for x > 0, exp(x) otherwise; or 1."""
    if feature_map == "identity":
        return np.ones_like(x)
    return np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0)))


def retrieve(phi: np.ndarray, memory: np.ndarray, norm: np.ndarray, eps: float, num: Numerics):
    """``φ M / (φ z + ε)`` per row, 0 where the denominator is exactly 0.

    ``phi`` (B, H, n, D) reads ``memory`` (B, H, D, E) and ``norm`` (B, H, D),
    heads already matched. Returns the retrieval (B, H, n, E), the numerator
    and the denominator (B, H, n).
    """
    numerator = num.store(np.einsum("bhnd,bhde->bhne", phi, memory, optimize=True))  # (B, H, n, E)
    denominator = num.store(np.einsum("bhnd,bhd->bhn", phi, norm, optimize=True) + eps)  # (B, H, n)
    safe = np.where(denominator != 0, denominator, 1.0)[..., None]
    return num.store(np.where(denominator[..., None] != 0, numerator / safe, 0.0)), denominator


def retrieve_vjp(d_read, read, denominator, phi, memory, norm, num: Numerics):
    """Adjoint of :func:`retrieve`: the gradients of ``phi``, ``memory`` and ``norm`` (rows with a 0 denominator get 0)."""
    live = (denominator != 0)[..., None]  # (B, H, n, 1)
    safe = np.where(live, denominator[..., None], 1.0)
    d_numerator = num.store(np.where(live, d_read / safe, 0.0))  # (B, H, n, E)
    d_denominator = num.store(-np.sum(d_numerator * read, axis=-1))  # (B, H, n)
    d_phi = num.store(np.einsum("bhne,bhde->bhnd", d_numerator, memory, optimize=True) + d_denominator[..., None] * norm[:, :, None, :])
    d_memory = num.store(np.einsum("bhnd,bhne->bhde", phi, d_numerator, optimize=True))  # (B, H, D, E)
    d_norm = num.store(np.einsum("bhnd,bhn->bhd", phi, d_denominator, optimize=True))  # (B, H, D)
    return d_phi, d_memory, d_norm


def _inner(num: Numerics, backend: str) -> Numerics | None:
    """The precision handed to the local attention: ``num`` for the reference; a kernel computes in its dtype."""
    return num if backend == registry.REFERENCE else None


def _sum_groups(x: np.ndarray, group: int) -> np.ndarray:
    """Adjoint of repeating each kv head ``group`` times along axis 1."""
    return x.reshape((x.shape[0], x.shape[1] // group, group) + x.shape[2:]).sum(axis=2)


# --------------------------------------------------------------------------
# The steps, for any backend of the local attention.
# --------------------------------------------------------------------------


def _segment_steps(x: InfiniInputs, segment: slice, memory, norm, num: Numerics, backend: str) -> dict:
    """Steps (I1)-(I4) of one segment with the incoming ``memory`` and ``norm``; every intermediate."""
    group = x.shape.group
    q, k, v = num.load(x.q[:, :, segment]), num.load(x.k[:, :, segment]), num.load(x.v[:, :, segment])
    phi_q = num.store(features(q, x.feature_map))  # (B, Hq, n, D)
    phi_k = num.store(features(k, x.feature_map))  # (B, Hkv, n, D)
    # (I1) What the segment writes: V (linear), or V minus what the memory already returns for σ(K) (delta).
    recalled = denominator_k = None
    written = v
    if x.update == "delta":
        recalled, denominator_k = retrieve(phi_k, memory, norm, x.eps, num)  # (B, Hkv, n, Dv)
        written = num.store(v - recalled)
    new_memory = num.store(memory + np.einsum("bhnd,bhne->bhde", phi_k, written, optimize=True))  # (B, Hkv, D, Dv)
    new_norm = num.store(norm + phi_k.sum(axis=2))  # (B, Hkv, D)
    # (I2) Retrieval, eq. (3), from M_{s-1} (or, update_first, from M_s).
    read_memory, read_norm = (memory, norm) if x.update_order == "retrieve_first" else (new_memory, new_norm)
    read_memory_q, read_norm_q = repeat_kv_heads(read_memory, group), np.repeat(read_norm, group, axis=1)
    a_mem, denominator_q = retrieve(phi_q, read_memory_q, read_norm_q, x.eps, num)  # (B, Hq, n, Dv)
    # (I3) Local causal attention within the segment (dense attention, on ``backend``).
    local = streaming.attend("dense", _inner(num, backend), backend,
                             q=x.q[:, :, segment], k=x.k[:, :, segment], v=x.v[:, :, segment], causal=True,
                             scale=x.scale)  # fmt: skip
    a_dot = num.load(local.out)  # (B, Hq, n, Dv)
    # (I4) The gate: sigmoid(β) of the memory, the rest local.
    gate = num.store(1.0 / (1.0 + np.exp(-num.load(x.beta))))[None, :, None, None]  # (1, Hq, 1, 1)
    out = num.store(gate * a_mem + (1.0 - gate) * a_dot)  # (B, Hq, n, Dv)
    return dict(q=q, k=k, phi_q=phi_q, phi_k=phi_k, written=written, recalled=recalled, denominator_k=denominator_k,
                new_memory=new_memory, new_norm=new_norm, read_memory_q=read_memory_q, read_norm_q=read_norm_q,
                a_mem=a_mem, denominator_q=denominator_q, a_dot=a_dot, gate=gate, out=out)  # fmt: skip


def stream(x: InfiniInputs, num: Numerics, backend: str) -> Result:
    """Steps (I1)-(I4) over every segment."""
    memory, norm = num.load(x.memory), num.load(x.norm)
    outs = []
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        f = _segment_steps(x, segment, memory, norm, num, backend)
        outs.append(f["out"])
        memory, norm = f["new_memory"], f["new_norm"]
    return Result(out=np.concatenate(outs, axis=2), lse=None, aux={"memory": memory, "norm": norm})


def stream_vjp(x: InfiniInputs, cotangents: Cotangents, num: Numerics, backend: str) -> Grads:
    """(I4')-(I1') per segment with the incoming memory held fixed, summed over the segments."""
    group = x.shape.group
    memory, norm = num.load(x.memory), num.load(x.norm)
    dq, dk, dv, dbeta = [], [], [], 0.0
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        f = _segment_steps(x, segment, memory, norm, num, backend)
        d_out = num.load(cotangents.dout[:, :, segment])  # (B, Hq, n, Dv)
        # (I4') The gate: dβ = Σ dA (A_mem − A_dot) g (1 − g).
        gate = f["gate"]
        dbeta = dbeta + np.sum(d_out * (f["a_mem"] - f["a_dot"]) * gate * (1.0 - gate), axis=(0, 2, 3))
        # (I3') Local attention's VJP for (1 − g) dA.
        local = streaming.attend_vjp("dense", _inner(num, backend), backend, num.store((1.0 - gate) * d_out), None,
                                     q=x.q[:, :, segment], k=x.k[:, :, segment], v=x.v[:, :, segment], causal=True,
                                     scale=x.scale)  # fmt: skip
        grad_q, grad_k, grad_v = (num.load(local[name]) for name in ("q", "k", "v"))
        # (I2') The retrieval's VJP for g dA.
        d_phi_q, d_read_memory, d_read_norm = retrieve_vjp(
            num.store(gate * d_out), f["a_mem"], f["denominator_q"], f["phi_q"], f["read_memory_q"],
            f["read_norm_q"], num,
        )  # fmt: skip
        grad_q = grad_q + d_phi_q * feature_slope(f["q"], x.feature_map)
        # (I1') With update_first the segment's keys and values reach the output through M_s and z_s.
        if x.update_order == "update_first":
            d_memory, d_norm = _sum_groups(d_read_memory, group), _sum_groups(d_read_norm, group)
            d_phi_k = np.einsum("bhne,bhde->bhnd", f["written"], d_memory, optimize=True) + d_norm[:, :, None, :]
            d_written = np.einsum("bhnd,bhde->bhne", f["phi_k"], d_memory, optimize=True)  # (B, Hkv, n, Dv)
            grad_v = grad_v + d_written
            if x.update == "delta":  # written = v − retrieve(σ(K), M_{s-1}, z_{s-1}); M_{s-1} is fixed
                d_phi_k = d_phi_k + retrieve_vjp(-d_written, f["recalled"], f["denominator_k"], f["phi_k"], memory,
                                                 norm, num)[0]  # fmt: skip
            grad_k = grad_k + d_phi_k * feature_slope(f["k"], x.feature_map)
        dq.append(num.store(grad_q))
        dk.append(num.store(grad_k))
        dv.append(num.store(grad_v))
        memory, norm = f["new_memory"], f["new_norm"]
    join = lambda parts: np.concatenate(parts, axis=2)  # noqa: E731
    return Grads(q=join(dq), k=join(dk), v=join(dv), beta=np.asarray(dbeta))


def forward(x: InfiniInputs, num: Numerics) -> Result:
    """The reference backend: (I1)-(I4) in precision ``num``."""
    return stream(x, num, registry.REFERENCE)


def vjp(x: InfiniInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP in precision ``num``."""
    return stream_vjp(x, cotangents, num, registry.REFERENCE)
