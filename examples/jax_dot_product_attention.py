"""Verify ``jax.nn.dot_product_attention`` against refattn's dense cases.

::

    refattn verify --mechanism dense --impl examples/jax_dot_product_attention.py:attention \\
                   --layout bnhd --dtype float32 --grad

JAX lays arrays out as (B, N, H, D) (``--layout bnhd``) and returns the
log-sum-exp with ``return_residual=True``. It has no logit soft-cap and no
given dropout keep-mask: those cases raise ``NotImplementedError``
(``unsupported``). Causality and windows go to JAX's own ``is_causal`` and
``local_window_size``, whatever their alignment: the gallery
(docs/compatibility.md) records what that gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from refattn.conformance.adapters import from_jax


def dot_product_attention(q, k, v, *, mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
                          scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0):  # fmt: skip
    """refattn's dense attention arguments on JAX arrays (B, N, H, D); returns (out, lse) with lse (B, N, H)."""
    if softcap > 0:
        raise NotImplementedError("jax.nn.dot_product_attention has no logit soft-cap")
    if dropout_keep is not None or dropout_p > 0:
        raise NotImplementedError("jax.nn.dot_product_attention has no dropout")
    if v.shape[-1] != q.shape[-1]:
        raise NotImplementedError("jax.nn.dot_product_attention needs v's head dim equal to q's (_check_shape_and_dtype)")
    heads = q.shape[2]
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:-2] + mask.shape[-2:]).reshape((1,) * (4 - mask.ndim) + mask.shape)
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    local = None if window is None else tuple(-1 if side is None else side for side in window)
    out, lse = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, scale=scale, is_causal=causal, local_window_size=local, return_residual=True
    )
    lse = lse if lse.shape[1] == q.shape[1] and lse.shape[2] == heads else jnp.swapaxes(lse, 1, 2)  # to (B, N, H)
    return out, lse


attention = from_jax(dot_product_attention)


def dot_product_attention_out(q, k, v, **params):
    """Only the output: JAX's log-sum-exp is ``lax.stop_gradient``-ed, so gradients are checked for dout alone."""
    return dot_product_attention(q, k, v, **params)[0]


attention_out = from_jax(dot_product_attention_out)
