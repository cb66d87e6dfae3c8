"""Run Hugging Face's ``NystromformerSelfAttention`` (transformers) through refattn's Nyströmformer.

``refattn_inputs(module, hidden_states, key_padding_mask=None)`` reads the
module's weights into refattn's explicit inputs: q, k, v from the
``query``, ``key``, ``value`` projections (biases included; heads split by
``view(..., -1, head_size).transpose(1, 2)``), the depthwise convolution
``conv.weight[:, 0, :, 0]`` as ``conv_kernel`` (H, K), and ``preset="hf"``
(batch-global Z₀, no padding, mask on kernel 3 only, full-rank shortcut when
``num_landmarks == segment_means_seq_len``). HF divides q and k each by
``head_size ** ¼``, i.e. logits scaled by ``1/√head_size``: refattn's default
scale on the unscaled projections. ``nystrom_hf(module, hidden_states, ...)``
returns refattn's ``context_layer`` (B, N, H·Dh), comparable with
``module(hidden_states, attention_mask)[0]``.

* **Masks.** The module adds ``attention_mask`` to kernel 3's scores (and
  to the full scores on the shortcut path) and nowhere else: refattn's
  ``mask_scope="kernel3"``. ``additive_mask(key_padding_mask)`` builds the
  (B, 1, 1, N) additive form, ``finfo.min`` on padded keys, that the module
  broadcasts over kernel 3's (B, H, m, N) scores. In transformers 5.25.0 the
  *model* (``NystromformerModel.forward``) passes instead the 4-D
  (B, 1, N, N) mask of ``create_bidirectional_mask``, which does not
  broadcast to (B, H, m, N) when m < N: a padding mask on the landmark path
  raises ``RuntimeError`` at modeling_nystromformer.py line 204
  (``attention_scores = attention_scores + attention_mask``), tested.
* **Z₀.** HF's "original" option divides by ``torch.max(torch.sum(key, dim=-2))``
  over the whole (B, H) tensor: refattn's ``pinv_init="batch_global"``
  (whose ‖A‖∞ factor is 1 up to rounding for softmax rows). Its per-matrix
  option cannot be reached (``config["inv_init_coeff_option"]``, a
  ``TypeError``: spec/low_rank.md).
* The module's length must be ``segment_means_seq_len`` (its landmark
  reshape), a multiple of m.

huggingface/transformers ``src/transformers/models/nystromformer/modeling_nystromformer.py``
as installed in transformers 5.25.0. Tests: tests/test_lowrank_peers.py.
"""

from __future__ import annotations

import numpy as np
import torch

from refattn.lowrank import nystrom_attention


def additive_mask(key_padding_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, N) bool, True = real -> the (B, 1, 1, N) additive mask: 0 on real keys, ``finfo(dtype).min`` on padded ones."""
    return torch.where(key_padding_mask, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]


def refattn_inputs(module, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
    """``(q, k, v, params)`` for ``nystrom_attention`` from the module's weights and its input, float64."""
    b, n, _ = hidden_states.shape
    heads = module.num_attention_heads
    with torch.no_grad():
        q, k, v = (p(hidden_states).reshape(b, n, heads, -1).transpose(1, 2).double().numpy()
                   for p in (module.query, module.key, module.value))  # fmt: skip
    conv = None if module.conv_kernel_size is None else module.conv.weight.detach()[:, 0, :, 0].double().numpy()
    params = dict(num_landmarks=module.num_landmarks, conv_kernel=conv, preset="hf",
                  key_padding_mask=None if key_padding_mask is None else key_padding_mask.numpy().astype(bool))  # fmt: skip
    return q, k, v, params


def nystrom_hf(module, hidden_states: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
               backend: str = "reference") -> torch.Tensor:  # fmt: skip
    """``module(hidden_states, additive_mask(key_padding_mask))[0]`` computed by refattn, in the input's dtype."""
    if hidden_states.shape[1] != module.seq_len:
        raise NotImplementedError(f"HF's module needs N = segment_means_seq_len = {module.seq_len}, not {hidden_states.shape[1]}")
    q, k, v, params = refattn_inputs(module, hidden_states, key_padding_mask)
    out = nystrom_attention(q, k, v, backend=backend, **params).out  # (B, H, N, Dh)
    return torch.from_numpy(out).transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], -1).to(hidden_states.dtype)
