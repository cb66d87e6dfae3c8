"""Run lucidrains' ``nystrom-attention`` (``NystromAttention``) through refattn's Nyströmformer.

``refattn_inputs(module, x, mask=None)`` reads the module's weights into
refattn's explicit inputs: q, k, v from ``to_qkv(x)`` (heads split as
``rearrange(t, 'b n (h d) -> b h n d')``), the depthwise residual
convolution ``res_conv.weight[:, 0, :, 0]`` as ``conv_kernel`` (H, K), the
mask as ``key_padding_mask``, and ``preset="lucidrains"`` (batch-global Z₀
norms, front padding, landmark eps 1e-8, every kernel masked).
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

from refattn.lowrank import nystrom_attention


def refattn_inputs(module, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """``(q, k, v, params)`` for ``nystrom_attention`` from the module's weights and its input, float64."""
    b, n, _ = x.shape
    with torch.no_grad():
        q, k, v = (t.reshape(b, n, module.heads, -1).transpose(1, 2).double().numpy() for t in module.to_qkv(x).chunk(3, dim=-1))
    conv = module.res_conv.weight.detach()[:, 0, :, 0].double().numpy() if module.residual else None  # (H, K)
    params = dict(num_landmarks=module.num_landmarks, pinv_iterations=module.pinv_iterations, conv_kernel=conv,
                  key_padding_mask=None if mask is None else mask.numpy().astype(bool), scale=module.scale,
                  preset="lucidrains", landmark_eps=module.eps)  # fmt: skip
    return q, k, v, params


def nystrom_lucidrains(module, x: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "reference") -> torch.Tensor:
    """``module(x, mask=mask)`` computed by refattn: ``to_out(nystrom_attention(...))``, in x's dtype."""
    q, k, v, params = refattn_inputs(module, x, mask)
    out = nystrom_attention(q, k, v, backend=backend, **params).out  # (B, H, N, Dh)
    merged = torch.from_numpy(out).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, N, H·Dh)
    with torch.no_grad():
        return module.to_out(merged.to(x.dtype))
