"""Verify PyTorch's ``scaled_dot_product_attention`` against refattn's dense cases.

``sdpa`` maps refattn's dense parameters onto SDPA: the mask, causality and
window become one boolean ``attn_mask`` (True = may attend, as in refattn),
a bias becomes a float ``attn_mask`` with ``-inf`` where masked, top-left
causal attention uses SDPA's own ``is_causal=True``, and grouped-query heads
use ``enable_gqa=True``. SDPA returns no log-sum-exp, so the wrapper computes
it from the same scores with ``torch.logsumexp``; the verifier needs it to
check the gradients, whose expected values include the lse's cotangent.

SDPA has no logit soft-cap and draws its own dropout mask, so the cases with
``softcap`` or a given ``dropout_keep`` raise ``NotImplementedError``
(``unsupported``, listed but not a failure). From the repository root::

    refattn verify --impl examples/torch_sdpa.py:sdpa --mechanism dense --dtype float32 --grad

exits 0. Two deliberately wrong variants show what a failure looks like:

* ``sdpa_top_left`` hands every causal case to ``is_causal=True``, which
  aligns top-left, so bottom-right cases with Nq != Nk fail
  (flag ``CAUSAL_ALIGNMENT``);
* ``sdpa_tiled_gqa`` repeats kv heads by tiling (``k.repeat``), so query
  head h reads kv head h % Hkv instead of h // (Hq // Hkv) (``GQA_HEAD_MAP``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from _gallery_entry import Entry
from refattn.conformance.adapters import from_torch


def attention(q, k, v, *, mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
              scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, tile_kv_heads=False):  # fmt: skip
    """refattn's dense attention on torch tensors (B, H, N, D), computed by SDPA; returns (out, lse)."""
    if softcap > 0:
        raise NotImplementedError("SDPA has no logit soft-cap")
    if dropout_keep is not None:
        raise NotImplementedError("SDPA draws its own dropout mask; it cannot apply a given keep-mask")
    group = q.shape[1] // k.shape[1]
    if tile_kv_heads:  # the wrong GQA head map of sdpa_tiled_gqa
        k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
    allowed = _position_mask(q.shape[2], k.shape[2], causal, causal_alignment, window, q.device)
    if mask is not None:
        allowed = mask if allowed is None else mask & allowed
    use_is_causal = causal and causal_alignment == "top_left" and window is None and mask is None and bias is None
    attn_mask = None if use_is_causal else _attn_mask(allowed, bias)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=use_is_causal, scale=scale, enable_gqa=not tile_kv_heads
    )
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # the GQA rule, for the lse only
    return out, _logsumexp(q, keys, allowed, bias, scale)


def attention_top_left(q, k, v, *, causal_alignment="bottom_right", **params):
    """Wrong: every causal case goes to SDPA's ``is_causal=True``, which is aligned top-left."""
    return attention(q, k, v, causal_alignment="top_left", **params)


def attention_tiled_gqa(q, k, v, **params):
    """Wrong: kv heads repeated by tiling, so query head h reads kv head h % Hkv."""
    return attention(q, k, v, tile_kv_heads=True, **params)


def _position_mask(q_len, kv_len, causal, alignment, window, device):
    """(Nq, Nk) bool from causality and a window (refattn's definition), or None."""
    if not causal and window is None:
        return None
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len if alignment == "bottom_right" else 0)
    j = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= j >= i - left
        if right is not None:
            allowed &= j <= i + right
    return allowed


def _attn_mask(allowed, bias):
    """SDPA's ``attn_mask``: the bool mask, or the bias with -inf where masked."""
    if bias is None or allowed is None:
        return allowed if bias is None else bias
    return torch.where(allowed, bias, -math.inf)


def _logsumexp(q, keys, allowed, bias, scale):
    """Natural-log lse of the final masked logits (B, H, Nq); -inf on a fully masked row, with finite gradients."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = scale * q @ keys.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    if allowed is None:
        return torch.logsumexp(logits, dim=-1)
    allowed = allowed.expand(logits.shape)
    has_key = allowed.any(dim=-1)
    lse = torch.logsumexp(torch.where(allowed, logits, -math.inf).where(has_key[..., None], 0.0), dim=-1)
    return torch.where(has_key, lse, -math.inf)


sdpa = from_torch(attention)
sdpa_top_left = from_torch(attention_top_left)
sdpa_tiled_gqa = from_torch(attention_tiled_gqa)


GALLERY = (
    Entry("torch", "torch.nn.functional.scaled_dot_product_attention", "sdpa", "dense", "float32", True),
    Entry("torch", "torch.nn.functional.scaled_dot_product_attention", "sdpa", "dense", "float64", True),
)
#: SDPA passes every dense case it can express.
EXPLANATIONS: dict[str, str] = {}
