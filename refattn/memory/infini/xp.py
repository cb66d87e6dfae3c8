"""Infini-attention over an array namespace ``xp`` (NumPy or CuPy): the GPU path.

Steps (I1)-(I4) of spec/memory.md per segment, as refattn/memory/infini/reference.py
takes them, written over ``xp`` in the compute dtype (float32 for float32 or
narrower inputs, float64 otherwise, as the Numba backend): the memory's writes
and reads are (D, Dv) products per segment, and the local causal attention (I3)
is dense attention's tiled algorithm (refattn/dense/xp.py). Memory is
O(segment + D·Dv) per head; the final memory and norm (``aux``) stay on the
device until the backend returns.

Shape letters: B batch, H head, n segment token, D head dim, Dv value dim.
"""

from __future__ import annotations

from ...core.results import Cotangents, Grads, Result
from ...core.xp import compute_dtype
from ...dense import xp as dense_xp
from .. import streaming
from .reference import InfiniInputs

#: Its streaming steps are the reference's, on the host: device inputs come back for them (core/xp.py).
STEPS_ON_HOST = True

BLOCK_Q, BLOCK_K = dense_xp.BLOCK_Q, dense_xp.BLOCK_K  # tiles of the local attention (I3)


def _t(a, xp):
    """The last two axes swapped."""
    return xp.swapaxes(a, -1, -2)


def _features(a, feature_map: str, xp):
    """σ(a): ELU(a) + 1 = a + 1 for a > 0, exp(a) otherwise; or a itself."""
    if feature_map == "identity":
        return a
    return xp.where(a > 0, a + 1.0, xp.exp(xp.minimum(a, 0.0)))


def _feature_slope(a, feature_map: str, xp):
    """σ'(a): 1 for a > 0, exp(a) otherwise; or 1."""
    if feature_map == "identity":
        return xp.ones_like(a)
    return xp.where(a > 0, 1.0, xp.exp(xp.minimum(a, 0.0)))


def _retrieve(phi, memory, norm, eps: float, xp):
    """``φ M / (φ z + ε)`` per row, 0 where the denominator is exactly 0: the retrieval (B, H, n, Dv) and
    the denominator (B, H, n), for ``phi`` (B, H, n, D), ``memory`` (B, H, D, Dv), ``norm`` (B, H, D)."""
    denominator = (phi @ norm[..., None])[..., 0] + eps
    live = denominator != 0
    return xp.where(live[..., None], (phi @ memory) / xp.where(live, denominator, 1.0)[..., None], 0.0), denominator


def _retrieve_vjp(d_read, read, denominator, phi, memory, norm, xp):
    """Adjoint of :func:`_retrieve`: the gradients of ``phi``, ``memory`` and ``norm``."""
    live = (denominator != 0)[..., None]
    d_numerator = xp.where(live, d_read / xp.where(live, denominator[..., None], 1.0), 0.0)  # (B, H, n, Dv)
    d_denominator = -(d_numerator * read).sum(axis=-1)  # (B, H, n)
    d_phi = d_numerator @ _t(memory, xp) + d_denominator[..., None] * norm[:, :, None, :]
    return d_phi, _t(phi, xp) @ d_numerator, (_t(phi, xp) @ d_denominator[..., None])[..., 0]


def _sum_groups(a, group: int):
    """Adjoint of repeating each kv head ``group`` times along axis 1."""
    return a.reshape((a.shape[0], a.shape[1] // group, group) + a.shape[2:]).sum(axis=2)


class _Stream:
    """The checked inputs on the device in the compute dtype."""

    def __init__(self, x: InfiniInputs, xp):
        self.x, self.xp, self.dtype = x, xp, compute_dtype(x.q.dtype)
        self.q, self.k, self.v = (xp.asarray(a, dtype=self.dtype) for a in (x.q, x.k, x.v))
        self.gate = (1.0 / (1.0 + xp.exp(-xp.asarray(x.beta, dtype=self.dtype))))[None, :, None, None]  # (1, Hq, 1, 1)

    def local(self, segment: slice):
        """(I3)'s dense problem, causal attention within the segment, checked as the reference checks it."""
        x = self.x
        arguments = dict(q=x.q[:, :, segment], k=x.k[:, :, segment], v=x.v[:, :, segment], causal=True, scale=x.scale)
        return streaming.checked_inputs("dense", arguments)[1]

    def segment(self, segment: slice, memory, norm) -> dict:
        """Steps (I1)-(I4) of one segment with the incoming ``memory`` and ``norm``; every intermediate."""
        x, xp, group = self.x, self.xp, self.x.shape.group
        q, k, v = self.q[:, :, segment], self.k[:, :, segment], self.v[:, :, segment]
        phi_q, phi_k = _features(q, x.feature_map, xp), _features(k, x.feature_map, xp)  # (B, Hq, n, D), (B, Hkv, n, D)
        # (I1) What the segment writes: V (linear), or V minus what the memory already returns for σ(K) (delta).
        recalled = denominator_k = None
        written = v
        if x.update == "delta":
            recalled, denominator_k = _retrieve(phi_k, memory, norm, x.eps, xp)
            written = v - recalled
        new_memory = memory + _t(phi_k, xp) @ written  # (B, Hkv, D, Dv)
        new_norm = norm + phi_k.sum(axis=2)  # (B, Hkv, D)
        # (I2) Retrieval from M_{s-1} (or, update_first, from M_s), heads repeated for the query groups.
        read_memory, read_norm = (memory, norm) if x.update_order == "retrieve_first" else (new_memory, new_norm)
        read_memory_q, read_norm_q = xp.repeat(read_memory, group, axis=1), xp.repeat(read_norm, group, axis=1)
        a_mem, denominator_q = _retrieve(phi_q, read_memory_q, read_norm_q, x.eps, xp)  # (B, Hq, n, Dv)
        # (I3) Local causal attention within the segment.
        a_dot = dense_xp.attend(self.local(segment), xp, (BLOCK_Q, BLOCK_K))[0]
        # (I4) The gate: sigmoid(β) of the memory, the rest local.
        out = self.gate * a_mem + (1.0 - self.gate) * a_dot
        return dict(q=q, k=k, phi_q=phi_q, phi_k=phi_k, written=written, recalled=recalled, denominator_k=denominator_k,
                    new_memory=new_memory, new_norm=new_norm, read_memory_q=read_memory_q, read_norm_q=read_norm_q,
                    a_mem=a_mem, denominator_q=denominator_q, a_dot=a_dot, out=out)  # fmt: skip


def forward(x: InfiniInputs, xp) -> Result:
    """Steps (I1)-(I4) over every segment."""
    s = _Stream(x, xp)
    memory, norm = xp.asarray(x.memory, dtype=s.dtype), xp.asarray(x.norm, dtype=s.dtype)
    outs = []
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        f = s.segment(segment, memory, norm)
        outs.append(f["out"])
        memory, norm = f["new_memory"], f["new_norm"]
    return Result(out=xp.concatenate(outs, axis=2), lse=None, aux={"memory": memory, "norm": norm})


def vjp(x: InfiniInputs, cotangents: Cotangents, xp, saved: Result | None = None) -> Grads:
    """(I4')-(I1') per segment with the incoming memory held fixed, summed over the segments."""
    s = _Stream(x, xp)
    group, gate = x.shape.group, s.gate
    memory, norm = xp.asarray(x.memory, dtype=s.dtype), xp.asarray(x.norm, dtype=s.dtype)
    dout = xp.asarray(cotangents.dout, dtype=s.dtype)
    dq, dk, dv, dbeta = [], [], [], 0.0
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        f = s.segment(segment, memory, norm)
        d_out = dout[:, :, segment]  # (B, Hq, n, Dv)
        # (I4') The gate: dβ = Σ dA (A_mem − A_dot) g (1 − g).
        dbeta = dbeta + (d_out * (f["a_mem"] - f["a_dot"]) * gate * (1.0 - gate)).sum(axis=(0, 2, 3))
        # (I3') Local attention's VJP for (1 − g) dA.
        local = dense_xp.attend_vjp(s.local(segment), Cotangents((1.0 - gate) * d_out, None), xp, (BLOCK_Q, BLOCK_K))
        grad_q, grad_k, grad_v = local["q"], local["k"], local["v"]
        # (I2') The retrieval's VJP for g dA.
        d_phi_q, d_read_memory, d_read_norm = _retrieve_vjp(gate * d_out, f["a_mem"], f["denominator_q"], f["phi_q"],
                                                            f["read_memory_q"], f["read_norm_q"], xp)  # fmt: skip
        grad_q = grad_q + d_phi_q * _feature_slope(f["q"], x.feature_map, xp)
        # (I1') With update_first the segment's keys and values reach the output through M_s and z_s.
        if x.update_order == "update_first":
            d_memory, d_norm = _sum_groups(d_read_memory, group), _sum_groups(d_read_norm, group)
            d_phi_k = f["written"] @ _t(d_memory, xp) + d_norm[:, :, None, :]
            d_written = f["phi_k"] @ d_memory  # (B, Hkv, n, Dv)
            grad_v = grad_v + d_written
            if x.update == "delta":  # written = v − retrieve(σ(K), M_{s-1}, z_{s-1}); M_{s-1} is fixed
                d_phi_k = d_phi_k + _retrieve_vjp(-d_written, f["recalled"], f["denominator_k"], f["phi_k"], memory,
                                                  norm, xp)[0]  # fmt: skip
            grad_k = grad_k + d_phi_k * _feature_slope(f["k"], x.feature_map, xp)
        dq.append(grad_q)
        dk.append(grad_k)
        dv.append(grad_v)
        memory, norm = f["new_memory"], f["new_norm"]
    return Grads(q=xp.concatenate(dq, axis=2), k=xp.concatenate(dk, axis=2), v=xp.concatenate(dv, axis=2), beta=dbeta)
