"""Dense scaled dot-product attention: the executable specification.

Vaswani et al. 2017, "Attention Is All You Need", eq. (1), with the options
FlashAttention (Dao et al. 2022; Dao 2023) and the ONNX ``Attention`` operator
made standard: masks, causal alignment, sliding windows, grouped-query heads,
logit soft-capping (Gemma 2), additive bias and a dropout keep-mask.

Equations and their numbers are in spec/dense.md; step numbers below match.

Einsum letters: b batch, h query head, q query position, k key position,
d head dim (of q and k), e value dim.
"""

from __future__ import annotations

import numpy as np

from ..core import registry
from ..core.precision import Numerics
from ..core.results import Cotangents, Grads, Result
from ..core.shapes import repeat_kv_heads, sum_kv_heads, sum_to_shape
from ..core.softcap import softcap, softcap_slope
from ..core.softmax import masked_softmax
from .inputs import DenseInputs


def dense_attention(
    q, k, v, *,
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Scaled dot-product attention ``softmax(mask(bias + cap(scale * q kᵀ))) v``.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
        ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
    v : ndarray (B, Hkv, Nk, Dv)
    mask : bool ndarray broadcastable to (B, Hq, Nq, Nk), optional
        ``True`` = may attend.
    bias : float ndarray broadcastable to (B, Hq, Nq, Nk), optional
        Added to the (soft-capped) scores before masking.
    causal : bool
        Keep keys at or before the query's aligned position.
    causal_alignment : {"bottom_right", "top_left"}
        How queries align with keys when ``Nq != Nk`` (also used by ``window``).
    window : (left, right) or None
        Keep keys ``i' - left <= j <= i' + right``; a side may be None (unbounded).
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.
    softcap : float >= 0
        ``c``: scores become ``c * tanh(s / c)``; 0 disables.
    dropout_keep : bool ndarray broadcastable to (B, Hq, Nq, Nk), optional
        Which weights survive dropout; required when ``dropout_p > 0``.
    dropout_p : float in [0, 1)
        Kept weights are divided by ``1 - dropout_p``.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), both float64; a fully
        masked row has out 0 and lse ``-inf``. ``aux`` is empty.
    """
    return registry.call_forward("dense", locals())


def forward(x: DenseInputs, num: Numerics) -> Result:
    """The reference backend: steps (1)-(7) in precision ``num``."""
    steps = _forward_steps(x, num)
    return Result(out=steps["out"], lse=steps["lse"], aux={})


def scores_to_weights(scores: np.ndarray, x: DenseInputs, num: Numerics):
    """Steps (2)-(6) from the scaled scores (B, Hq, Nq, Nk): the weights, the lse (B, Hq, Nq) and the
    weights after dropout. Mechanisms that only change the scores (Shaw's relative keys) share them."""
    # (2) Soft-capping c * tanh(s / c), before bias and mask (Gemma 2's order).
    capped = num.store(softcap(scores, x.softcap)) if x.softcap > 0 else scores
    # (3) Additive bias (position biases, user bias).
    logits = capped if x.bias is None else num.store(capped + num.load(x.bias))
    # (4)-(5) Mask (exactly -inf), softmax and its log-sum-exp.
    weights, lse = masked_softmax(logits, x.allowed(), num)  # (B, Hq, Nq, Nk), (B, Hq, Nq)
    # (6) Dropout: keep-mask, survivors scaled by 1 / (1 - p).
    dropped = weights
    if x.dropout_keep is not None:
        dropped = num.store(np.where(x.dropout_keep, weights / (1.0 - x.dropout_p), 0.0))
    return weights, lse, dropped


def _forward_steps(x: DenseInputs, num: Numerics) -> dict:
    """Steps (1)-(7) of spec/dense.md; returns every intermediate the VJP needs."""
    group = x.shape.group
    q = num.load(x.q)  # (B, Hq, Nq, D)
    k = repeat_kv_heads(num.load(x.k), group)  # (B, Hq, Nk, D)
    v = repeat_kv_heads(num.load(x.v), group)  # (B, Hq, Nk, Dv)

    # (1) Scaled scores.
    scores = num.store(x.scale * np.einsum("bhqd,bhkd->bhqk", q, k, optimize=True))  # (B, Hq, Nq, Nk)
    # (2)-(6) Soft-cap, bias, mask, softmax, dropout.
    weights, lse, dropped = scores_to_weights(scores, x, num)
    # (7) Weighted sum of values.
    out = num.store(np.einsum("bhqk,bhke->bhqe", dropped, v, optimize=True))  # (B, Hq, Nq, Dv)
    return dict(q=q, k=k, v=v, scores=scores, weights=weights, dropped=dropped, lse=lse, out=out)


dense_attention_vjp = registry.vjp_function(
    dense_attention, "dense", grads="""    ``q``, ``k``, ``v`` (shapes of the inputs) and ``bias`` (the bias's own
    shape, broadcast axes summed) when a bias was given. Masks and the
    keep-mask are not differentiable. Fully masked rows contribute 0.""",
)


def vjp(x: DenseInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (7')-(1') in precision ``num``."""
    f = _forward_steps(x, num)
    dout, dlse = cotangents.dout, cotangents.dlse
    dout = num.load(dout)  # (B, Hq, Nq, Dv)

    # (7') out = D v, with D the dropped weights.
    dv_per_q_head = num.store(np.einsum("bhqk,bhqe->bhke", f["dropped"], dout, optimize=True))  # (B, Hq, Nk, Dv)
    d_dropped = num.store(np.einsum("bhqe,bhke->bhqk", dout, f["v"], optimize=True))  # (B, Hq, Nq, Nk)
    # (6') D = P * keep / (1 - p).
    d_weights = d_dropped
    if x.dropout_keep is not None:
        d_weights = num.store(np.where(x.dropout_keep, d_dropped / (1.0 - x.dropout_p), 0.0))
    # (5') Softmax and lse: dS = P * (dP - sum_k P dP) + P * dlse. Masked
    #      entries and fully masked rows have P = 0 and so get 0.
    p = f["weights"]
    row_dot = num.store(np.sum(p * d_weights, axis=-1, keepdims=True))  # (B, Hq, Nq, 1)
    d_logits = p * (d_weights - row_dot)
    if dlse is not None:
        d_logits = d_logits + p * num.load(dlse)[..., None]
    d_logits = num.store(d_logits)  # (B, Hq, Nq, Nk)
    # (3') The bias gradient is dS summed over the axes the bias was broadcast along.
    grads = Grads()
    # (2') Soft-cap: d/ds [c tanh(s/c)] = 1 - tanh²(s/c) = sech²(s/c), formed without cancellation.
    d_scores = d_logits
    if x.softcap > 0:
        d_scores = num.store(d_logits * softcap_slope(f["scores"], x.softcap))
    # (1') s = scale * q kᵀ.
    dq = num.store(x.scale * np.einsum("bhqk,bhkd->bhqd", d_scores, f["k"], optimize=True))
    dk_per_q_head = num.store(x.scale * np.einsum("bhqk,bhqd->bhkd", d_scores, f["q"], optimize=True))
    # GQA: a kv head's gradient is the sum over the query heads that read it.
    group = x.shape.group
    # (The sums over heads and broadcast axes are exact-ish float64 sums, not part of the emulated precision.)
    grads["q"] = dq.astype(np.float64)
    grads["k"] = sum_kv_heads(dk_per_q_head.astype(np.float64), group)
    grads["v"] = sum_kv_heads(dv_per_q_head.astype(np.float64), group)
    if x.bias is not None:
        grads["bias"] = sum_to_shape(d_logits.astype(np.float64), x.bias.shape)
    return grads

