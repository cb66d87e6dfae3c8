"""Run Hugging Face's ``BigBirdBlockSparseAttention`` on refattn's BigBird vectors.

``hf_bigbird(q, k, v, **params)`` runs HF's own layer forward on a case:

* **Inputs through the projections.** ``query``, ``key`` and ``value`` are
  replaced by modules that look their rows up in the case's arrays:
  ``hidden_states[b, n]`` holds ``(b, n)`` in its first two entries and the
  module returns row ``(b, n)`` of ``q`` (or ``k``, ``v``) laid out as HF's
  ``view(batch, -1, heads, head_dim)`` expects; autograd reaches the arrays.
* **Random blocks.** HF draws them in ``_bigbird_block_rand_mask_with_head``
  (all zero in eval mode). For the call, that method returns the case's
  ``random_blocks``, one (nb - 2, r) array per head, so HF's gathers,
  concatenations and masks run on the case's blocks.
* **Masks** are HF's own: ``BigBirdModel.create_masks_for_block_sparse_attn``
  on an all-ones attention mask. ``BigBirdModel.forward`` switches to full
  attention (HF's ``BigBirdSelfAttention``) when ``N <= (5 + 2 r) * block``;
  the adapter makes the same switch with the same rule.
* **Log-sum-exp.** HF does not return it: results are ``partial``.

HF counts a block listed twice twice, so the canonical cases (the paper's
union, ``count_repeated_blocks=False``) raise ``NotImplementedError``, as do
ETC (``extra_global_tokens > 0``: HF has none), grouped kv heads and ``Dv != D``::

    refattn verify --mechanism bigbird --impl examples/hf_bigbird.py:hf_bigbird \\
        --vjp examples/hf_bigbird.py:hf_bigbird_vjp --grad
"""

from __future__ import annotations

import torch
from transformers import BigBirdConfig
from transformers.models.big_bird.modeling_big_bird import (
    BigBirdBlockSparseAttention,
    BigBirdModel,
    BigBirdSelfAttention,
)

from _gallery_entry import Entry
from refattn.core.results import Result


class _Rows(torch.nn.Module):
    """A projection that returns row (a, c) of a given table for a hidden state whose first entries are (a, c)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, hidden):
        index = hidden[..., :2].round().long()
        return self.table[index[..., 0], index[..., 1]]


def _forward(tensors: dict, *, block_size, random_blocks, extra_global_tokens=0, count_repeated_blocks=True,
             short_sequence_full=True, random_blocks_avoid_pattern=False, preset=None, scale=None):  # fmt: skip
    if extra_global_tokens:
        raise NotImplementedError("HF's BigBird has no ETC (\"Currently, ETC is not supported\")")
    q = tensors["q"]
    b, h, n, d = q.shape
    if scale is not None and scale != d**-0.5:
        raise NotImplementedError("HF's BigBird scales by 1/sqrt(head_dim)")
    if tensors["k"].shape[1] != h or tensors["v"].shape[3] != d:
        raise NotImplementedError("HF's BigBird has no grouped kv heads and values of the query head dim")
    if not count_repeated_blocks or not short_sequence_full:
        raise NotImplementedError("HF counts repeated blocks and switches to full attention for short sequences")
    r = random_blocks.shape[2]
    config = BigBirdConfig(hidden_size=h * d, num_attention_heads=h, block_size=block_size, num_random_blocks=r,
                           attention_probs_dropout_prob=0.0, max_position_embeddings=max(n, 64), use_bias=False)  # fmt: skip
    full = n <= (5 + 2 * r) * block_size  # BigBirdModel.forward's switch
    layer = (BigBirdSelfAttention(config) if full else BigBirdBlockSparseAttention(config)).double().eval()
    for name, attribute in zip("qkv", ("query", "key", "value")):
        layer.__setattr__(attribute, _Rows(tensors[name].permute(0, 2, 1, 3).reshape(b, n, h * d)))
    hidden = torch.zeros(b, n, h * d, dtype=torch.float64)
    hidden[..., 0] = torch.arange(b, dtype=torch.float64)[:, None]
    hidden[..., 1] = torch.arange(n, dtype=torch.float64)[None, :]
    if full:
        out = layer(hidden)[0]
    else:
        layer._bigbird_block_rand_mask_with_head = lambda **_: [row.astype("int32") for row in random_blocks]
        blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
            torch.ones(b, n, dtype=torch.float64), block_size)  # fmt: skip
        out = layer(hidden, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked,
                    to_blocked_mask=blocked)[0]  # fmt: skip
    return out.reshape(b, n, h, d).permute(0, 2, 1, 3)


def hf_bigbird(q, k, v, **params) -> Result:
    """HF's BigBird attention forward on a case: ``Result(out, lse=None)``, NumPy in and out."""
    with torch.no_grad():
        out = _forward({n: torch.tensor(x, dtype=torch.float64) for n, x in zip("qkv", (q, k, v))}, **params)
    return Result(out=out.numpy(), lse=None)


def hf_bigbird_vjp(dout, q, k, v, *, dlse=None, **params) -> dict:
    """Gradients of ``<dout, out>`` by autograd through HF's layer."""
    leaves = {n: torch.tensor(x, dtype=torch.float64, requires_grad=True) for n, x in zip("qkv", (q, k, v))}
    (_forward(leaves, **params) * torch.tensor(dout)).sum().backward()
    return {n: t.grad.numpy() for n, t in leaves.items()}


GALLERY = (
    Entry("transformers", "transformers BigBirdBlockSparseAttention", "hf_bigbird", "bigbird", "float64", True,
          vjp="hf_bigbird_vjp"),
)  # fmt: skip

#: HF's BigBird passes every BigBird case it can express.
EXPLANATIONS: dict[str, str] = {}
