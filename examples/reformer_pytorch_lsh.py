"""Run lucidrains' reformer-pytorch ``LSHAttention`` on refattn's LSH vectors.

``reformer_lsh(qk, v, **params)`` builds ``LSHAttention`` from the case's
parameters and runs its own forward on the case's arrays, heads merged into
the batch as ``LSHSelfAttention`` merges them ((B, H, N, D) -> (B·H, N, D)):

* **Rotations.** The library draws them in ``LSHAttention.hash_vectors`` with
  ``torch.randn((B·H, D, R, num_buckets / 2))`` (``random_rotations_per_head=True``).
  For the call ``torch.randn`` returns the case's rotations in that layout,
  checked against the requested shape, so its own hashing, sort, chunking,
  look-one-back, masks and round combination run on them. Its returned
  buckets (round offsets included) and its sort order ``sticker`` (slot ->
  item ``r·N + n``) are refattn's ``aux.buckets`` and ``aux.permutation``.
* **Log-sum-exp.** ``LSHAttention`` combines its rounds with
  ``torch.logsumexp(logits, dim=1)`` over the per-round log-sum-exps: the
  adapter records that value (in the autograd graph), so the gradient check
  covers ``dlse``. Short sequences (N <= bucket size) go to ``FullQKAttention``
  as ``LSHSelfAttention`` sends them; it returns no log-sum-exp (``partial``).

The library fixes l2-normalised keys, the scale ``dim ** -0.5``, a self
score of -5e4, one chunk of look-back, ``N // bucket_size`` buckets, no
padding bucket, and masks padded queries; cases that ask for anything else
raise ``NotImplementedError`` (``unsupported``)::

    refattn verify --mechanism lsh --impl examples/reformer_pytorch_lsh.py:reformer_lsh \\
        --vjp examples/reformer_pytorch_lsh.py:reformer_lsh_vjp --grad

lucidrains/reformer-pytorch ``reformer_pytorch/reformer_pytorch.py``, version 1.4.4 as installed.
"""

from __future__ import annotations

from contextlib import ExitStack
from unittest import mock

import numpy as np
import torch
from reformer_pytorch import reformer_pytorch as library

from _gallery_entry import Entry
from _injected_randn import fixed_randn
from refattn.conformance.adapters import from_torch
from refattn.core.results import Result

#: reformer_pytorch.reformer_pytorch.TOKEN_SELF_ATTN_VALUE
SELF_SCORE = -5e4
#: The behaviours LSHAttention cannot change (refattn.lsh.presets, "lucidrains").
FIXED = dict(key_norm="l2", key_norm_eps=1e-12, self_mask_value=SELF_SCORE, mask_mode="replace",
             num_chunks_before=1, num_chunks_after=0, return_rounds=False)  # fmt: skip


def attention(qk, v, *, rotations, num_buckets, num_hashes, chunk_len, causal=False, key_padding_mask=None,
              dup_correction=False, **behaviours):  # fmt: skip
    """LSHAttention (or, for N <= chunk_len, FullQKAttention) on torch tensors; returns (out, lse, aux)."""
    b, h, n, d = qk.shape
    _require_expressible(qk, v, num_buckets, chunk_len, key_padding_mask, dup_correction, behaviours)
    mask = None if key_padding_mask is None else key_padding_mask.expand(b, n).repeat_interleave(h, dim=0)  # (B·H, N)
    merged_qk, merged_v = qk.reshape(b * h, n, d), v.reshape(b * h, n, d)
    if n <= chunk_len:  # LSHSelfAttention: use_full_attn = kv_len <= full_attn_thres (= bucket_size)
        out, _, _ = library.FullQKAttention(causal=causal)(merged_qk, merged_v, input_mask=mask)
        return out.reshape(b, h, n, d), None, {}
    module = library.LSHAttention(bucket_size=chunk_len, n_hashes=num_hashes, causal=causal,
                                  allow_duplicate_attention=not dup_correction, random_rotations_per_head=True).eval()  # fmt: skip
    recorded = {}
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch, "randn", fixed_randn(_library_layout(rotations, b), "LSHAttention")))
        stack.enter_context(mock.patch.object(torch, "logsumexp", _recording_logsumexp(recorded)))
        stack.enter_context(mock.patch.object(library, "sort_key_val", _recording_sort(recorded)))
        out, _, buckets = module(merged_qk, merged_v, input_mask=mask)
    aux = {"buckets": buckets.reshape(b, h, num_hashes, n), "permutation": recorded["sticker"].reshape(b, h, -1)}
    return out.reshape(b, h, n, d), recorded["lse"].reshape(b, h, n), aux


def _require_expressible(qk, v, num_buckets, chunk_len, key_padding_mask, dup_correction, behaviours):
    """Raise NotImplementedError for what LSHAttention cannot compute."""
    n, d = qk.shape[2], qk.shape[3]
    if v.shape[-1] != d:
        raise NotImplementedError("LSHAttention's values have the query-key head size")
    differing = {name: value for name, value in behaviours.items() if name in FIXED and value != FIXED[name]}
    if differing:
        raise NotImplementedError("LSHAttention fixes " + ", ".join(f"{name}={FIXED[name]!r}" for name in sorted(differing)))
    if dup_correction and behaviours.get("dup_count") != "reformer_pytorch":
        raise NotImplementedError("LSHAttention counts duplicates its own way (dup_count='reformer_pytorch')")
    if behaviours.get("scale") not in (None, d**-0.5):
        raise NotImplementedError("LSHAttention scales the logits by dim ** -0.5")
    if behaviours.get("mask_value") not in (None, -float(np.finfo(np.float32).max)):
        raise NotImplementedError("LSHAttention masks with -finfo(dtype).max (max_neg_value)")
    padded = key_padding_mask is not None and not bool(key_padding_mask.all())
    if padded and not behaviours.get("mask_padded_queries", True):
        raise NotImplementedError("LSHAttention masks the rows of padded queries (mq * mkv)")
    if padded and behaviours.get("padding_marks", "mask") != "mask":
        raise NotImplementedError("LSHAttention marks padding by its input_mask only")
    bucket = behaviours.get("padding_bucket", "none")
    if (bucket == "if_padded" and padded) or (bucket == "if_mask" and key_padding_mask is not None):
        raise NotImplementedError("LSHAttention has no padding bucket")
    if n <= chunk_len:
        if behaviours.get("short_sequence") != "full":
            raise NotImplementedError("LSHSelfAttention runs full attention when N <= bucket_size")
        return
    if isinstance(num_buckets, (list, tuple)) or num_buckets != n // chunk_len or n % (2 * chunk_len):
        raise NotImplementedError("LSHAttention hashes to N // bucket_size buckets and needs N divisible by 2·bucket_size")


def _library_layout(rotations: torch.Tensor, batch: int) -> torch.Tensor:
    """refattn's (H, R, D, P) or (B, H, R, D, P) rotations -> the library's (B·H, D, R, P)."""
    per_batch = rotations.expand(batch, *rotations.shape) if rotations.ndim == 4 else rotations
    b, h, r, d, p = per_batch.shape
    return per_batch.transpose(2, 3).reshape(b * h, d, r, p)


def _recording_logsumexp(recorded: dict):
    """``torch.logsumexp`` that keeps the round combination's value (its call with ``dim=1``)."""
    real = torch.logsumexp

    def logsumexp(x, dim, keepdim=False):
        value = real(x, dim=dim, keepdim=keepdim)
        if dim == 1:
            recorded["lse"] = value  # (B·H, 1, N, 1)
        return value

    return logsumexp


def _recording_sort(recorded: dict):
    """``sort_key_val`` that keeps its first call's sorted values: the items in slot order (``sticker``)."""
    real = library.sort_key_val

    def sort_key_val(keys, values, dim=-1):
        sorted_keys, sorted_values = real(keys, values, dim=dim)
        recorded.setdefault("sticker", sorted_values)
        return sorted_keys, sorted_values

    return sort_key_val


def _out_and_lse(qk, v, **params):
    out, lse, _ = attention(qk, v, **params)
    return out, lse


def reformer_lsh(qk, v, **params) -> Result:
    """LSHAttention's forward on a case: ``Result(out, lse, aux={buckets, permutation})``, NumPy in and out."""
    tensors = {name: torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x for name, x in params.items()}
    with torch.no_grad():
        out, lse, aux = attention(torch.from_numpy(qk), torch.from_numpy(v), **tensors)
    return Result(out=out.numpy(), lse=None if lse is None else lse.numpy(), aux={k: a.numpy() for k, a in aux.items()})


reformer_lsh_vjp = from_torch(_out_and_lse, inputs=("qk", "v")).vjp

GALLERY = (
    Entry("reformer-pytorch", "reformer_pytorch.LSHAttention", "reformer_lsh", "lsh", "float32", True,
          vjp="reformer_lsh_vjp"),
    Entry("reformer-pytorch", "reformer_pytorch.LSHAttention", "reformer_lsh", "lsh", "float64", True,
          vjp="reformer_lsh_vjp"),
)  # fmt: skip

EXPLANATIONS: dict[str, str] = {}
