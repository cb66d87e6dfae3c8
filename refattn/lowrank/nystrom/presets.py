"""Compatibility presets of Nyströmformer: every behaviour on which the paper's
form, lucidrains' nystrom-attention and HF transformers' Nystromformer differ,
one named value each (spec/low_rank.md, "Nyströmformer: how others differ").

``preset=None`` is the canonical form; explicit arguments override a preset.
"""

from __future__ import annotations

#: Values of ``pinv_init``: over what the norms of Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞) are taken.
PINV_INITS = ("per_matrix", "batch_global")
#: Values of ``padding``: what a length that m does not divide gets.
PADDINGS = ("none", "front")
#: Values of ``mask_scope``: where a key padding mask acts.
MASK_SCOPES = ("all", "kernel3")

#: The parameters a preset sets, and their canonical values.
CANONICAL = dict(pinv_init="per_matrix", padding="none", landmark_eps=0.0, mask_scope="all", full_rank_shortcut=False)

PRESETS = {
    None: CANONICAL,
    # lucidrains/nystrom-attention, nystrom_attention/nystrom_attention.py (moore_penrose_iter_pinv, NystromAttention.forward).
    # Its landmark divisor ``mask_landmarks_sum[..., None] + eps`` adds eps = 1e-8 to an integer count, which makes a
    # float32 tensor: count + 1e-8 rounds to count for every count >= 1, so the divisor is the count (an empty segment,
    # sum 0, gives 0 either way): landmark_eps 0 (nystrom-attention 0.0.14, read as installed).
    "lucidrains": dict(CANONICAL, pinv_init="batch_global", padding="front"),
    # huggingface/transformers, models/nystromformer/modeling_nystromformer.py (NystromformerSelfAttention).
    "hf": dict(CANONICAL, pinv_init="batch_global", mask_scope="kernel3", full_rank_shortcut=True),
}
