"""Run Hugging Face's ``LongformerSelfAttention`` on refattn's Longformer vectors.

``hf_longformer(q, k, v, **params)`` runs HF's own layer forward on a case:

* **Inputs through the projections.** HF projects ``hidden_states`` with
  ``query``, ``key``, ``value`` and (global rows) ``query_global``,
  ``key_global``, ``value_global``. Each projection is replaced by a module
  that looks its rows up in the case's array: ``hidden_states[n, b]`` holds
  ``(n, b)`` in its first two entries, and the module returns row ``(n, b)``
  of ``q`` (or ``k``, ``v``, ``q_global``...) laid out as HF's
  ``view(seq_len, batch, heads, head_dim)`` expects. HF's own gathers
  (``hidden_states[is_index_global_attn_nonzero[::-1]]`` for the global
  queries) then pick the case's rows, and autograd reaches the arrays.
* **Padding.** The layer needs ``N`` to be a multiple of ``attention_window``;
  as ``LongformerModel._pad_to_window_size`` does, the adapter pads with
  tokens whose ``attention_mask`` is 0 (HF encodes masked, local and global
  as -10000, 0, +10000 for the layer) and drops the padded rows. That is the
  ``"hf"`` preset; canonical cases get the same real outputs.
* **Log-sum-exp.** HF does not return it: results are ``partial`` and the
  gradient check uses the ``dout`` part (the suite stores the VJP for
  ``dout`` and ``dlse`` separately).
* **Precision.** HF's layer takes both softmaxes (local and global) in float32 whatever the
  input dtype (``nn.functional.softmax(attn_scores, dim=-1, dtype=torch.float32)``
  in ``LongformerSelfAttention.forward``), so float64 inputs give float32
  accuracy (about 2e-7 here): verify it with ``--dtype float32``.

Cases HF cannot express (grouped kv heads, ``Dv != D``, and
``attention_window = 2``, on which HF's ``_sliding_chunks_query_key_matmul``
fails with a shape error) raise ``NotImplementedError``::

    refattn verify --mechanism longformer --impl examples/hf_longformer.py:hf_longformer \\
        --vjp examples/hf_longformer.py:hf_longformer_vjp --grad --dtype float32
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from _gallery_entry import Entry
from refattn.core.results import Result

PROJECTIONS = ("q", "k", "v", "q_global", "k_global", "v_global")


class _Rows(torch.nn.Module):
    """A projection that returns row (n, b) of a given (N, B, E) table for hidden state (n, b, ...)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, hidden):
        index = hidden[..., :2].round().long()
        return self.table[index[..., 0], index[..., 1]]


def _table(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, N, D) -> (length, B, H*D), zero rows appended for the padding."""
    b, h, n, d = x.shape
    table = x.permute(2, 0, 1, 3).reshape(n, b, h * d)
    return torch.nn.functional.pad(table, (0, 0, 0, 0, 0, length - n))


def _forward(tensors: dict, attention_window, global_tokens=None, preset=None, scale=None):
    q = tensors["q"]
    b, h, n, d = q.shape
    if scale is not None and scale != d**-0.5:
        raise NotImplementedError("HF's Longformer scales by 1/sqrt(head_dim)")
    if tensors["k"].shape[1] != h or tensors["v"].shape[3] != d:
        raise NotImplementedError("HF's Longformer has no grouped kv heads and values of the query head dim")
    if attention_window < 4:
        raise NotImplementedError("HF's _sliding_chunks_query_key_matmul fails for attention_window 2")
    length = -(-n // attention_window) * attention_window
    config = LongformerConfig(hidden_size=h * d, num_attention_heads=h, attention_window=[attention_window],
                              attention_probs_dropout_prob=0.0)  # fmt: skip
    layer = LongformerSelfAttention(config, layer_id=0).double().eval()
    for name, attribute in zip(PROJECTIONS, ("query", "key", "value", "query_global", "key_global", "value_global")):
        source = tensors.get(name, tensors[name[0]])
        setattr(layer, attribute, _Rows(_table(source, length)))
    hidden = torch.zeros(b, length, h * d, dtype=torch.float64)
    hidden[..., 0] = torch.arange(length, dtype=torch.float64)[None, :]
    hidden[..., 1] = torch.arange(b, dtype=torch.float64)[:, None]
    glob = np.zeros((b, length), dtype=bool)
    if global_tokens is not None:
        glob[:, :n] = global_tokens
    mask = torch.zeros(b, length, dtype=torch.float64)
    mask[:, n:] = -10000.0  # padding
    mask[torch.tensor(glob)] = 10000.0
    out = layer(hidden, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                is_global_attn=bool(glob.any()))[0]  # fmt: skip
    return out[:, :n].reshape(b, n, h, d).permute(0, 2, 1, 3)


def hf_longformer(q, k, v, **params) -> Result:
    """HF's LongformerSelfAttention forward on a case: ``Result(out, lse=None)``, NumPy in and out."""
    arrays = {"q": q, "k": k, "v": v, **{n: params.pop(n) for n in PROJECTIONS[3:] if n in params}}
    arrays = {n: x for n, x in arrays.items() if x is not None}
    with torch.no_grad():
        out = _forward({n: torch.tensor(x, dtype=torch.float64) for n, x in arrays.items()}, **params)
    return Result(out=out.numpy(), lse=None)


def hf_longformer_vjp(dout, q, k, v, *, dlse=None, **params) -> dict:
    """Gradients of ``<dout, out>`` by autograd through HF's layer (``dlse`` has nothing to act on)."""
    arrays = {"q": q, "k": k, "v": v, **{n: params.pop(n) for n in PROJECTIONS[3:] if n in params}}
    arrays = {n: x for n, x in arrays.items() if x is not None}
    leaves = {n: torch.tensor(x, dtype=torch.float64, requires_grad=True) for n, x in arrays.items()}
    (_forward(leaves, **params) * torch.tensor(dout)).sum().backward()
    return {n: t.grad.numpy() for n, t in leaves.items()}


GALLERY = (
    Entry("transformers", "transformers LongformerSelfAttention", "hf_longformer", "longformer", "float32", True,
          vjp="hf_longformer_vjp"),
    Entry("transformers", "transformers LongformerSelfAttention", "hf_longformer", "longformer", "float64", False),
)  # fmt: skip

#: transformers 5.25.0, src/transformers/models/longformer/modeling_longformer.py as installed.
EXPLANATIONS = {
    "FLOAT64": "both softmaxes are taken in float32 whatever the input dtype: `nn.functional.softmax(attn_scores, "
    "dim=-1, dtype=torch.float32)` (modeling_longformer.py line 575, `LongformerSelfAttention.forward`; line 1013 "
    "for the global rows, `_compute_global_attn_output_from_hidden`): float64 inputs get float32 accuracy.",
}
