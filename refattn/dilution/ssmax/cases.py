"""Conformance cases for Scalable-Softmax (SSMax) attention.

Each case is small and built so that the mistake its flags name changes the
numbers: the masked-count cases have rows whose attended count ``n_i``
differs from ``Nk`` (causal, bottom-right and top-left alignment, windows,
key padding, per-head masks), the per-head cases have a distinct ``s_h`` for
every query head under GQA, the single-key cases have rows with ``n_i = 1``
(factor ``s_bias_h``, since ``log 1 = 0``), the scope case has a soft-cap
and a bias large enough for the factor's place to matter, and the
``s_bias`` cases have ``s_bias_h`` comparable to ``s_h log n_i``, negative in
one of them.

``s`` and ``s_bias`` are arrays of the case (``input.s``, ``input.s_bias``,
shape (Hq,)) and get gradients, except in the baseline case, where ``s`` is
a JSON number (a constant shared by every head) and ``s_bias`` is left at 0.

Arrays are drawn with the shared helpers of refattn/conformance/case.py
(seeded by the CRC-32 of the case id).
"""

from __future__ import annotations

from ...conformance.case import ArrayMaker, Case, Dims, draw, key_padding, make_case, normal, random_mask


#: The flags only these cases use (the shared ones are in refattn/conformance/flags.py).
FLAGS: dict[str, str] = {
    "SSMAX_MASKED_N": (
        "n in s log n + b is n_i, the number of keys query row i attends to after the user mask, causality and "
        "the window (i + 1 on a causal row; the unpadded length under key padding; a dropout keep-mask does not "
        "change it). Cases have rows whose n_i differs from Nk. Fails implementations that use the padded or full "
        "key length Nk, the query length, or a causal count aligned top-left when it is bottom-right, for every row."
    ),
    "SSMAX_PER_HEAD_S": (
        "s and s_bias have one value per query head: query head h uses s[h] and s_bias[h], also under GQA. Cases draw a "
        "distinct s_h for every head. Fails implementations that index s by kv head (h // G), use s[0] for every "
        "head, or tile s over the kv heads."
    ),
    "SSMAX_SINGLE_KEY": (
        "A row that attends to exactly one key has n = 1 and log 1 = 0, so its factor is s_bias_h: its output is that "
        "key's value and its lse is cap(s_bias_h * scale * q . k) + bias. Fails implementations that clamp n to at "
        "least 2 (max(n, 2)), use log(n + 1), or count the query twice."
    ),
    "SSMAX_FACTOR_SCOPE": (
        "The factor s log n + b multiplies the scaled scores scale * q . k (equivalently q), before the soft-cap "
        "and before the bias; the bias is not multiplied. Cases have a soft-cap and a bias. Fails implementations "
        "that multiply the final logits (after the cap, bias included), or apply the factor after the cap."
    ),
    "SSMAX_BIAS": (
        "The bias s_bias is inside the factor, s log n + s_bias, multiplying the scores; the factor may be negative "
        "where s_bias < -s log n (such rows favour low scores). Fails implementations that ignore s_bias, add it to "
        "the logits (which changes only the lse), multiply s log n by it, or clamp the factor at 0."
    ),
    "SSMAX_SCALE_GRADIENT": (
        "ds_h = sum over the batch and the rows of head h of log n_i <q_i, dq'_i> and ds_bias_h = the same sum without "
        "log n_i, with q the query before the factor and dq' the gradient of the scaled query q' = f q. Fails "
        "backwards that treat s and s_bias as constants, drop log n_i, use q' (or dq = f dq') in place of q (or dq'), "
        "or sum over one batch element or by kv head."
    ),
    "SSMAX_AXIS_LENGTH": (
        "n_rule='axis_length' takes n = Nk, the full last axis with masked keys counted, on every row, as the "
        "ScalableSoftmax package (x.size(dim)) does; the canonical n_i counts the attended keys. Cases are causal. "
        "Fails the per-row count under this rule."
    ),
}


def _uniform(low: float, high: float) -> ArrayMaker:
    """One value per query head, uniform in [low, high): (Hq,)."""
    return lambda rng, dims: rng.uniform(low, high, dims.hq)


#: Slopes and biases of most cases: a distinct s_h for every head, s_bias_h comparable to s_h log n.
DEFAULT_S = _uniform(0.2, 1.2)
DEFAULT_S_BIAS = _uniform(-0.5, 0.5)
#: The ScalableSoftmax package's default s, 0.43, as it holds it: a float32 tensor (gdevos010/Scalable-Softmax
#: 108e969, src/scalable_softmax.py, ScalableSoftmax.__init__), cast to the input's dtype in forward.
SCALABLE_SOFTMAX_S = 0.4300000071525574


def _case(name: str, description: str, flags: tuple[str, ...], dims: Dims, *, std: float = 1.0,
          s: ArrayMaker | float = DEFAULT_S, s_bias: ArrayMaker | None = DEFAULT_S_BIAS,
          bias: ArrayMaker | None = None, mask: ArrayMaker | None = None, dropout_keep: ArrayMaker | None = None,
          **params) -> Case:  # fmt: skip
    """One SSMax case; ``params`` are the JSON keyword arguments (causal, window, softcap, ...).
    A number ``s`` is one of them (a constant); an array maker ``s`` or ``s_bias`` draws an input."""
    if isinstance(s, float):
        params, s = dict(params, s=s), None
    extra = {"s": s, "s_bias": s_bias, "bias": bias, "mask": mask, "dropout_keep": dropout_keep}
    extra = {key: make for key, make in extra.items() if make is not None}
    differentiable = ("q", "k", "v") + tuple(name for name in ("s", "s_bias", "bias") if name in extra)
    return make_case("ssmax", name, description, flags, draw(dims, extra, std=std), params=params,
                     differentiable=differentiable)  # fmt: skip


def cases() -> list[Case]:
    """The SSMax conformance cases, in reading order."""
    return [
        _case("baseline_shared_s", "No mask, s = 0.6 for every head as a number, s_bias = 0, D = 59, Dv = 4: n = Nk = 6.",
              ("BASELINE", "AWKWARD_HEAD_DIM", "VALUE_DIM_DIFFERS"), Dims(1, 2, 1, 5, 6, 59, 4), s=0.6, s_bias=None),
        # --- which n -------------------------------------------------------------
        _case("causal_self", "Causal, N = 12, GQA 4:2, s and s_bias per query head: n_i = i + 1, row 0 has one key.",
              ("SSMAX_MASKED_N", "SSMAX_PER_HEAD_S", "SSMAX_SINGLE_KEY", "CAUSAL_MASK"), Dims(1, 4, 2, 12, 12, 8),
              causal=True),
        _case("key_padding", "Keys padded to 11, batch 1 has 6 real keys, not causal, Nq = 9: n = 11 and 6.",
              ("SSMAX_MASKED_N", "PADDING_MASK", "MULTI_BATCH"), Dims(2, 4, 2, 9, 11, 8), mask=key_padding((11, 6))),
        _case("padding_causal_mqa", "Causal N = 10 with keys padded after 7 in batch 1, MQA 2:1: n_i = min(i + 1, 7).",
              ("SSMAX_MASKED_N", "PADDING_MASK", "MULTI_QUERY"), Dims(2, 2, 1, 10, 10, 8),
              mask=key_padding((10, 7)), causal=True),
        _case("decode_bottom_right", "3 queries over 20 cached keys, causal bottom-right, MQA 4:1: n = 18, 19, 20.",
              ("SSMAX_MASKED_N", "CAUSAL_ALIGNMENT", "UNEQUAL_LENGTHS", "MULTI_QUERY"), Dims(1, 4, 1, 3, 20, 8),
              causal=True),
        _case("causal_top_left", "6 queries over 9 keys, causal top-left: n_i = i + 1, not i + 4, row 0 has one key.",
              ("SSMAX_MASKED_N", "CAUSAL_ALIGNMENT", "SSMAX_SINGLE_KEY"), Dims(1, 4, 2, 6, 9, 8),
              causal=True, causal_alignment="top_left"),
        _case("window_gqa", "Causal window (3, 0), N = 13, GQA 8:2, s per head: n_i = min(i + 1, 4).",
              ("SSMAX_MASKED_N", "SSMAX_PER_HEAD_S", "SLIDING_WINDOW", "GQA_HEAD_MAP", "GQA_GRAD_REDUCTION"),
              Dims(1, 8, 2, 13, 13, 8), causal=True, window=[3, 0]),
        _case("window_two_sided_cross", "Window (2, 1) bottom-right, 8 queries over 12 keys, not causal: n = 4 but 3 last.",
              ("SSMAX_MASKED_N", "SLIDING_WINDOW", "UNEQUAL_LENGTHS"), Dims(1, 4, 2, 8, 12, 8), window=[2, 1]),
        _case("per_head_mask_causal", "Random (Hq, Nq, Nk) mask AND causal, N = 10: n differs per head and row.",
              ("SSMAX_MASKED_N", "MASK_BROADCAST", "MASK_COMBINATION"), Dims(1, 4, 2, 10, 10, 8),
              mask=random_mask(lambda d: (d.hq, d.nq, d.nk), 0.7), causal=True),
        _case("dropout_keeps_n", "Causal N = 8 with a dropout keep-mask (p = 0.25): n counts keys before dropout.",
              ("SSMAX_MASKED_N", "DROPOUT_SCALING"), Dims(1, 4, 2, 8, 8, 8), causal=True, dropout_p=0.25,
              dropout_keep=lambda rng, dims: rng.random((dims.b, dims.hq, dims.nq, dims.nk)) >= 0.25),
        _case("decode_single_query_padding", "One query over 33 keys, batch 1 padded to 20, MQA 4:1: n = 33 and 20.",
              ("SSMAX_MASKED_N", "SINGLE_TOKEN", "PADDING_MASK", "MULTI_QUERY"), Dims(2, 4, 1, 1, 33, 8),
              mask=key_padding((33, 20))),
        _case("axis_length_causal", "n_rule='axis_length': causal N = 10, n = 10 on every row (ScalableSoftmax's "
              "x.size(dim)), not i + 1; s = float32(0.43) for every head and no s_bias, the package's defaults as it "
              "stores them, so that running the package reproduces the case.",
              ("SSMAX_AXIS_LENGTH", "CAUSAL_MASK"), Dims(1, 4, 2, 10, 10, 8), causal=True, n_rule="axis_length",
              s=SCALABLE_SOFTMAX_S, s_bias=None),
        # --- rows with no key or one key -----------------------------------------------
        _case("fully_masked_rows", "7 queries over 4 keys, causal bottom-right: rows 0-2 see no key, row 3 one key.",
              ("FULLY_MASKED_ROW", "SSMAX_MASKED_N", "SSMAX_SINGLE_KEY", "CAUSAL_ALIGNMENT"), Dims(1, 4, 2, 7, 4, 8),
              causal=True),
        _case("single_key_rows", "Window (0, 0), N = 9: one key per row, so the factor is s_bias and the lse s_bias · score.",
              ("SSMAX_SINGLE_KEY", "SSMAX_BIAS"), Dims(1, 4, 2, 9, 9, 8), std=1.5, s_bias=_uniform(0.5, 1.5),
              window=[0, 0]),
        # --- the factor ------------------------------------------------------------------
        _case("scope_softcap_bias", "Soft-cap 2 and a (1, Hq, 1, Nk) bias: the factor scales q·k before both.",
              ("SSMAX_FACTOR_SCOPE", "SOFTCAP_BEFORE_BIAS", "BIAS_BROADCAST"), Dims(1, 4, 2, 10, 10, 8), std=1.5,
              bias=normal(lambda d: (1, d.hq, 1, d.nk), 1.5), softcap=2.0),
        _case("bias_dominant", "Causal N = 9, s in [0.1, 0.3), s_bias in [0.8, 1.6): s_bias carries most of the factor.",
              ("SSMAX_BIAS", "SSMAX_SCALE_GRADIENT"), Dims(1, 4, 2, 9, 9, 8), s=_uniform(0.1, 0.3),
              s_bias=_uniform(0.8, 1.6), causal=True),
        _case("negative_factor", "Causal N = 12, s_bias in [-1.5, -1): s log n + s_bias < 0 on early rows (attends to low scores).",
              ("SSMAX_BIAS", "SSMAX_SCALE_GRADIENT"), Dims(1, 4, 2, 12, 12, 8), s=_uniform(0.2, 0.4),
              s_bias=_uniform(-1.5, -1.0), causal=True),
        _case("gradient_batch_padding_bias", "B = 2, keys padded to 8 and 5, causal, full bias: ds, ds_bias sum over the batch and i.",
              ("SSMAX_SCALE_GRADIENT", "SSMAX_MASKED_N", "MULTI_BATCH", "BIAS"), Dims(2, 4, 2, 8, 8, 8),
              mask=key_padding((8, 5)), bias=normal(Dims.scores.fget),
              causal=True),
    ]  # fmt: skip
