"""Run lucidrains' x-transformers attention core (``x_transformers.attend.Attend``) on refattn's dense cases.

``Attend`` is the part of x-transformers' ``Attention`` layer after the
projections: it takes per-head ``q``, ``k``, ``v`` (B, H, N, D), a boolean
``mask`` (True = may attend) and an additive ``attn_bias``, so isolating it
needs no weights (the layer's projections are identities by leaving them
out). ``xt_attention(q, k, v, **params)`` builds ``Attend(causal=...,
scale=..., softclamp_logits=..., logit_softclamp_value=softcap)`` and runs
its forward (the non-flash path, the one that returns intermediates):

* refattn's 2-D masks (Nq, Nk) are given as (1, 1, Nq, Nk): ``Attend``
  reads a 2-D mask as a (B, Nk) key padding mask;
* the log-sum-exp is that of ``Attend``'s own softmax input, its
  ``intermediates.pre_softmax_attn`` (scores after scale, bias, soft-clamp
  and masks), inside the autograd graph, so the gradient check covers ``dlse``.

``Attend`` has no sliding window, no given dropout keep-mask and a causal
mask aligned bottom-right only: those cases raise ``NotImplementedError``
(``unsupported``)::

    refattn verify --mechanism dense --impl examples/x_transformers_attention.py:xt_attention --grad

lucidrains/x-transformers ``x_transformers/attend.py``, version 2.31.10 as installed.
"""

from __future__ import annotations

import torch
from x_transformers.attend import Attend

from _gallery_entry import Entry
from refattn.conformance.adapters import from_torch


def attention(q, k, v, *, mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
              scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0):  # fmt: skip
    """refattn's dense attention on torch tensors (B, H, N, D), computed by ``Attend``; returns (out, lse)."""
    if window is not None:
        raise NotImplementedError("Attend has no sliding window")
    if dropout_keep is not None or dropout_p > 0:
        raise NotImplementedError("Attend draws its own dropout mask; it cannot apply a given keep-mask")
    if causal and causal_alignment == "top_left" and q.shape[2] != k.shape[2]:
        raise NotImplementedError("Attend's causal mask is aligned bottom-right (create_causal_mask)")
    module = Attend(causal=causal, scale=scale, softclamp_logits=softcap > 0, logit_softclamp_value=softcap or 50.0)
    if mask is not None and mask.ndim == 2:
        mask = mask[None, None]  # (Nq, Nk) -> (1, 1, Nq, Nk)
    out, intermediates = module(q, k, v, mask=mask, attn_bias=bias)
    return out, torch.logsumexp(intermediates.pre_softmax_attn, dim=-1)  # (B, H, Nq)


xt_attention = from_torch(attention)

GALLERY = (
    Entry("x-transformers", "x_transformers.attend.Attend", "xt_attention", "dense", "float32", True),
    Entry("x-transformers", "x_transformers.attend.Attend", "xt_attention", "dense", "float64", False),
)

#: x-transformers 2.31.10, x_transformers/attend.py as installed (`Attend.forward` unless named).
EXPLANATIONS = {
    "GQA_HEAD_MAP": "grouped kv heads are repeated by tiling, `repeat(t, 'b kvh n d -> b (r kvh) n d', r = heads // "
    "kv_heads)` (attend.py line 532): query head h reads kv head h % Hkv, not h // (Hq / Hkv).",
    "SOFTCAP_BEFORE_BIAS": "the bias is added before the soft-clamp (`sim = sim + attn_bias`, line 570, then "
    "`sim = softclamp(sim, self.logit_softclamp_value)`, line 573): the bias is capped with the scores.",
    "FULLY_MASKED_ROW": "masked scores are `-torch.finfo(sim.dtype).max` (line 585), not -inf, so the softmax "
    "input of a row with no key has a finite log-sum-exp; and only rows emptied by `mask` are zeroed "
    "(`row_is_entirely_masked = ~mask.any(dim = -1)`, line 601): a row emptied by the causal bound averages every value.",
    "FLOAT64": "the softmax is taken in float32 whatever the input dtype (`partial(softmax_fn, dtype = torch.float32)`, "
    "line 262, `Attend.__init__`): float64 inputs get float32 accuracy.",
}
