"""Run lucidrains' ``performer-pytorch`` (``FastAttention``) through refattn's Performer.

``refattn_params(module)`` reads the module's random features into refattn's
explicit inputs: ``omega = projection_matrix`` (nb_features, dim_heads), the
module's ``causal``, and ``preset="lucidrains"`` (query rows stabilised by
their maximum, keys by one maximum over all keys and features of each
(batch, head), ε = 1e-4 after ``exp``, and in causal mode +1e-6 per
cumulative feature in the denominator). ``performer_lucidrains(module, q, k, v)``
runs ``performer_attention`` on the module's own (B, H, N, D) inputs,
comparable with ``module(q, k, v)``. The features are the module's: redraw
them (``redraw_projection_matrix``) and the adapter reads the new ones.

* Only the softmax kernel (FAVOR+) is refattn's Performer: a module built
  with ``generalized_attention=True`` (ReLU features) or
  ``no_projection=True`` raises ``NotImplementedError``.
* Causal mode without ``fast_transformers`` is
  ``causal_linear_attention_noncuda``; its ``chunk(128, dim=-2)`` cuts the
  sequence into 128 pieces and carries the prefix sums across them, the same
  sums as refattn's prefix in another order. That key maximum spans future
  keys (``torch.amax(data_dash, dim=(-1, -2))``), so causal outputs depend on
  later keys: refattn's preset reproduces it (flag
  ``PERFORMER_CAUSAL_KEY_MAX``), and the canonical causal form differs.

lucidrains/performer-pytorch ``performer_pytorch/performer_pytorch.py`` at
version 1.1.4 (commit fc8b78441b1e27eb5d9b01fc738a8772cee07127): ``softmax_kernel``,
``linear_attention``, ``causal_linear_attention_noncuda``. Tests: tests/test_lowrank_peers.py.
"""

from __future__ import annotations

import torch

from refattn.lowrank import performer_attention


def refattn_params(module) -> dict:
    """``omega``, ``causal`` and ``preset`` for ``performer_attention`` from a ``FastAttention`` module."""
    if module.generalized_attention or module.no_projection:
        raise NotImplementedError("refattn's Performer is the softmax kernel (FAVOR+): not generalized_attention or no_projection")
    return dict(omega=module.projection_matrix.detach().double().numpy(), causal=module.causal, preset="lucidrains")


def performer_lucidrains(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """``module(q, k, v)`` computed by refattn, in q's dtype."""
    arrays = (t.detach().double().numpy() for t in (q, k, v))
    return torch.from_numpy(performer_attention(*arrays, backend=backend, **refattn_params(module)).out).to(q.dtype)
