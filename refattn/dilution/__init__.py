"""Attention dilution: diagnostics and the mechanisms that counter it (spec/dilution.md).

As the number of keys n grows, each query's softmax mass spreads over more
keys (weights 1/n in the uniform case) and noise keys take mass from the
relevant ones. SSMax and log-n scaling sharpen the logits with log n;
differential attention subtracts a second softmax map to cancel common noise.
"""

from .analysis import equal_keys
from .diagnostics import Diagnostics, attention_diagnostics, diagnostics_from_weights, logit_diagnostics
from .differential import differential_attention, differential_attention_vjp, key_heads, lambda_init_from_depth
from .logn import logn_attention, logn_attention_vjp
from .ssmax import attended_counts, ssmax_attention, ssmax_attention_vjp

__all__ = [
    "Diagnostics", "attention_diagnostics", "logit_diagnostics", "diagnostics_from_weights", "equal_keys",
    "ssmax_attention", "ssmax_attention_vjp", "attended_counts",
    "logn_attention", "logn_attention_vjp",
    "differential_attention", "differential_attention_vjp", "lambda_init_from_depth", "key_heads",
]  # fmt: skip
