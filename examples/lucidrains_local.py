"""Run lucidrains' ``local-attention`` (``LocalAttention``) on refattn's local-attention vectors.

``lucidrains_local(q, k, v, **params)`` builds ``LocalAttention`` from the
case's parameters and runs its forward on the case's arrays (it takes
(B, H, N, D) directly; ``rotary`` turns on its ``SinusoidalEmbeddings`` over
the head dim). The package's two defects are behaviours of the
``"lucidrains"`` preset:

* ``rotary_query_shift``: the package always shifts the queries' rotary
  positions by ``window_size * look_forward``; a case that asks for the
  canonical positions with ``rotary`` and ``look_forward > 0`` raises
  ``NotImplementedError``.
* ``attend_padding``: the package attends to the zero padding keys unless an
  input mask is given; for the canonical value the adapter passes an
  all-True ``mask`` of length N, which the package pads with False.

Grouped kv heads and a self score other than the package's -5e4 raise
``NotImplementedError``. The package returns no log-sum-exp (results are
``partial``). Its rotary frequencies are a float32 buffer (``inv_freq``,
``SinusoidalEmbeddings``), so rotary cases reach float32 accuracy only
(9e-8 on ``local/lucidrains_rotary_shift``); the rest agree to 1e-15::

    refattn verify --mechanism local --impl examples/lucidrains_local.py:lucidrains_local \\
        --vjp examples/lucidrains_local.py:lucidrains_local_vjp --grad
"""

from __future__ import annotations

import torch
from local_attention import LocalAttention

from _gallery_entry import Entry
from refattn.core.results import Result

TOKEN_SELF_ATTN_VALUE = -5e4


def _forward(q, k, v, *, window_size, causal=False, look_backward=1, look_forward=None, exact_windowsize=False,
             shared_qk=False, self_score=TOKEN_SELF_ATTN_VALUE, rotary=False, autopad=False, preset=None,
             attend_padding=None, rotary_query_shift=None, scale=None):  # fmt: skip
    look_forward = (0 if causal else 1) if look_forward is None else look_forward
    if k.shape[1] != q.shape[1]:
        raise NotImplementedError("local-attention has no grouped kv heads")
    if shared_qk and self_score != TOKEN_SELF_ATTN_VALUE:
        raise NotImplementedError("local-attention's self score is -5e4")
    if rotary and look_forward > 0 and not rotary_query_shift:
        raise NotImplementedError("local-attention always shifts rotary queries by window_size * look_forward")
    module = LocalAttention(window_size=window_size, causal=causal, look_backward=look_backward,
                            look_forward=look_forward, shared_qk=shared_qk, autopad=autopad,
                            exact_windowsize=exact_windowsize, dim=q.shape[3] if rotary else None,
                            use_rotary_pos_emb=rotary, scale=scale)  # fmt: skip
    mask = None if attend_padding else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)  # repeated per head
    return module(q, k, v, mask=mask)


def lucidrains_local(q, k, v, **params) -> Result:
    """LocalAttention's forward on a case: ``Result(out, lse=None)``, NumPy in and out."""
    with torch.no_grad():
        out = _forward(*(torch.tensor(x, dtype=torch.float64) for x in (q, k, v)), **params)
    return Result(out=out.numpy(), lse=None)


def lucidrains_local_vjp(dout, q, k, v, *, dlse=None, **params) -> dict:
    """Gradients of ``<dout, out>`` by autograd through the package."""
    leaves = {n: torch.tensor(x, dtype=torch.float64, requires_grad=True) for n, x in zip("qkv", (q, k, v))}
    (_forward(leaves["q"], leaves["k"], leaves["v"], **params) * torch.tensor(dout)).sum().backward()
    return {n: t.grad.numpy() for n, t in leaves.items()}


GALLERY = (
    Entry("local-attention", "local_attention.LocalAttention", "lucidrains_local", "local", "float32", True,
          vjp="lucidrains_local_vjp"),
    Entry("local-attention", "local_attention.LocalAttention", "lucidrains_local", "local", "float64", False),
)  # fmt: skip

#: local-attention 1.11.2, local_attention/rotary.py as installed.
EXPLANATIONS = {
    "FLOAT64": "the rotary frequencies are a float32 buffer whatever the input dtype: `inv_freq = 1. / (theta ** "
    "(torch.arange(0, dim, 2).float() / dim))` (local_attention/rotary.py lines 20-21, `SinusoidalEmbeddings."
    "__init__`), so the rotary cases reach float32 accuracy only; the others agree to 1e-15.",
}
