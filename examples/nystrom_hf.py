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

import torch
from transformers import NystromformerConfig
from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention

from _gallery_entry import Entry
from refattn.conformance.adapters import from_torch
from refattn.lowrank import nystrom_attention

#: What NystromformerSelfAttention fixes, by refattn parameter (refattn.lowrank presets, "hf").
LIBRARY_FIXED = dict(pinv_init="batch_global", landmark_eps=0.0, mask_scope="kernel3", padding="none",
                     pinv_iterations=6, full_rank_shortcut=True)  # fmt: skip


def additive_mask(key_padding_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, N) bool, True = real -> the (B, 1, 1, N) additive mask: 0 on real keys, ``finfo(dtype).min`` on padded ones."""
    padded = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(key_padding_mask, torch.zeros((), dtype=dtype), padded)[:, None, None, :]


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


class _Part(torch.nn.Module):
    """A projection that returns one part of the hidden state's features."""

    def __init__(self, start: int, width: int):
        super().__init__()
        self.start, self.width = start, width

    def forward(self, hidden):
        return hidden[..., self.start : self.start + self.width]


def hf_self_attention(q, k, v, *, num_landmarks, conv_kernel=None, key_padding_mask=None, scale=None, preset=None,
                      **behaviours):  # fmt: skip
    """The other direction, for the gallery: a case's q, k, v (B, H, N, D) through ``NystromformerSelfAttention``.

    The layer's input is ``[q | k | v]`` (heads merged); ``query``, ``key``, ``value`` return their part, and
    ``conv``'s weight is the case's ``conv_kernel`` (H, K) as a tensor, so autograd reaches it. The padding
    mask is the additive (B, 1, 1, N) form of :func:`additive_mask`.
    """
    b, h, n, d = q.shape
    differing = sorted(name for name, value in behaviours.items() if LIBRARY_FIXED.get(name, value) != value)
    if differing:
        raise NotImplementedError("NystromformerSelfAttention fixes " + ", ".join(f"{name}={LIBRARY_FIXED[name]!r}" for name in differing))
    if k.shape[1] != h or v.shape[-1] != d:
        raise NotImplementedError("NystromformerSelfAttention has no grouped kv heads and values of the head dim")
    if scale is not None and scale != d**-0.5:
        raise NotImplementedError("NystromformerSelfAttention divides q and k each by head_size ** 0.25")
    if n % num_landmarks or (conv_kernel is not None and conv_kernel.shape[1] % 2 == 0):
        raise NotImplementedError("NystromformerSelfAttention needs N a multiple of num_landmarks and an odd conv kernel")
    config = NystromformerConfig(hidden_size=h * d, num_attention_heads=h, num_landmarks=num_landmarks,
                                 segment_means_seq_len=n, attention_probs_dropout_prob=0.0,
                                 conv_kernel_size=None if conv_kernel is None else conv_kernel.shape[1])  # fmt: skip
    layer = NystromformerSelfAttention(config).to(q.dtype).eval()
    layer.query, layer.key, layer.value = (_Part(i * h * d, h * d) for i in range(3))
    if conv_kernel is not None:
        del layer.conv.weight  # a plain tensor instead of a parameter: gradients reach the case's kernel
        layer.conv.weight = conv_kernel[:, None, :, None]  # (H, 1, K, 1)
    merged = lambda t: t.transpose(1, 2).reshape(b, n, h * d)  # noqa: E731  (B, H, N, D) -> (B, N, H·D)
    mask = None if key_padding_mask is None else additive_mask(key_padding_mask.expand(b, n), q.dtype)
    (out,) = layer(torch.cat([merged(q), merged(k), merged(v)], dim=-1), mask)
    return out.reshape(b, n, h, d).transpose(1, 2)


hf_nystrom_case = from_torch(hf_self_attention)

GALLERY = (
    Entry("transformers", "transformers NystromformerSelfAttention", "hf_nystrom_case", "nystrom", "float64", True),
    Entry("transformers", "transformers NystromformerSelfAttention", "hf_nystrom_case", "nystrom", "float32", True),
)

EXPLANATIONS: dict[str, str] = {}
