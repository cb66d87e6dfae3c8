"""Run lucidrains' ``linformer`` (``LinformerSelfAttention``) through refattn's Linformer.

``refattn_inputs(module, x, context=None)`` reads the module's learned
weights into refattn's explicit inputs: the per-head queries, keys and values
(``to_q``, ``to_k``, ``to_v`` applied to ``x``, heads split as lucidrains
splits them), ``e = proj_k.T`` and ``f = proj_v.T`` (lucidrains stores the
projections as (seq_len, k), refattn as (P, Nmax)), ``slice_projections=True``
(``kv_projs = map(lambda t: t[:kv_len], ...)``) and the scale ``dim_head ** -0.5``.
``linformer_lucidrains(module, x, context=None)`` then runs
``linformer_attention`` on them and lucidrains' own output projection
``to_out``, so its result is comparable with ``module(x)``.

How lucidrains maps onto refattn's parameters:

* one E and one F shared by every head (refattn's (P, Nmax) form); lucidrains
  projects the keys before splitting heads, which is the same product;
* ``one_kv_head=True`` is one kv head (Hkv = 1, GQA over all query heads);
* ``share_kv=True`` is F = E *and* V := K (lucidrains reuses the keys as
  values): refattn's ``f=None`` with ``v=k``;
* lucidrains takes no mask (``forward(x, context=None, **kwargs)``): its
  padded tokens are projected like real ones, i.e. refattn without
  ``key_padding_mask``; refattn's canonical padding (zero padded keys before
  projecting) has no counterpart there;
* dropout is left to the module: compare in ``eval()`` mode.

lucidrains/linformer ``linformer/linformer.py`` at version 0.2.3 (commit
970e1c3f12fbdc494f60a2bed5e807563850f585). Tests: tests/test_lowrank_peers.py.
"""

from __future__ import annotations

import numpy as np
import torch
from linformer import LinformerSelfAttention

from _gallery_entry import Entry
from refattn.conformance.adapters import from_torch
from refattn.lowrank import linformer_attention


def refattn_inputs(module, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``(q, k, v, params)`` for ``linformer_attention`` from the module's weights and its input(s), float64."""
    b, n, _ = x.shape
    dim_head = module.dim_head
    kv_input = x if context is None else context
    with torch.no_grad():
        queries = module.to_q(x)
        keys = module.to_k(kv_input)
        values = keys if module.share_kv else module.to_v(kv_input)
    split = lambda t: t.reshape(b, t.shape[1], -1, dim_head).transpose(1, 2).double().numpy()  # noqa: E731 (B, H, N, Dh)
    q, k, v = split(queries), split(keys), split(values)
    e = module.proj_k.detach().double().numpy().T  # (P, seq_len)
    f = None if module.share_kv else module.proj_v.detach().double().numpy().T
    params = dict(e=e, f=f, slice_projections=True, scale=dim_head**-0.5)
    return q, k, v, params


def linformer_lucidrains(module, x: torch.Tensor, context: torch.Tensor | None = None, backend: str = "reference") -> torch.Tensor:
    """``module(x, context)`` computed by refattn: ``to_out(linformer_attention(...))``, in x's dtype."""
    q, k, v, params = refattn_inputs(module, x, context)
    out = linformer_attention(q, k, v, backend=backend, **params).out  # (B, H, N, Dh)
    merged = torch.from_numpy(out).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, N, H·Dh)
    with torch.no_grad():
        return module.to_out(merged.to(x.dtype))


def linformer_self_attention(q, k, v, *, e, f=None, causal=False, key_padding_mask=None, scale=None, slice_projections=False,
                   preset=None):  # fmt: skip
    """The other direction, for the gallery: a case's q, k, v (B, H, N, D), E and F through ``LinformerSelfAttention``.

    The module's input ``x`` is ``[q | 0 | 0]`` and its ``context`` ``[0 | k | v]`` (heads merged), with
    ``to_q``, ``to_k``, ``to_v`` the identity on their part and ``to_out`` removed; ``proj_k = E.T`` and
    ``proj_v = F.T`` (``F = E`` when ``f`` is None), as tensors, so autograd reaches E and F.
    """
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if causal or key_padding_mask is not None:
        raise NotImplementedError("LinformerSelfAttention has no causal mode and no mask (forward(x, context))")
    if e.ndim != 2 or (f is not None and f.ndim != 2):
        raise NotImplementedError("LinformerSelfAttention has one E and one F shared by every head")
    if hkv not in (1, h) or v.shape[-1] != d:
        raise NotImplementedError("LinformerSelfAttention has H kv heads or one (one_kv_head), of the query head dim")
    if scale is not None and scale != d**-0.5:
        raise NotImplementedError("LinformerSelfAttention scales by dim_head ** -0.5")
    if nk < e.shape[1] and not slice_projections:
        raise NotImplementedError("LinformerSelfAttention slices its projections to the key length (kv_projs)")
    widths = (h * d, hkv * d, hkv * d)  # the parts q | k | v of the module's features
    dim = -(-sum(widths) // h) * h  # LinformerSelfAttention asserts dim % heads == 0
    module = LinformerSelfAttention(dim, seq_len=e.shape[1], k=e.shape[0], heads=h, dim_head=d, one_kv_head=hkv == 1)
    module = module.to(q.dtype).eval()
    starts = np.cumsum((0, *widths))
    with torch.no_grad():
        for linear, start, width in zip((module.to_q, module.to_k, module.to_v), starts, widths):
            linear.weight.zero_()
            linear.weight[:, start : start + width] = torch.eye(width, dtype=q.dtype)
    del module.proj_k, module.proj_v  # plain tensors instead of parameters: gradients reach the case's E and F
    module.proj_k, module.proj_v = e.T, (e if f is None else f).T
    module.to_out = torch.nn.Identity()
    merged = lambda t: t.transpose(1, 2).reshape(b, t.shape[2], -1)  # noqa: E731  (B, H, N, D) -> (B, N, H·D)
    x = torch.nn.functional.pad(merged(q), (0, dim - widths[0]))
    context = torch.nn.functional.pad(torch.cat([merged(k), merged(v)], dim=-1), (widths[0], dim - sum(widths)))
    return module(x, context).reshape(b, nq, h, d).transpose(1, 2)


linformer_case = from_torch(linformer_self_attention)

GALLERY = (
    Entry("linformer", "linformer.LinformerSelfAttention", "linformer_case", "linformer", "float64", True),
    Entry("linformer", "linformer.LinformerSelfAttention", "linformer_case", "linformer", "float32", True),
)

#: LinformerSelfAttention passes every Linformer case it can express.
EXPLANATIONS: dict[str, str] = {}
