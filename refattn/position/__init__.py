"""Relative position encodings (spec/position.md).

Each encoding is a pure function of explicit positions, composable with
attention through the ``bias=`` hook (ALiBi, T5) or a q/k transform (RoPE,
xPos), and registered as a mechanism "encoding + dense attention" with its own
conformance cases. Shaw et al. and Transformer-XL change the score itself
(terms in the values, or q-dependent position terms), so they are attention
functions of their own.
"""

from .alibi import alibi_attention, alibi_attention_vjp, alibi_bias, alibi_slopes
from .rope import apply_rope, rope_angles, rope_attention, rope_attention_vjp
from .shaw import relative_index, shaw_attention, shaw_attention_vjp
from .t5 import relative_position_bucket, t5_attention, t5_attention_vjp, t5_bias
from .transformer_xl import (
    rel_shift,
    relative_position_scores,
    sinusoid_relative_embeddings,
    transformer_xl_attention,
    transformer_xl_attention_vjp,
)
from .xpos import apply_xpos, xpos_attention, xpos_attention_vjp, xpos_scales

__all__ = [
    "alibi_slopes", "alibi_bias", "alibi_attention", "alibi_attention_vjp",
    "relative_position_bucket", "t5_bias", "t5_attention", "t5_attention_vjp",
    "rope_angles", "apply_rope", "rope_attention", "rope_attention_vjp",
    "xpos_scales", "apply_xpos", "xpos_attention", "xpos_attention_vjp",
    "relative_index", "shaw_attention", "shaw_attention_vjp",
    "sinusoid_relative_embeddings", "rel_shift", "relative_position_scores",
    "transformer_xl_attention", "transformer_xl_attention_vjp",
]  # fmt: skip
