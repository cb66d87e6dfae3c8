"""Verify lucidrains' h-transformer-1d (``HAttention1D``, ``CausalHAttention1D``) against refattn's h1d cases.

h-transformer-1d 0.1.9 (github.com/lucidrains/h-transformer-1d at
66227df1f6923ff6834686fa7d27b6f9e19a8391) computes attention from a model
input ``x``: ``to_qkv`` projects it, ``to_out`` mixes the heads. The adapter
makes both transparent: ``x`` is q, k and v side by side, ``to_qkv`` the
identity and ``to_out`` removed, so the module sees exactly the case's
q, k, v (its own ``dim_head ** -0.5`` is the default scale). Non-causal cases
run ``HAttention1D``, causal ones ``CausalHAttention1D`` with
``max_seq_len = N``, whatever the case's normalisation parameters say: the
library has one behaviour per class, so the ``lucidrains`` preset's cases
pass and the paper's cases flagged ``H1D_COVERAGE`` / ``H1D_NORMALISATION``
fail; examples/h_transformer_1d_lucidrains.xfail lists those with the reason. From the
repository root::

    refattn verify --impl examples/h_transformer_1d_lucidrains.py:h_transformer_1d --mechanism h1d \\
        --grad --xfail examples/h_transformer_1d_lucidrains.xfail

It needs ``pip install h-transformer-1d`` (which brings einops and
rotary-embedding-torch). Padding (the library pads with zero tokens that
attend), a value dim other than the head dim and a non-default scale cannot
be expressed: those cases raise ``NotImplementedError``.
"""

from __future__ import annotations

import torch
from h_transformer_1d.h_transformer_1d import CausalHAttention1D, HAttention1D

from _gallery_entry import Entry
from refattn.conformance.adapters import from_torch


def attention(q, k, v, *, block_size, causal=False, scale=None, padding=False, **normalisation):
    """h-transformer-1d's attention on torch tensors q, k, v (B, H, N, D); returns out (no lse)."""
    b, heads, n, d = q.shape
    if padding:
        raise NotImplementedError("h-transformer-1d pads with zero tokens that attend; it takes no padding rule")
    if v.shape[-1] != d:
        raise NotImplementedError("h-transformer-1d's to_qkv gives values the head dim")
    if scale is not None and abs(scale - d**-0.5) > 1e-12 * d**-0.5:
        raise NotImplementedError("h-transformer-1d scales by dim_head ** -0.5 only")
    if not causal and n < 4 * block_size:
        raise NotImplementedError("HAttention1D needs N >= 4 blocks: it asserts int(log2(N // block_size)) - 2 >= 0")
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    dim = 3 * heads * d
    if causal:
        module = CausalHAttention1D(dim, max_seq_len=n, heads=heads, dim_head=d, block_size=block_size)
    else:
        module = HAttention1D(dim, heads=heads, dim_head=d, block_size=block_size)
    module = module.to(q.dtype)
    with torch.no_grad():
        module.to_qkv.weight.copy_(torch.eye(dim, dtype=q.dtype))
    module.to_out = torch.nn.Identity()
    side_by_side = lambda t: t.permute(0, 2, 1, 3).reshape(b, n, heads * d)  # noqa: E731  (b h n d -> b n (h d))
    x = torch.cat([side_by_side(q), side_by_side(k), side_by_side(v)], dim=-1)
    return module(x).reshape(b, n, heads, d).permute(0, 2, 1, 3)


h_transformer_1d = from_torch(attention)


GALLERY = (
    Entry("h-transformer-1d", "h_transformer_1d HAttention1D / CausalHAttention1D", "h_transformer_1d", "h1d",
          "float64", True),
    Entry("h-transformer-1d", "h_transformer_1d HAttention1D / CausalHAttention1D", "h_transformer_1d", "h1d",
          "float32", True),
)  # fmt: skip

#: lucidrains/h-transformer-1d h_transformer_1d/h_transformer_1d.py at 66227df1f6923ff6834686fa7d27b6f9e19a8391
#: (= 0.1.9, installed); spec/hierarchical.md, "How h-transformer-1d differs".
EXPLANATIONS = {
    "H1D_COVERAGE": "`HAttention1D.forward` coarsens `int(log2(pad_to_len // bsz)) - 2` times (line 172): the "
    "coarsest level keeps 4 blocks, paired (0,1) and (2,3) by `flip_every_two` (line 104), so half of the block "
    "pairs are never attended (query 0 never sees key N-1).",
    "H1D_NORMALISATION": "`calculate_Y_and_A` subtracts a row maximum per level and block (`torch.max(S, dim=-1)`, "
    "line 208) and sums unweighted coarse denominators (`A = A.sum(dim=-1)`, line 213) while the values are summed "
    "(`masked_aggregate(..., average=False)`, line 189): the levels are not one softmax and a coarse key adds 1, "
    "not 2^level, to the normaliser.",
    "H1D_CAUSAL_BLOCKS": "`CausalHAttention1D` does not duplicate the finest level (no level-0 sibling block) and "
    "its coarse levels reach only the last token of each group (`self.mask` in `__init__`, lines 441-452).",
}
