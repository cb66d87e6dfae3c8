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
from performer_pytorch import FastAttention

from _gallery_entry import Entry
from refattn.conformance.adapters import from_torch
from refattn.lowrank import performer_attention

#: What FastAttention's softmax kernel fixes (softmax_kernel's eps=1e-4, stabilisers torch.amax), by refattn parameter.
LIBRARY_FIXED = dict(query_stabilizer="row", key_stabilizer="global", feature_eps=1e-4, denominator_guard=0.0)
#: causal_linear_attention_noncuda adds eps = 1e-6 to every cumulative key feature; linear_attention adds nothing.
DENOMINATOR_FEATURE_EPS = {True: 1e-6, False: 0.0}


def refattn_params(module) -> dict:
    """``omega``, ``causal`` and ``preset`` for ``performer_attention`` from a ``FastAttention`` module."""
    if module.generalized_attention or module.no_projection:
        raise NotImplementedError("refattn's Performer is the softmax kernel (FAVOR+): not generalized_attention or no_projection")
    return dict(omega=module.projection_matrix.detach().double().numpy(), causal=module.causal, preset="lucidrains")


def performer_lucidrains(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """``module(q, k, v)`` computed by refattn, in q's dtype."""
    arrays = (t.detach().double().numpy() for t in (q, k, v))
    return torch.from_numpy(performer_attention(*arrays, backend=backend, **refattn_params(module)).out).to(q.dtype)


def fast_attention(q, k, v, *, omega, causal=False, denominator_feature_eps=0.0, preset=None, **behaviours):
    """The other direction, for the gallery: a case's q, k, v (B, H, N, D) through ``FastAttention`` with ``omega``."""
    if k.shape[1] != q.shape[1]:
        raise NotImplementedError("FastAttention has no grouped kv heads")
    differing = sorted(name for name, value in behaviours.items() if LIBRARY_FIXED.get(name, value) != value)
    if differing or denominator_feature_eps != DENOMINATOR_FEATURE_EPS[causal]:
        fixed = {**LIBRARY_FIXED, "denominator_feature_eps": DENOMINATOR_FEATURE_EPS[causal]}
        names = differing + (["denominator_feature_eps"] if denominator_feature_eps != fixed["denominator_feature_eps"] else [])
        raise NotImplementedError("FastAttention fixes " + ", ".join(f"{name}={fixed[name]!r}" for name in names))
    module = FastAttention(dim_heads=q.shape[-1], nb_features=omega.shape[0], causal=causal).to(q.dtype)
    with torch.no_grad():
        module.projection_matrix.copy_(omega)
    return module(q, k, v)


performer_case = from_torch(fast_attention)

GALLERY = (
    Entry("performer-pytorch", "performer_pytorch.FastAttention", "performer_case", "performer", "float64", True),
    Entry("performer-pytorch", "performer_pytorch.FastAttention", "performer_case", "performer", "float32", True),
)

#: FastAttention passes every Performer case it can express.
EXPLANATIONS: dict[str, str] = {}
