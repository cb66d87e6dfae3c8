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

import functools

import jax
import jax.numpy as jnp

from _gallery_entry import Entry
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
    unbounded = max(q.shape[1], k.shape[1])  # JAX has no "no bound" value: -1 would exclude the diagonal
    local = None if window is None else tuple(unbounded if side is None else side for side in window)
    out, lse = _compiled(scale, causal, local)(q, k, v, bias, mask)
    lse = lse if lse.shape[1] == q.shape[1] and lse.shape[2] == heads else jnp.swapaxes(lse, 1, 2)  # to (B, N, H)
    return out, lse


@functools.cache
def _compiled(scale, is_causal, local_window_size):
    """``jax.nn.dot_product_attention`` with its settings fixed, compiled once per input shape.

    One XLA compilation per case is much faster than running its many small operations eagerly.
    """
    attend = functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=is_causal,
                               local_window_size=local_window_size, return_residual=True)  # fmt: skip
    return jax.jit(lambda q, k, v, bias, mask: attend(q, k, v, bias=bias, mask=mask))


attention = from_jax(dot_product_attention)


def dot_product_attention_out(q, k, v, **params):
    """Only the output: JAX's log-sum-exp is ``lax.stop_gradient``-ed, so gradients are checked for dout alone."""
    return dot_product_attention(q, k, v, **params)[0]


attention_out = from_jax(dot_product_attention_out)


GALLERY = (
    Entry("jax", "jax.nn.dot_product_attention (out, lse)", "attention", "dense", "float32", False, "bnhd"),
    Entry("jax", "jax.nn.dot_product_attention (out, lse)", "attention", "dense", "float64", False, "bnhd"),
    Entry("jax", "jax.nn.dot_product_attention (out only), gradients", "attention_out", "dense", "float32", True, "bnhd"),
)

#: jax 0.10.2, jax/_src/nn/functions.py as installed (the functions named below).
EXPLANATIONS = {
    "CAUSAL_ALIGNMENT": "`is_causal` and `local_window_size` are aligned top-left: `_get_causal_mask` is "
    "`jnp.tril(jnp.ones((T, S)))` (functions.py line 869) and `_get_window_mask` compares `query_pos` with "
    "`key_pos` directly (lines 872-878), so bottom-right bounds with Nq != Nk (decoding included) differ.",
    "FULLY_MASKED_ROW": "masked logits become `_get_large_negative` = -0.7 * finfo.max, not -inf (`_apply_masks`, "
    "line 921): a row with no key averages every value instead of giving 0, and its lse is finite.",
    "FLOAT64": "the softmax is computed in float32 whatever the input dtype (`padded_logits = padded_logits.astype("
    "np.float32)`, line 970, `_dot_product_attention_core`): float64 inputs get float32 accuracy, whatever else "
    "the case checks (the float32 rows show those).",
}
