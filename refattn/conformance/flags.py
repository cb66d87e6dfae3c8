"""The flag catalogue: the bug classes conformance cases are built to catch.

As in Project Wycheproof, a flag names a *mistake an implementation can make*,
not a feature. Each case lists the flags it targets, and is built so that an
implementation making that mistake fails it (for example, every
``CAUSAL_ALIGNMENT`` case has ``Nq != Nk``, where the two alignments differ).
The manifest carries the description of every flag its cases use, so a
consumer reading a failure learns what to look for without reading our code.

This module holds the flags several mechanisms share. A flag only one
mechanism's cases use is described in that mechanism's ``cases.py``
(``FLAGS``, read through ``Mechanism.flags()``); :func:`catalogue` joins
them, and a name may be described in one place only. Add a flag together with
the first case that uses it; a test checks that every flag used is described
and every flag described is used.
"""

from __future__ import annotations

FLAGS: dict[str, str] = {
    # Layout, shapes and scale.
    "BASELINE": (
        "Plain softmax(q k^T / sqrt(D)) v with no options. Fails an implementation that is wrong at the core: "
        "(B, H, N, D) layout misread, k not transposed, rows not normalised. Start debugging here."
    ),
    "SCALE_DEFAULT": (
        "The default logit scale is 1/sqrt(D), D the head dim of q and k (not of v, not 1/D, not sqrt(D)). "
        "Cases use a D that is not a perfect square, or Dv != D, so every other choice gives different outputs."
    ),
    "SCALE_OVERRIDE": (
        "An explicit `scale` replaces 1/sqrt(D) entirely (it is not multiplied with it), and the gradients of q "
        "and k carry the same factor."
    ),
    "AWKWARD_HEAD_DIM": (
        "Head dim D = 59: not a multiple of 8, 16 or 64. Fails kernels that assume padded or vector-aligned "
        "head dims and read or drop the wrong tail elements."
    ),
    "VALUE_DIM_DIFFERS": (
        "v has a head dim Dv different from q and k's D. Fails implementations that size the output or dv by D, "
        "or scale by 1/sqrt(Dv)."
    ),
    "ODD_LENGTH": (
        "Sequence lengths that are odd and not multiples of common tile sizes (16, 32, 64, 128), including one "
        "above 64. Fails tiled kernels with wrong tail handling."
    ),
    "UNEQUAL_LENGTHS": (
        "Nq != Nk (cross attention, decoding with a cache). Fails implementations that use one length for both "
        "axes or transpose the score matrix."
    ),
    "SINGLE_TOKEN": (
        "Nq = 1 and/or Nk = 1. A single key gets weight exactly 1; a single query is the decoding step. Fails "
        "kernels whose tiling or reductions break on a length-one axis."
    ),
    "MULTI_BATCH": (
        "B >= 2 with different data (and masks) per batch element. Fails kernels that index the batch axis "
        "wrongly or broadcast one element's mask or lengths to all."
    ),
    # Grouped-query heads.
    "GQA_HEAD_MAP": (
        "Hq > Hkv >= 2 with distinct kv heads: query head h must read kv head h // (Hq // Hkv) (repeat-interleave, "
        "as PyTorch), not h % Hkv (tiling)."
    ),
    "MULTI_QUERY": (
        "Hkv = 1 (MQA): every query head reads the one kv head. Fails kernels whose stride-0 head broadcast is "
        "wrong, and dk/dv that are not summed over all query heads."
    ),
    "GQA_GRAD_REDUCTION": (
        "With Hq > Hkv, the gradient of a kv head is the sum over the query heads that read it. Fails backwards "
        "that keep one query head's gradient, average instead of sum, or reduce with the tiling map."
    ),
    # Masks, causality and windows.
    "CAUSAL_MASK": "Causal masking with Nq = Nk: query i sees keys j <= i, the diagonal included.",
    "CAUSAL_ALIGNMENT": (
        "Causal (or windowed) attention with Nq != Nk, where the two alignments differ: bottom_right (default; "
        "query i sees j <= i + Nk - Nq, as KV caches need) and top_left (PyTorch is_causal; j <= i). Fails an "
        "implementation that uses the other alignment than the case's `causal_alignment`."
    ),
    "SLIDING_WINDOW": (
        "window = (left, right) keeps keys i' - left <= j <= i' + right around the aligned query position i', "
        "both ends inclusive; a None side is unbounded. Fails off-by-one bounds and windows measured from the "
        "wrong alignment."
    ),
    "WINDOW_WIDER_THAN_SEQUENCE": (
        "A window wider than the sequence restricts nothing beyond causality. Fails kernels whose bound "
        "arithmetic wraps around or clamps wrongly (unsigned i - left, tile counts from the window)."
    ),
    "MASK_LAYOUT": (
        "A full (B, H, Nq, Nk) boolean mask with no structure, True = may attend. Fails implementations that "
        "invert the mask's meaning, transpose it or read it with the wrong strides."
    ),
    "MASK_BROADCAST": (
        "A mask with fewer dimensions or size-1 axes, broadcast to (B, H, Nq, Nk) by right-aligned NumPy rules. "
        "Fails implementations that broadcast along the wrong axes."
    ),
    "MASK_COMBINATION": (
        "A user mask together with causality and a window: a key is kept only if all of them allow it (logical "
        "AND). Fails implementations that let one replace another."
    ),
    "PADDING_MASK": (
        "Per-batch key (or query) padding expressed as a mask. Padded keys get weight 0; padded queries are "
        "fully masked rows."
    ),
    "FULLY_MASKED_ROW": (
        "A query row with no key allowed must give output 0, log-sum-exp -inf and gradient 0, never NaN. Fails "
        "kernels that compute exp(-inf - -inf), divide by a zero sum, or mask with a large finite number."
    ),
    # Numerics of the logits.
    "LARGE_LOGITS": (
        "Logit scale 1e3, so scores reach thousands. Fails a softmax without max-subtraction (exp overflows to "
        "inf and the output becomes NaN) and an online softmax that rescales wrongly."
    ),
    "SOFTCAP": (
        "Soft-capping c * tanh(s / c) with c small against the scores, so the cap saturates. Fails a wrong cap "
        "formula and a backward without the factor 1 - tanh^2(s / c)."
    ),
    "SOFTCAP_BEFORE_BIAS": (
        "The soft-cap applies to the scaled scores before the bias is added: c * tanh(s / c) + b, not "
        "c * tanh((s + b) / c). Cases use a bias large enough for the two to differ."
    ),
    "SOFTCAP_BEFORE_MASK": (
        "The soft-cap applies before masking. Capping after masking turns -inf into the finite -c (and so does "
        "masking with a large finite number), which gives masked keys weight."
    ),
    "BIAS": (
        "A full (B, H, Nq, Nk) additive bias, added after scaling and soft-capping and before masking; its "
        "gradient is the gradient of the logits."
    ),
    "BIAS_BROADCAST": (
        "A bias with size-1 or missing axes (e.g. (1, H, 1, Nk) or (Nq, Nk)). Its gradient has the bias's own "
        "shape: the logits' gradient summed over the broadcast axes."
    ),
    "DROPOUT_SCALING": (
        "A given dropout keep-mask applies after the softmax: kept weights are divided by 1 - p, dropped ones "
        "are 0, and the log-sum-exp is that of the undropped logits. Fails missing 1/(1 - p), dropping before "
        "normalising, and lse computed after dropout."
    ),
    "LSE_DEFINITION": (
        "The log-sum-exp is the natural log of sum exp over the final logits: scaled, soft-capped, biased and "
        "masked. Fails kernels that return it in base 2, or of unscaled or unbiased scores."
    ),
    "LSE_GRADIENT": (
        "The cotangent of the log-sum-exp contributes P * dlse to the logits' gradient. With a single key the "
        "output's cotangent contributes nothing to dq and dk, so a backward that ignores dlse gets them wrong."
    ),
    "LONG_SEQUENCE": (
        "Sequences of thousands to 65536 tokens (large suite only, forward only): fails kernels whose indices "
        "overflow 16 bits, whose tiling breaks at many tiles, or whose accumulation drifts with length."
    ),
}


def catalogue() -> dict[str, str]:
    """Every flag description: this module's shared :data:`FLAGS` and each registered mechanism's own.

    A mechanism's own flags are ``Mechanism.flags()`` (``FLAGS`` in its
    ``cases.py``). Mechanisms that share a flag may each quote its one
    description (xPos quotes RoPE's rotation flags).

    Raises
    ------
    ValueError
        If one flag name is given two different descriptions.
    """
    found, conflicts = _collect()
    if conflicts:
        raise ValueError(conflicts[min(conflicts)])
    return found


def describe(names) -> dict[str, str]:
    """The catalogue entries (:func:`catalogue`) for ``names``, sorted by name.

    Raises
    ------
    KeyError
        Naming every flag that no catalogue describes.
    ValueError
        If one of ``names`` is given two different descriptions.
    """
    found, conflicts = _collect()
    unknown = sorted(set(names) - set(found))
    if unknown:
        raise KeyError(f"flags described neither in refattn/conformance/flags.py nor in a cases.py FLAGS: {unknown}")
    clashing = sorted(set(names) & set(conflicts))
    if clashing:
        raise ValueError(conflicts[clashing[0]])
    return {name: found[name] for name in sorted(set(names))}


def _collect() -> tuple[dict[str, str], dict[str, str]]:
    """Every description (the first one met for a name) and, per name described two ways, what clashes."""
    from ..core import registry

    found = dict(FLAGS)
    where = {name: "refattn/conformance/flags.py" for name in FLAGS}
    conflicts = {}
    for mechanism in registry.names():
        for name, text in registry.get(mechanism).flags().items():
            # A shared flag is described here only; mechanisms sharing a flag of their own (xPos quoting
            # RoPE's rotation flags) may each quote its one description, word for word.
            if name in FLAGS:
                conflicts.setdefault(name, f"flag {name} is described in {where[name]} and again in {mechanism}'s cases.py")
            elif name in found and found[name] != text:
                conflicts.setdefault(
                    name, f"flag {name} is described differently in {where[name]} and in {mechanism}'s cases.py"
                )
            found.setdefault(name, text)
            where.setdefault(name, f"{mechanism}'s cases.py")
    return found, conflicts
