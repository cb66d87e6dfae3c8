"""Compatibility presets of LSH attention: every behaviour on which HF transformers,
trax and lucidrains' reformer-pytorch differ, as one named value each.

A preset is a set of parameter values (spec/lsh.md, "How others differ",
gives each with its source line). ``preset=None`` is the canonical
semantics: the paper's, with the defaults HF and trax share, masks excluded
exactly (the convention of spec/README.md) and the padding bucket whenever a
key-padding mask is given. Explicit arguments of
:func:`refattn.lsh.lsh_attention` override the preset's values.

Besides its parameter values a preset has a ``length_rule``: the lengths its
implementation accepts. It only decides what is rejected (``SpecError``), never
a value, so it is not a parameter: a call that spells out the preset's values
without ``preset=`` computes the same function on any length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

#: Values of ``padding_bucket``: when padded tokens get a bucket of their own.
PADDING_BUCKETS = ("if_mask", "if_padded", "none")
#: Values of ``mask_mode``: how masked and self entries enter the logits.
MASK_MODES = ("replace", "add")
#: Values of ``key_norm``: how keys are length-normalised.
KEY_NORMS = ("rms", "l2")
#: Values of ``short_sequence``: what happens when N <= chunk_len.
SHORT_SEQUENCE = ("lsh", "full")
#: Values of ``padding_marks``: how padded tokens are told apart in step (8).
PADDING_MARKS = ("mask", "negated_positions")
#: Values of ``dup_count``: what step (9) counts.
DUP_COUNTS = ("occurrences", "reformer_pytorch")
#: Values of ``length_rule``: the lengths an implementation accepts.
LENGTH_RULES = ("any", "rounds_multiple", "double_chunk")


@dataclass(frozen=True)
class Preset:
    """One implementation's choices.

    Attributes
    ----------
    name : str or None
        ``None`` for the canonical semantics.
    num_chunks_before, num_chunks_after : int
        Neighbouring chunks (of the sorted, concatenated rounds) each query
        chunk also attends to, with wrap-around.
    key_norm : {"rms", "l2"}
        ``"rms"``: ``k̂ = x / sqrt(|x|² + D·eps)``, which is HF's
        ``_len_norm`` (``x / sqrt(mean(x²) + eps)``) followed by ``/ sqrt(D)``,
        and trax's ``length_normalized`` followed by the same division;
        ``"l2"``: ``k̂ = x / max(|x|, eps)`` (``torch.nn.functional.normalize``).
    key_norm_eps : float
        ``eps`` above: 1e-6 (HF, trax), 1e-12 (torch's default).
    scale : float or None
        Logit scale ``s = scale · q · k̂``: 1 for HF and trax, whose keys are
        unit length (HF and trax divide the rms-normalised key by sqrt(D));
        ``None``, meaning 1/sqrt(D), for lucidrains, which scales the dot
        products of unit keys by ``dim ** -0.5`` once more.
    self_mask_value : float
        Logit of a query's own key (its copy in any round): the float32 value.
    mask_value : float or None
        Logit of a masked (causal, padded) key; ``None`` excludes it exactly.
    mask_mode : {"replace", "add"}
        ``"replace"``: a masked entry becomes ``mask_value``, then a self entry
        becomes ``self_mask_value`` whatever it was (HF ``torch.where``,
        lucidrains ``masked_fill_``). ``"add"``: both constants are added to
        the score, cumulatively (trax ``dots - 1e9 * mask``, ``- 1e5 * self``).
    mask_padded_queries : bool
        A padded query's row masks every key (lucidrains multiplies the query
        and key padding masks); otherwise padding masks keys only.
    padding_marks : {"mask", "negated_positions"}
        ``"mask"``: a token is padded where ``key_padding_mask`` is False, as
        a key (masked) and as a query (its own pair is a self pair).
        ``"negated_positions"`` (trax): step (8) decides from trax's marks,
        ``info = n + 1`` for a real token and ``1 - n`` for a padded one (trax
        negates the position and adds 1 in ``attend``): a pair is a self pair
        when the marks are equal (``i == j`` with ``j`` real, or ``i = j = 0``),
        a key is padded when its mark is negative (``n >= 2``), causally
        masked when ``info_i < info_j`` (never for a padded key). So a padded
        token at ``n >= 1`` gets no self value, and padded keys at positions
        0 and 1 are not masked.
    padding_bucket : {"if_mask", "if_padded", "none"}
        Padded tokens get the extra bucket ``Π num_buckets`` (and each round
        ``Π num_buckets + 1`` bucket ids) whenever a mask is given (trax),
        only when some token of the batch is padded (HF), or never (lucidrains).
    dup_correction : bool
        Subtract ``log n_ij`` (how often key j appears in query i's windows).
    dup_count : {"occurrences", "reformer_pytorch"}
        What ``dup_correction`` subtracts. ``"occurrences"``: ``log n_ij``,
        ``n_ij`` the occurrences of key ``j`` in query ``i``'s windows over
        all rounds (spec/lsh.md step (9); right: every key then counts once).
        ``"reformer_pytorch"`` reproduces reformer-pytorch's defect: the
        same-round count ``n'_ij`` (occurrences through windows of the same
        round only), and ``log(n'_ij + 1e-9)`` rounded to float32, so a key
        seen only through another round's window gets ``-log(1e-9) = +20.7``.
    short_sequence : {"lsh", "full"}
        With ``"full"``, N <= chunk_len runs one dense round over all keys
        with the same logits (HF, lucidrains).
    length_rule : {"any", "rounds_multiple", "double_chunk"}
        ``"rounds_multiple"``: ``num_hashes · N`` divisible by ``chunk_len``
        (HF, trax reshape the sorted rounds into chunks); ``"double_chunk"``:
        ``N`` divisible by ``2 · chunk_len`` (lucidrains' assertion). Not
        checked on the short-sequence path.
    self_mask_value_float16, mask_value_float16 : float or None
        The constants the implementation switches to for float16 logits;
        documentation only (the reference uses the float32 values).
    """

    name: str | None
    num_chunks_before: int = 1
    num_chunks_after: int = 0
    key_norm: str = "rms"
    key_norm_eps: float = 1e-6
    scale: float | None = 1.0
    self_mask_value: float = -1e5
    mask_value: float | None = None
    mask_mode: str = "replace"
    mask_padded_queries: bool = False
    padding_marks: str = "mask"
    padding_bucket: str = "if_mask"
    dup_correction: bool = False
    dup_count: str = "occurrences"
    short_sequence: str = "lsh"
    length_rule: str = "any"
    self_mask_value_float16: float | None = None
    mask_value_float16: float | None = None


#: Names of the parameters a preset sets (its fields less the documentation-only ones).
PARAMETERS = (
    "num_chunks_before",
    "num_chunks_after",
    "key_norm",
    "key_norm_eps",
    "scale",
    "self_mask_value",
    "mask_value",
    "mask_mode",
    "mask_padded_queries",
    "padding_marks",
    "padding_bucket",
    "dup_correction",
    "dup_count",
    "short_sequence",
)

CANONICAL = Preset(name=None)

#: HF transformers, src/transformers/models/reformer/modeling_reformer.py (LSHSelfAttention).
HF = Preset(
    name="hf",
    mask_value=-1e9,
    padding_bucket="if_padded",
    short_sequence="full",
    length_rule="rounds_multiple",
    self_mask_value_float16=-1e3,
    mask_value_float16=-1e4,
)

#: trax, trax/layers/research/efficient_attention.py (LSHSelfAttention, attend, mask_self_attention),
#: google/trax 7c189c2c3a37851df7fc641b322a99bbe9f8aa10.
TRAX = Preset(
    name="trax",
    mask_value=-1e9,
    mask_mode="add",
    padding_marks="negated_positions",
    length_rule="rounds_multiple",
)

#: lucidrains/reformer-pytorch, reformer_pytorch/reformer_pytorch.py (LSHAttention, LSHSelfAttention),
#: lucidrains/reformer-pytorch 66a19b6caf481a880c97d331306aba55d2ae4b9c (file identical to the PyPI release 1.4.4).
LUCIDRAINS = Preset(
    name="lucidrains",
    key_norm="l2",
    key_norm_eps=1e-12,
    scale=None,
    self_mask_value=-5e4,
    mask_value=-float(np.finfo(np.float32).max),
    mask_padded_queries=True,
    padding_bucket="none",
    dup_count="reformer_pytorch",
    short_sequence="full",
    length_rule="double_chunk",
    self_mask_value_float16=-5e4,
    mask_value_float16=-float(np.finfo(np.float16).max),
)

PRESETS = {preset.name: preset for preset in (CANONICAL, HF, TRAX, LUCIDRAINS)}


def preset_values(preset: Preset) -> dict:
    """The parameter values a preset sets, keyed by parameter name."""
    return {f.name: getattr(preset, f.name) for f in fields(preset) if f.name in PARAMETERS}
