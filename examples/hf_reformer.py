"""Run Hugging Face's ``LSHSelfAttention`` (transformers' Reformer) on refattn's LSH vectors.

``hf_lsh(qk, v, **params)`` builds the module from the case's parameters
and runs HF's own forward on the case's arrays:

* **Inputs through the projections.** The module's input is the
  concatenation ``[qk | v]`` of shape (B, N, 2·H·D), and its projections are
  the identity on their half (``query_key = [I 0]``, ``value = [0 I]``), so
  HF's ``query_key_vectors`` and ``value_vectors`` are exactly the case's
  ``qk`` and ``v`` (products with 0 and 1 are exact). The input's gradient is
  ``[dqk | dv]``.
* **Rotations.** HF draws them inside ``_hash_vectors`` with
  ``torch.randn((H, D, R, num_buckets / 2))``. For the duration of the call
  ``torch.randn`` returns the case's rotations in that layout
  (``rotations.transpose(0, 2, 1, 3)``), checked against the requested
  shape, so HF's own hashing (factorised buckets, padding bucket, round
  offsets) runs on them; its returned ``buckets`` and its sort order
  (``sorted_bucket_idx``, recorded) are refattn's ``aux.buckets`` and
  ``aux.permutation``, compared exactly.
* **Log-sum-exp.** HF does not return it. The adapter records the per-round
  log-sum-exps HF computes (the ``logits`` that ``ReverseSort`` unsorts, or
  that ``_attend`` returns on the short-sequence path) and combines them,
  ``logsumexp`` over the rounds, inside the autograd graph, so the gradient
  check covers ``dlse``.

The rest is HF's code: sorting, chunking with look-back and look-ahead,
masks and their constants, the short-sequence rule, the round combination,
and autograd through all of them. HF has one rotation per head for the whole
batch, no duplicate correction, value heads of the query-key size, masks
replaced rather than added, and padding that masks keys only; cases that
need anything else raise ``NotImplementedError`` and are listed in
``examples/hf_reformer.xfail``.

``hf_lsh(qk, v, **params)`` and ``hf_lsh_vjp(dout, qk, v, dlse=..., **params)``
take LSH's shared ``qk``, as refattn's verifier passes it for LSH cases::

    refattn verify --mechanism lsh --impl examples/hf_reformer.py:hf_lsh \
        --vjp examples/hf_reformer.py:hf_lsh_vjp --grad --xfail examples/hf_reformer.xfail

Every "hf" preset case passes in float64
(budget 1e-10) and float32, buckets exactly and gradients included, and so do
the canonical cases whose behaviours HF shares.
"""

from __future__ import annotations

from contextlib import ExitStack
from unittest import mock

import numpy as np
import torch
from transformers import ReformerConfig
from transformers.models.reformer import modeling_reformer

from _gallery_entry import Entry
from _injected_randn import fixed_randn
from refattn.core.results import Result

#: HF's LSHSelfAttention constants in float32 (self_mask_value_float32, mask_value_float32).
HF_SELF_MASK_VALUE = -1e5
HF_MASK_VALUE = -1e9
#: The behaviours HF's LSHSelfAttention cannot change (refattn.lsh.presets.HF).
HF_FIXED = dict(
    key_norm="rms",
    key_norm_eps=1e-6,
    scale=1.0,
    self_mask_value=HF_SELF_MASK_VALUE,
    mask_mode="replace",
    mask_padded_queries=False,
    dup_correction=False,
)


def hf_lsh(qk, v, *, rotations, num_buckets, num_hashes, chunk_len, num_chunks_before, num_chunks_after,
           causal=False, key_padding_mask=None, **behaviours) -> Result:  # fmt: skip
    """HF's LSHSelfAttention forward on a case: ``Result(out, lse, aux={"buckets"})``, NumPy in and out."""
    module, hidden, mask, randn = _setup(qk, v, rotations, num_buckets, num_hashes, chunk_len, num_chunks_before,
                                         num_chunks_after, causal, key_padding_mask, behaviours)  # fmt: skip
    with torch.no_grad():
        out, lse, aux = _run(module, hidden, mask, num_hashes, randn)
    return Result(out=_bhnd(out, qk.shape[1]).numpy(), lse=lse.numpy(), aux={name: a.numpy() for name, a in aux.items()})


def hf_lsh_vjp(dout, qk, v, *, dlse=None, rotations, num_buckets, num_hashes, chunk_len, num_chunks_before,
               num_chunks_after, causal=False, key_padding_mask=None, **behaviours) -> dict:  # fmt: skip
    """Gradients of ``qk`` and ``v`` by autograd through HF's forward (buckets fixed by HF itself)."""
    module, hidden, mask, randn = _setup(qk, v, rotations, num_buckets, num_hashes, chunk_len, num_chunks_before,
                                         num_chunks_after, causal, key_padding_mask, behaviours)  # fmt: skip
    hidden.requires_grad_()
    out, lse, _ = _run(module, hidden, mask, num_hashes, randn)
    loss = (_bhnd(out, qk.shape[1]) * torch.from_numpy(np.asarray(dout)).to(out.dtype)).sum()
    if dlse is not None:
        loss = loss + (lse * torch.from_numpy(np.asarray(dlse)).to(lse.dtype)).sum()
    loss.backward()
    b, h, n, d = qk.shape
    grad = hidden.grad.reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4)  # (2, B, H, N, D)
    return {"qk": grad[0].numpy(), "v": grad[1].numpy()}


def _setup(qk, v, rotations, num_buckets, num_hashes, chunk_len, num_chunks_before, num_chunks_after, causal,
           key_padding_mask, behaviours):  # fmt: skip
    """The module, its input ``[qk | v]``, HF's attention mask and the rotations as HF draws them."""
    b, h, n, d = qk.shape
    _require_expressible(qk, v, rotations, num_hashes, chunk_len, key_padding_mask, behaviours)
    dtype = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}.get(qk.dtype)
    if dtype is None:
        raise NotImplementedError(f"this adapter runs HF in float32 or float64, not {qk.dtype}")
    config = ReformerConfig(
        attention_head_size=d, num_attention_heads=h, hidden_size=2 * h * d, attn_layers=["lsh"],
        lsh_attn_chunk_length=chunk_len, num_hashes=num_hashes,
        num_buckets=list(num_buckets) if isinstance(num_buckets, (list, tuple)) else num_buckets,
        lsh_num_chunks_before=num_chunks_before, lsh_num_chunks_after=num_chunks_after, is_decoder=causal,
        lsh_attention_probs_dropout_prob=0.0, hash_seed=None,
    )  # fmt: skip
    module = modeling_reformer.LSHSelfAttention(config, layer_idx=0).to(dtype).eval()
    with torch.no_grad():
        eye, zero = torch.eye(h * d, dtype=dtype), torch.zeros(h * d, h * d, dtype=dtype)
        module.query_key.weight.copy_(torch.cat([eye, zero], dim=1))
        module.value.weight.copy_(torch.cat([zero, eye], dim=1))
    hidden = torch.cat([_tokens(qk), _tokens(v)], dim=-1).to(dtype)  # (B, N, 2·H·D)
    mask = None if key_padding_mask is None else torch.from_numpy(np.broadcast_to(key_padding_mask, (b, n)).astype(np.int64))
    hf_layout = torch.from_numpy(np.ascontiguousarray(np.transpose(rotations, (0, 2, 1, 3))))  # (H, D, R, P)
    return module, hidden, mask, fixed_randn(hf_layout, "HF")


def _tokens(x: np.ndarray) -> torch.Tensor:
    """(B, H, N, D) -> HF's merged heads (B, N, H·D)."""
    b, h, n, d = x.shape
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, n, h * d)))


def _require_expressible(qk, v, rotations, num_hashes, chunk_len, key_padding_mask, behaviours):
    """Raise NotImplementedError for what HF's LSHSelfAttention cannot compute.

    Three behaviours HF fixes are accepted where the case's value gives the
    same function: ``mask_value=None`` (HF's -1e9 weighs exp(-1e9 + 1e5) = 0
    next to the self entry, which every HF row has), the padding bucket
    ``"if_mask"`` when no mask is given or some token is padded, and
    ``short_sequence="lsh"`` when N > chunk_len.
    """
    n, d = qk.shape[2], qk.shape[3]
    if v.shape[-1] != d:
        raise NotImplementedError("HF's value heads have the query-key head size")
    if rotations.ndim != 4:
        raise NotImplementedError("HF draws one set of rotations per head for the whole batch")
    differing = {name: value for name, value in behaviours.items() if name in HF_FIXED and value != HF_FIXED[name]}
    if differing:
        raise NotImplementedError("HF's LSHSelfAttention fixes " + ", ".join(f"{k}={HF_FIXED[k]!r}" for k in sorted(differing)))
    if behaviours.get("mask_value") not in (None, HF_MASK_VALUE):
        raise NotImplementedError(f"HF masks with {HF_MASK_VALUE}")
    padded = key_padding_mask is not None and not np.all(key_padding_mask)
    if behaviours.get("padding_bucket") not in ("if_padded", "if_mask" if key_padding_mask is None or padded else None):
        raise NotImplementedError("HF adds the padding bucket only when some token of the batch is padded")
    if n <= chunk_len and behaviours.get("short_sequence") != "full":
        raise NotImplementedError("HF runs dense attention when N <= chunk_len")
    if n > chunk_len and (num_hashes * n) % chunk_len:
        raise NotImplementedError("HF reshapes the num_hashes·N sorted items into whole chunks")


def _run(module, hidden, mask, num_hashes, randn):
    """HF's forward; returns out (B, N, H·D), the combined lse (B, H, N) and, on the LSH path, HF's buckets
    (B, H, R, N) and sort order (B, H, R·N, slot -> item r·N + n) as refattn's aux."""
    recorded = {}
    real_reverse_sort, real_attend = modeling_reformer.ReverseSort, module._attend
    real_sort = module._get_sorted_bucket_idx_and_undo_sorted_bucket_idx

    class RecordingReverseSort:
        @staticmethod
        def apply(*args):
            out_vectors, logits = real_reverse_sort.apply(*args)
            recorded["logits"] = logits  # (B, H, R·N), unsorted
            return out_vectors, logits

    def recording_attend(**kwargs):
        out_vectors, logits, probs = real_attend(**kwargs)
        recorded["logits"] = logits  # sorted on the LSH path (replaced by the unsorted ones), (B, H, N, 1) otherwise
        return out_vectors, logits, probs

    def recording_sort(*args, **kwargs):
        sorted_bucket_idx, undo_sorted_bucket_idx = real_sort(*args, **kwargs)
        recorded["permutation"] = sorted_bucket_idx
        return sorted_bucket_idx, undo_sorted_bucket_idx

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch, "randn", randn))
        stack.enter_context(mock.patch.object(module, "_get_sorted_bucket_idx_and_undo_sorted_bucket_idx", recording_sort))
        stack.enter_context(mock.patch.object(modeling_reformer, "ReverseSort", RecordingReverseSort))
        stack.enter_context(mock.patch.object(module, "_attend", recording_attend))
        output = module(hidden, attention_mask=mask, num_hashes=num_hashes)
    b, h, n = hidden.shape[0], module.num_attention_heads, hidden.shape[1]
    per_round = recorded["logits"].reshape(b, h, -1, n)  # (B, H, R, N), or (B, H, 1, N) on the short path
    aux = {} if output.buckets is None else {"buckets": output.buckets, "permutation": recorded["permutation"]}
    return output.hidden_states, torch.logsumexp(per_round, dim=2), aux


def _bhnd(out: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's merged heads (B, N, H·D) -> (B, H, N, D)."""
    b, n, _ = out.shape
    return out.reshape(b, n, heads, -1).transpose(1, 2)


GALLERY = (
    Entry("transformers", "transformers ReformerConfig / LSHSelfAttention", "hf_lsh", "lsh", "float32", True, vjp="hf_lsh_vjp"),
    Entry("transformers", "transformers ReformerConfig / LSHSelfAttention", "hf_lsh", "lsh", "float64", True, vjp="hf_lsh_vjp"),
)

#: HF's LSHSelfAttention passes every LSH case it can express.
EXPLANATIONS: dict[str, str] = {}
