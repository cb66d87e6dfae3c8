"""Run lucidrains' ``nystrom-attention`` (``NystromAttention``) through refattn's Nyströmformer.

``refattn_inputs(module, x, mask=None)`` reads the module's weights into
refattn's explicit inputs: q, k, v from ``to_qkv(x)`` (heads split as
``rearrange(t, 'b n (h d) -> b h n d')``), the depthwise residual
convolution ``res_conv.weight[:, 0, :, 0]`` as ``conv_kernel`` (H, K), the
mask as ``key_padding_mask``, and ``preset="lucidrains"`` (batch-global Z₀
norms, front padding, every kernel masked; its landmark eps 1e-8 is lost in
float32, so the preset's is 0).
``nystrom_lucidrains(module, x, mask=None)`` runs ``nystrom_attention`` on
them and the module's own ``to_out``, comparable with ``module(x, mask=mask)``.

* **Front padding.** lucidrains pads ``x`` with zero tokens in front to a
  multiple of m *before* ``to_qkv``, which has no bias, so the padded q, k, v
  are exactly zero: refattn's ``padding="front"`` prepends the same zeros
  (and lucidrains' ``out[:, -n:]`` drops the same rows).
* **Scale.** lucidrains multiplies q by ``dim_head ** -0.5`` before the
  landmark means; the means are linear, so this is refattn's ``scale``.
* **Where they differ (with a mask only).** lucidrains fills masked scores
  with ``-torch.finfo(dtype).max`` (nystrom_attention.py, ``masked_fill_``
  of sim1, sim2, sim3), so a fully masked row is uniform where refattn's is
  0. Two consequences: (1) output rows of padded tokens differ (lucidrains
  also zeroes their q): compare real rows only; (2) a landmark whose segment
  has no real token gives kernel 2 a uniform row instead of a zero row, which
  changes Z for every row; refattn matches lucidrains only when every
  segment holds a real token. Without a mask the two agree everywhere.

lucidrains/nystrom-attention ``nystrom_attention/nystrom_attention.py`` at
version 0.0.14 (commit fbe9ebad6bae24143d7930d6c2b82d6a12d68f76).
Tests: tests/test_lowrank_peers.py.
"""

from __future__ import annotations

import numpy as np
import torch
from nystrom_attention import NystromAttention

from _gallery_entry import Entry
from refattn.conformance.adapters import from_torch
from refattn.lowrank import nystrom_attention

#: What NystromAttention fixes, by refattn parameter (refattn.lowrank presets, "lucidrains").
LIBRARY_FIXED = dict(pinv_init="batch_global", landmark_eps=0.0, mask_scope="all", full_rank_shortcut=False)


def refattn_inputs(module, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``(q, k, v, params)`` for ``nystrom_attention`` from the module's weights and its input, float64."""
    b, n, _ = x.shape
    with torch.no_grad():
        q, k, v = (t.reshape(b, n, module.heads, -1).transpose(1, 2).double().numpy() for t in module.to_qkv(x).chunk(3, dim=-1))
    conv = module.res_conv.weight.detach()[:, 0, :, 0].double().numpy() if module.residual else None  # (H, K)
    params = dict(num_landmarks=module.num_landmarks, pinv_iterations=module.pinv_iterations, conv_kernel=conv,
                  key_padding_mask=None if mask is None else mask.numpy().astype(bool), scale=module.scale,
                  preset="lucidrains")  # fmt: skip
    # No landmark_eps: the module's eps is added to an integer count in float32, where it is lost (the preset's 0).
    return q, k, v, params


def nystrom_lucidrains(module, x: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "reference") -> torch.Tensor:
    """``module(x, mask=mask)`` computed by refattn: ``to_out(nystrom_attention(...))``, in x's dtype."""
    q, k, v, params = refattn_inputs(module, x, mask)
    out = nystrom_attention(q, k, v, backend=backend, **params).out  # (B, H, N, Dh)
    merged = torch.from_numpy(out).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, N, H·Dh)
    with torch.no_grad():
        return module.to_out(merged.to(x.dtype))


def nystrom_self_attention(q, k, v, *, num_landmarks, pinv_iterations, conv_kernel=None, key_padding_mask=None,
                           scale=None, padding="none", preset=None, **behaviours):  # fmt: skip
    """The other direction, for the gallery: a case's q, k, v (B, H, N, D) through ``NystromAttention``.

    The module's input is ``[q | k | v]`` (heads merged) with ``to_qkv`` the identity and ``to_out``
    removed; ``res_conv``'s weight is the case's ``conv_kernel`` (H, K) as a tensor, so autograd reaches it.
    """
    b, h, n, d = q.shape
    differing = sorted(name for name, value in behaviours.items() if LIBRARY_FIXED.get(name, value) != value)
    if differing:
        raise NotImplementedError("NystromAttention fixes " + ", ".join(f"{name}={LIBRARY_FIXED[name]!r}" for name in differing))
    if k.shape[1] != h or v.shape[-1] != d:
        raise NotImplementedError("NystromAttention has no grouped kv heads and values of the head dim")
    if scale is not None and scale != d**-0.5:
        raise NotImplementedError("NystromAttention scales by dim_head ** -0.5")
    if n % num_landmarks and padding != "front":
        raise NotImplementedError("NystromAttention pads the sequence in front to a multiple of num_landmarks")
    if conv_kernel is not None and conv_kernel.shape[1] % 2 == 0:
        raise NotImplementedError("NystromAttention's residual convolution pads kernel // 2 on both sides (odd kernels)")
    module = NystromAttention(3 * h * d, dim_head=d, heads=h, num_landmarks=num_landmarks,
                              pinv_iterations=pinv_iterations, residual=conv_kernel is not None,
                              residual_conv_kernel=1 if conv_kernel is None else conv_kernel.shape[1]).to(q.dtype)  # fmt: skip
    with torch.no_grad():
        module.to_qkv.weight.copy_(torch.eye(3 * h * d, dtype=q.dtype))
    module.to_out = torch.nn.Identity()
    if conv_kernel is not None:
        del module.res_conv.weight  # a plain tensor instead of a parameter: gradients reach the case's kernel
        module.res_conv.weight = conv_kernel[:, None, :, None]  # (H, 1, K, 1)
    merged = lambda t: t.transpose(1, 2).reshape(b, n, h * d)  # noqa: E731  (B, H, N, D) -> (B, N, H·D)
    out = module(torch.cat([merged(q), merged(k), merged(v)], dim=-1), mask=key_padding_mask)
    return out.reshape(b, n, h, d).transpose(1, 2)


nystrom_case = from_torch(nystrom_self_attention)

GALLERY = (
    Entry("nystrom-attention", "nystrom_attention.NystromAttention", "nystrom_case", "nystrom", "float64", True),
    Entry("nystrom-attention", "nystrom_attention.NystromAttention", "nystrom_case", "nystrom", "float32", True),
)

#: nystrom-attention 0.0.14, nystrom_attention/nystrom_attention.py as installed (`NystromAttention.forward`).
EXPLANATIONS = {
    "PADDING_MASK": "a padded token's own row is not refattn's: the library zeroes its q, k, v (`t * mask[..., None]`, "
    "line 89) and fills its masked scores with `-torch.finfo(q.dtype).max` (`sim1.masked_fill_`, lines 123-124), so "
    "the row is uniform over the landmarks where refattn's preset gives the masked-row value. Real rows agree (the "
    "landmark divisor `mask_landmarks_sum[..., None] + eps`, line 105, adds 1e-8 to an integer count in float32, "
    "where it is lost: the preset's landmark_eps is 0).",
}
