"""The flag catalogue: the bug classes conformance cases are built to catch.

As in Project Wycheproof, a flag names a *mistake an implementation can make*,
not a feature. Each case lists the flags it targets, and is built so that an
implementation making that mistake fails it (for example, every
``CAUSAL_ALIGNMENT`` case has ``Nq != Nk``, where the two alignments differ).
The manifest carries the description of every flag its cases use, so a
consumer reading a failure learns what to look for without reading our code.

Add a flag here together with the first case that uses it; a test checks that
every flag used is described and every flag described is used.
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
    # ALiBi (refattn/position/alibi).
    "ALIBI_SLOPES": (
        "The default ALiBi slopes are the authors' get_slopes(Hq): for Hq a power of two, m_h = 2^(-8(h+1)/Hq) "
        "(1/2 ... 1/256 for 8 heads, 1/4 ... 1/256 for 4, 2^(-(h+1)/2) for 16). Cases use 4 or 16 heads, where "
        "2^-(h+1), 2^(-8h/Hq) or a float32 pow of a rounded base give other slopes."
    ),
    "ALIBI_NON_POW2_HEADS": (
        "For Hq not a power of two, the slopes of the largest power of two c below Hq come first, then every "
        "other slope of 2c heads (the 1st, 3rd, ...), Hq - c of them: 6 heads give 1/4, 1/16, 1/64, 1/256, 1/2, "
        "1/8. Fails implementations that use the geometric 2^(-8(h+1)/Hq) for every head count, or round up."
    ),
    "ALIBI_SLOPE_ORDER": (
        "Query head h uses slope m_h, in the order get_slopes returns them, also with grouped-query heads (the "
        "slope follows the query head, not the kv head h // G). Fails reversed slopes and slopes indexed by kv head."
    ),
    "ALIBI_SIGN": (
        "The ALiBi term is a penalty: m_h (p_j - p_i) for keys before the query, i.e. -m_h (p_i - p_j), or "
        "-m_h |p_i - p_j| in the symmetric form. Fails an implementation that adds +m_h |p_i - p_j|."
    ),
    "ALIBI_SYMMETRIC_FORM": (
        "form = 'causal' is m_h (p_j - p_i) for every key, so without a causal mask keys after the query get a "
        "positive term; form = 'symmetric' is -m_h |p_j - p_i| (FlashAttention's non-causal ALiBi). Cases have "
        "keys on both sides of each query: using one form for the other fails."
    ),
    "ALIBI_POSITION_OFFSET": (
        "The distance is between the given positions p_i = q_positions[i] and p_j = k_positions[j], not array "
        "indices: decoding with a cache has q_positions = Nk - Nq + arange(Nq), packed sequences have gaps. Fails "
        "implementations that use i and j, or align queries top-left, in the bias."
    ),
    "ALIBI_SHORTCUT_LSE": (
        "Adding m_h p_j alone (BLOOM, MPT, the authors' fairseq code, FlashAttention's causal path) differs from "
        "the causal form by m_h p_i, a constant per query row: outputs and gradients are the same, the "
        "log-sum-exp is larger by m_h p_i. Cases have queries far from position 0; the lse must be the causal form's."
    ),
    "ALIBI_EXPLICIT_SLOPES": (
        "Slopes given as an argument replace the default ones, one per query head, in the given order. Fails "
        "implementations that ignore them or recompute get_slopes(Hq)."
    ),
    # T5 bucketed bias (refattn/position/t5).
    "T5_BUCKET_DIRECTION": (
        "The relative position is key minus query, r = p_j - p_i (HF: memory_position - context_position), and "
        "with bidirectional buckets r > 0 (a key after the query) takes the upper half. Fails implementations "
        "that use p_i - p_j, which swaps the two halves."
    ),
    "T5_LOG_BUCKETS": (
        "Distances n >= max_exact share logarithmic buckets max_exact + trunc(log(n / max_exact) / "
        "log(max_distance / max_exact) * (side_buckets - max_exact)). Fails log2 or log1p, rounding instead of "
        "truncating, and a max_exact that is not half of one side's buckets."
    ),
    "T5_UNIDIRECTIONAL": (
        "With bidirectional = False (T5's decoder) all num_buckets buckets measure n = max(p_i - p_j, 0): past "
        "keys use both halves' worth of buckets and every key after the query falls in bucket 0. Fails "
        "implementations that bucket a decoder like an encoder, or take |r| for future keys."
    ),
    "T5_MAX_DISTANCE_SATURATION": (
        "Every distance from max_distance on shares the last bucket of its side (the min with side_buckets - 1). "
        "Cases have positions farther apart than max_distance: without the clamp the bucket leaves its half of "
        "the table or the table."
    ),
    "T5_BUCKET_BOUNDARY": (
        "HF computes the logarithmic branch in float32 and truncates; where the exact value is an integer the "
        "float32 rounding decides. With 20 buckets and max_distance 160, distances 10, 20 and 80 fall in bucket "
        "max_exact + 1, + 2, + 4 in float32 but one lower in float64. Fails implementations that compute it in "
        "float64."
    ),
    "T5_POSITION_OFFSET": (
        "The relative position is between the given positions (q_positions, k_positions), not array indices: a "
        "decoder step with a cache has q_positions = Nk - Nq + arange(Nq). Fails implementations that bucket "
        "j - i."
    ),
    "T5_TABLE_LAYOUT": (
        "The table is (num_buckets, Hq), HF's nn.Embedding(num_buckets, n_heads).weight; Mesh TensorFlow and "
        "flaxformer store (heads, buckets). The case has num_buckets = Hq, where reading the transpose raises no "
        "shape error but gives other biases."
    ),
    "T5_TABLE_GRADIENT": (
        "The table's gradient is the bias gradient summed over the batch and over every (query, key) pair in "
        "each bucket (a scatter-add, the adjoint of the gather). Fails backwards that keep one pair per bucket "
        "(a scatter that overwrites), drop the batch sum or mix heads."
    ),
    # Rotary embedding (refattn/position/rope).
    "ROPE_LAYOUT": (
        "Which dims form a rotated pair: layout='half' pairs dim t with t + r/2 (HF rotate_half, GPT-NeoX, HF "
        "Llama), layout='interleaved' pairs 2t with 2t + 1 (RoFormer, GPT-J rotate_every_two, Meta's Llama "
        "view_as_complex). Fails an implementation that uses the other layout: the two agree only after "
        "permuting the dims of q and k."
    ),
    "ROPE_PARTIAL": (
        "rotary_dim r < D (GPT-NeoX rotary_pct, GPT-J rotary_dim): only the first r dims are rotated and the rest "
        "pass through unchanged; in the half layout dim t pairs with t + r/2, not t + D/2. Fails an "
        "implementation that rotates all D dims, splits the halves of D, or rotates the last r dims."
    ),
    "ROPE_FREQUENCY_EXPONENT": (
        "Frequencies are base^(-2t/r), t = 0 .. r/2 - 1, with r the rotated dims. Fails an implementation that "
        "uses base^(-t/r), or divides by the head dim D instead of rotary_dim when r < D."
    ),
    "ROPE_BASE": (
        "The frequency base is a parameter (rope_theta): 500000 for Llama 3, 10000 by default. Fails an "
        "implementation that hard-codes 10000."
    ),
    "ROPE_POSITION_OFFSET": (
        "Queries at positions that do not start at 0 (decoding or chunked prefill with a KV cache: q_positions = "
        "Nk - Nq + arange(Nq)). Fails an implementation that rotates the new queries from position 0, or rotates "
        "them with the keys' first positions."
    ),
    "ROPE_POSITION_SCALING": (
        "Linear position scaling (position interpolation; HF rope_scaling {'type': 'linear', 'factor': s}): "
        "angles are (position / s) * base^(-2t/r). Fails an implementation that multiplies by s, scales the "
        "base instead (NTK), or ignores it."
    ),
    "ROPE_EXPLICIT_POSITIONS": (
        "Positions are given, not implied by the index: packed sequences restart at 0, and query and key "
        "positions differ. Fails an implementation that rotates by the index arange(N) instead of the given "
        "positions."
    ),
    "ROPE_LARGE_POSITIONS": (
        "Positions near 8000: the angles position * base^(-2t/r) must be formed in float32 or wider (HF forces "
        "float32, transformers PR 29285). Fails an implementation that forms the angles, or reads its cos/sin "
        "cache, in float16 or bfloat16, where a position in the thousands is off by several radians."
    ),
    "ROPE_TRANSPOSED_GRADIENT": (
        "The gradients of q and k are those of the rotated q and k rotated back by the transposed rotation "
        "R(theta)^T = R(-theta). Fails a backward that rotates them forward again, or not at all, or rotates "
        "the passed-through dims of a partial rotary."
    ),
    # xPos (refattn/position/xpos).
    "XPOS_SCALE_DIRECTION": (
        "Queries are scaled by zeta^(+n/scale_base) and keys by zeta^(-m/scale_base) (torchscale: downscale=True "
        "for keys), so pair t of a score decays as zeta_t^((n - m)/scale_base) for keys in the past. Fails an "
        "implementation that swaps the two, or scales both the same way."
    ),
    "XPOS_SCALE_BASE": (
        "The exponent is position / scale_base with scale_base a parameter (512 in torchscale and lucidrains). "
        "Fails an implementation that hard-codes 512 or multiplies by it."
    ),
    "XPOS_DECAY_RATES": (
        "zeta_t = (2t/r + gamma) / (1 + gamma), t = 0 .. r/2 - 1, with r the rotated dims and gamma = 0.4. Fails "
        "an implementation that uses t/r, the head dim D instead of r under partial rotary, or drops gamma from "
        "numerator or denominator."
    ),
    "XPOS_SCALE_LAYOUT": (
        "Both dims of a rotated pair get the same factor zeta_t^(+-n/scale_base), laid out as the pairs are: "
        "repeated per element (2t, 2t + 1) in the interleaved layout, concatenated (t, t + r/2) in the half "
        "layout. Fails an implementation that lays the factors out in the other layout than the rotation "
        "(rotary-embedding-torch before its fix concatenated them while rotating interleaved pairs)."
    ),
    "XPOS_CENTRED_POSITIONS": (
        "Negative positions, as torchscale's centring produces (positions minus half the length). Fails an "
        "implementation that reads its tables at position modulo the table length, clamps positions at 0, or "
        "takes positions as unsigned."
    ),
    # Shaw et al. relative representations (refattn/position/shaw).
    "SHAW_CLIP": (
        "Relative distances beyond K = max_relative_position are clipped to -K or K: every key K or more "
        "positions before the query reads table row 0, every key K or more after reads row 2K. Cases have "
        "lengths well above K (and one has K = 0). Fails implementations that wrap the distance modulo 2K + 1, "
        "give far keys a zero embedding, or index out of the table."
    ),
    "SHAW_DIRECTION": (
        "Row r of the tables is the distance k_position - q_position = r - K (key minus query, as in "
        "tensor2tensor), so row K + 1 is the key just after the query. Cases use independently drawn table "
        "rows and non-causal attention, so both sides are read. Fails implementations that use q - k "
        "(Hugging Face BERT's relative_key distance) without mirroring the tables."
    ),
    "SHAW_VALUE_TERM": (
        "out_i = sum_j P'_ij (v_j + rel_v[r_ij]): the relative value rows are added to the values and weighted "
        "by the same attention weights, after dropout. Cases use a value table as large as the values. Fails "
        "implementations that leave the value term out (relative_key in Hugging Face BERT has none), add it "
        "unweighted, or apply dropout to one term only."
    ),
    "SHAW_SCALE": (
        "The relative key term is inside the scaled logits: scale * (q_i . k_j + q_i . rel_k[r_ij]), so it is "
        "also inside the soft-cap, and the bias comes after both. Cases use a scale far from 1/sqrt(D) or a "
        "soft-cap. Fails implementations that add q_i . rel_k[r_ij] after scaling or after capping."
    ),
    "SHAW_TABLE_GRADIENT": (
        "The gradient of a table row sums over every batch element, head and (query, key) pair that reads it "
        "(the adjoint of a gather is a scatter-add); the clipped edge rows collect every far pair. Fails "
        "backwards that overwrite instead of add, keep one head or one batch element, or drop clipped pairs."
    ),
    "SHAW_POSITIONS": (
        "Relative distances come from the given q_positions and k_positions, not from array indices: with a "
        "KV cache the queries sit at offset + arange(Nq); positions may have gaps or be negative. Fails "
        "implementations that use arange(Nq) for the queries, or align them with the first keys."
    ),
    # Transformer-XL relative scores (refattn/position/transformer_xl).
    "XL_REL_SHIFT": (
        "Query i and key j read row R - 1 - (q_positions[i] - k_positions[j]) of r: rows run in descending "
        "order of distance (the original's pos_seq = arange(klen - 1, -1, -1)), whatever R is. Fails a relative "
        "shift that is off by one (the row of distance d +- 1), r read in ascending order (row t for distance t), "
        "and rows counted from Nk instead of R."
    ),
    "XL_BIAS_TERMS": (
        "u (the original's r_w_bias) is added to q in the content term, (q + u) . k, and v_bias (r_r_bias) in "
        "the position term, (q + v_bias) . r. Cases use distinct, large u and v_bias. Fails implementations that "
        "swap them, drop one or add one to both terms, and backwards that do not sum du and dv_bias over the "
        "batch and the queries."
    ),
    "XL_MEMORY": (
        "Keys include mem_len cached positions before the queries (Nk = mem_len + Nq, q_positions = mem_len + "
        "arange(Nq), k_positions = arange(Nk)): query i is at distance mem_len + i - j from key j and sees keys "
        "j <= i + mem_len. Fails distances measured from query indices without the memory offset, and a causal "
        "mask aligned top-left."
    ),
    "XL_EXPLICIT_POSITIONS": (
        "Distances come from the given q_positions and k_positions: the case's positions carry a constant "
        "offset or gaps. Fails implementations that index r by absolute position, or derive distances from "
        "indices (as the original's rel-shift does, which is right only for q_positions = mem_len + arange(Nq) "
        "and k_positions = arange(Nk))."
    ),
    "XL_SOFTCAP_SCOPE": (
        "The soft-cap applies to the whole scaled score scale * ((q + u) . k + (q + v_bias) . r). Fails "
        "implementations that cap the content term alone and add the position term afterwards, as a bias "
        "passed to a dense kernel would be."
    ),
    "XL_TABLE_GRADIENTS": (
        "Row t of dr sums, over the batch, every pair (i, j) that read row t (pairs at equal distance share a "
        "row); rows that no unmasked pair reads get 0; r, u and v_bias have one row per query head, also under "
        "GQA. Fails backwards that overwrite instead of adding, keep one batch element, or index the tables "
        "by kv head."
    ),
    # Dilution: differential attention (refattn/dilution/differential).
    "DIFF_LAMBDA_REPARAM": (
        "lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init: one scalar per layer, shared "
        "by every head. Cases draw the lambda vectors with standard deviation 0.4 or more, so exp(lambda_q . "
        "lambda_k) is far from 1 + lambda_q . lambda_k. Fails implementations that drop the exponentials, cross the "
        "pairs (lambda_q1 . lambda_k2), leave lambda_init out, or keep one lambda per head."
    ),
    "DIFF_LAMBDA_INIT": (
        "lambda_init = 0.8 - 0.6 exp(-0.3 depth) with depth the 0-based layer index (the authors' "
        "lambda_init_fn(depth); the paper writes l - 1 for a 1-based l), and the same lambda_init in the factor "
        "1 - lambda_init after the norm. Fails the paper's l - 1 applied to a 0-based index (exp(-0.3 (depth - 1))) "
        "and a depth counted from 1."
    ),
    "DIFF_HEAD_PAIRING": (
        "Query heads 2h and 2h + 1 (adjacent) are the two maps of output head h, as the authors' "
        "attn_weights.view(B, H, 2, N, N) and q.reshape(B, N, H, 2, D) make them; lse (B, 2H, Nq) and a per-query-head "
        "bias or mask follow the same order. Fails implementations that pair heads h and h + H (torch.chunk over the "
        "heads, as Hugging Face's DiffLlama does)."
    ),
    "DIFF_GQA_KEYS": (
        "With G = H / Hkv >= 2, map c of output head h reads key head 2 (h // G) + c under gqa_keys='paired' (the "
        "authors' flash variants: kv head j holds the keys 2j and 2j + 1) and key head (2h + c) // G under "
        "'repeat_kv' (multihead_diffattn.py's repeat_kv over all 2 Hkv key heads); both maps read value head h // G. "
        "Fails an implementation that uses the other rule than the case's gqa_keys (they differ whenever G >= 2), "
        "and a dk not summed into the key head each map read."
    ),
    "DIFF_SUBLN_SCALE": (
        "After the per-head RMSNorm the output is multiplied by the fixed factor 1 - lambda_init. Fails "
        "implementations that leave it out, use the learned 1 - lambda, or apply it before the norm, which cancels it."
    ),
    "DIFF_SUBLN_GROUP": (
        "The RMSNorm (the authors' subln) normalises each output head's 2D features together: one statistic per "
        "(batch, head, query). Fails implementations that normalise each D-half separately (as a flash kernel that "
        "splits v in two halves might), all heads together, or subtract the mean (LayerNorm)."
    ),
    "DIFF_NORM_EPS": (
        "The RMSNorm's eps (norm_eps, 1e-5 in the authors' subln) is added to the mean square inside the square "
        "root. The case's values are small enough that eps is comparable to the mean square. Fails eps left out or "
        "added outside the root, and another default such as 1e-6 (that of the authors' rms_norm.py, which subln "
        "overrides)."
    ),
    # Dilution: SSMax and log-n scaling (refattn/dilution/ssmax, refattn/dilution/logn).
    "SSMAX_MASKED_N": (
        "n in s log n + b is n_i, the number of keys query row i attends to after the user mask, causality and "
        "the window (i + 1 on a causal row; the unpadded length under key padding; a dropout keep-mask does not "
        "change it). Cases have rows whose n_i differs from Nk. Fails implementations that use the padded or full "
        "key length Nk, the query length, or a causal count aligned top-left when it is bottom-right, for every row."
    ),
    "SSMAX_PER_HEAD_S": (
        "s and b have one value per query head: query head h uses s[h] and b[h], also under GQA. Cases draw a "
        "distinct s_h for every head. Fails implementations that index s by kv head (h // G), use s[0] for every "
        "head, or tile s over the kv heads."
    ),
    "SSMAX_SINGLE_KEY": (
        "A row that attends to exactly one key has n = 1 and log 1 = 0, so its factor is b_h: its output is that "
        "key's value and its lse is cap(b_h * scale * q . k) + bias. Fails implementations that clamp n to at "
        "least 2 (max(n, 2)), use log(n + 1), or count the query twice."
    ),
    "SSMAX_FACTOR_SCOPE": (
        "The factor s log n + b multiplies the scaled scores scale * q . k (equivalently q), before the soft-cap "
        "and before the bias; the bias is not multiplied. Cases have a soft-cap and a bias. Fails implementations "
        "that multiply the final logits (after the cap, bias included), or apply the factor after the cap."
    ),
    "SSMAX_BIAS": (
        "The bias b is inside the factor, s log n + b, multiplying the scores; the factor may be negative where b "
        "< -s log n (such rows favour low scores). Fails implementations that ignore b, add b to the logits "
        "(which changes only the lse), multiply s log n by b, or clamp the factor at 0."
    ),
    "SSMAX_SCALE_GRADIENT": (
        "ds_h = sum over the batch and the rows of head h of log n_i <q_i, dq'_i> and db_h = the same sum without "
        "log n_i, with q the query before the factor and dq' the gradient of the scaled query q' = f q. Fails "
        "backwards that treat s and b as constants, drop log n_i, use q' (or dq = f dq') in place of q (or dq'), "
        "or sum over one batch element or by kv head."
    ),
    "LOGN_SCALE": (
        "The scaled scores are multiplied by the natural log of n, before the soft-cap and the bias (the bias is "
        "not multiplied); n = 1 gives log 1 = 0 and uniform scores. Fails implementations that use log2 n or "
        "log10 n, divide by log n, or multiply the final logits (after the cap, bias included)."
    ),
    "LOGN_LENGTH": (
        "By default n is Nk, the number of keys, the same for every row and unchanged by masks. Cases have Nq != "
        "Nk, causal or padding masks. Fails implementations that use the query length Nq, the per-row attended "
        "count (SSMax's n), the unpadded length, or the query position."
    ),
    "LOGN_EXPLICIT_N": (
        "An explicit n (a training length) replaces Nk in log n, on every row. Fails implementations that ignore "
        "it, use log(Nk) / log(n) (Qwen's log_n(i) with the training length as base) or clamp the factor at 1."
    ),
    # LSH attention (refattn/lsh).
    "LSH_FACTORISED_BUCKETS": (
        "With n_buckets a list of even factors, factor k reads the next f_k / 2 rotation columns, its bucket is "
        "argmax([xR_k, -xR_k]), and the factors combine with the first least significant: b_0 + f_0 b_1 + f_0 f_1 "
        "b_2 ... (HF, trax). Cases use unequal factors: fails the first factor made most significant, columns "
        "interleaved between factors, or one argmax over all columns."
    ),
    "WRAPPED_LOOKBACK": (
        "Each chunk of the sorted items also attends to n_chunks_before previous and n_chunks_after next chunks "
        "modulo the number of chunks: chunk 0's previous chunk is the last one, the last chunk's next is chunk 0, "
        "and with fewer chunks than the window a chunk occurs in it more than once (HF and trax concatenate rolled "
        "copies). Fails windows that stop at the ends, or that drop repeated chunks."
    ),
    "SELF_ONLY_ROW": (
        "A token's own key (its copy from any round) gets the finite self_mask_value (-1e5; trax subtracts 1e5 "
        "from the score) instead of being excluded, so a query with no other visible key (token 0 under causal "
        "masking, a padded token among padded ones) attends to itself with weight 1 and its lse is near -1e5. "
        "Fails implementations that mask self pairs with -inf (output 0 or NaN) or not at all."
    ),
    "PADDING_BUCKET": (
        "Padded tokens get an extra bucket, prod(n_buckets), and each round then has prod(n_buckets) + 1 bucket "
        "ids (offsets r (n + 1)): trax whenever a mask is given, HF when some token of the batch is padded (one "
        "padded sequence moves every sequence's offsets). Fails implementations without the extra bucket, with "
        "offsets r n, or that decide per sequence."
    ),
    "MULTI_ROUND_COMBINE": (
        "Hashing rounds are combined by their log-sum-exps: out = sum_r exp(lse_r - LSE) o_r, LSE = log sum_r "
        "exp(lse_r), which is also the returned lse. Fails averaging the rounds, keeping one of them, or "
        "returning one round's lse."
    ),
    "DUP_COUNT": (
        "With dup_correction, each occurrence of key j in query i's windows has its logit lowered by log n_ij, "
        "n_ij counted over the windows of all of i's rounds, so that every visible key counts once (trax v1, "
        "reformer-pytorch allow_duplicate_attention=False); without it a key seen n times weighs n exp(z). Fails "
        "applying or skipping the correction against the parameter."
    ),
    "DUP_COUNT_CROSS_ROUND": (
        "n_ij also counts occurrences through windows that reach another round: the look-back of a round's first "
        "chunk is the previous round's last chunk (round 0's wraps to the last round's), and a straddling chunk "
        "holds two rounds. trax v1 and reformer-pytorch compare same-round chunk locations only (locs1, "
        "locs2 = locs1 + 1), so a key seen only that way gets count 0 and its logit raised by -log(1e-9) = 20.7. "
        "Fails that count."
    ),
    "CHUNK_STRADDLES_ROUNDS": (
        "Chunks are cut from the concatenation of all rounds' sorted items: with N not a multiple of chunk_len a "
        "chunk holds the end of one round and the start of the next, and a round's first chunk looks back into "
        "the previous round. Fails chunking each round on its own (padding or wrapping within a round)."
    ),
    "SHORT_SEQUENCE_FALLBACK": (
        "HF and reformer-pytorch replace LSH by one dense round when N <= chunk_len: every key once, with the "
        "same key normalisation, masks and self value, whatever n_hashes. Cases have N < chunk_len < n_hashes N, "
        "where hashing anyway gives uneven windows and another lse. Fails implementations that hash anyway, or "
        "fall back where the preset does not."
    ),
    "LSH_STABLE_SORT": (
        "Items are sorted by bucket and, within a bucket, by position (HF's _stable_argsort, trax's key "
        "N bucket + position); chunk boundaries cut buckets, so the order within a bucket decides which tokens "
        "see each other. Fails unstable sorts and reversed order within a bucket."
    ),
    "LSH_KEY_NORMALISATION": (
        "Keys are the shared vectors length-normalised, queries are not: HF and trax use x / sqrt(mean(x^2) + "
        "1e-6) / sqrt(D) = x / sqrt(|x|^2 + 1e-6 D) and unscaled logits q.k; reformer-pytorch uses x / max(|x|, "
        "1e-12) and scales the logits by 1/sqrt(D). Fails normalising queries too, the other normalisation or "
        "epsilon, and a missing or extra 1/sqrt(D)."
    ),
    "LSH_CAUSAL_POSITIONS": (
        "Causal masking compares the tokens' original positions (key position <= query position), not their "
        "slots in the sorted order or in the chunk. Fails a triangular mask applied to the sorted window."
    ),
    "LSH_MASK_MODE": (
        "How masked and self pairs enter the logits: HF and reformer-pytorch replace a masked logit by mask_value, "
        "then a self pair's by self_mask_value; trax adds both (score - 1e9 - 1e5), so a padded token whose "
        "windows hold only padded tokens attends to the others, not to itself, and token 0's lse under causal "
        "masking is its score - 1e5. Fails using one rule for the other."
    ),
    "LSH_PADDED_QUERIES": (
        "reformer-pytorch masks a padded query's whole row (the query and key padding masks multiplied), so a "
        "padded token attends only to itself (the self value is written after the mask); HF and trax mask padded "
        "keys only. Fails masking keys only under that preset, or rows under the others."
    ),
    # Routing attention (refattn/routing).
    "ROUTING_BALANCED_TOPK": (
        "Each centroid selects the `window` tokens most similar to it (balanced clusters of exactly `window` "
        "members; a token may be in several clusters or in none), ties to the lower position. Fails an "
        "implementation that clusters each token with its nearest centroid (unbalanced k-means clusters, cut or "
        "padded to the window), or ranks tokens by distance instead of similarity."
    ),
    "ROUTING_SCATTER_MEAN_EPS": (
        "A token's output is the sum of what the clusters that picked it computed for it, divided by count + "
        "scatter_eps: 0 in the canonical semantics (the exact mean), 1e-2 for google-research "
        "(scatter_cluster_items), 1e-5 for lucidrains (scatter_mean). Cases have tokens in several clusters. "
        "Fails a sum without the division, the count alone under a preset, or another preset's eps."
    ),
    "ROUTING_UNROUTED_TOKEN": (
        "With K * window < N some tokens are in no query list: their output is exactly 0 (a sum over nothing), "
        "they are listed in aux.unrouted, and their gradients are 0. Fails 0 / 0 = NaN when scatter_eps = 0, and "
        "falling back to the token's own value or to dense attention."
    ),
    "ROUTING_CAUSAL_BY_POSITION": (
        "Causal routing attention compares the tokens' positions: query slot s sees key slot t iff "
        "key_membership[t] <= membership[s] (lucidrains: indices >= kv_indices); memory slots are always "
        "visible. Cases route q and k separately, so the lists differ and some rows are empty (out 0, lse -inf). "
        "Fails masking by slot (t <= s), which shows a query later tokens and hides earlier ones."
    ),
    "ROUTING_SLOT_CAUSAL": (
        "google-research masks causally by slot inside a cluster (attention_bias_lower_triangle(window): key "
        "slot t <= query slot s, the lists sorted by position), which with separate query and key lists lets "
        "a query attend to later tokens. Its preset reproduces that; fails an implementation that masks by "
        "position under the google_research preset."
    ),
    "SHARED_QK_SELF_MASK": (
        "Under shared-QK the key lists are the query lists, and a token's own key follows the preset: canonical "
        "excludes it unless no other key of its row is allowed (Reformer's rule), lucidrains replaces its logit "
        "by -5e4 (TOKEN_SELF_ATTN_VALUE) after the other masks, google-research does not mask it. Fails no self "
        "mask, an exact self mask that empties first rows, or one preset's rule under another."
    ),
    "CENTROID_EMA": (
        "A centroid update assigns each routing vector to its nearest centroid by the centroids routing used "
        "(before the update). google-research (vq_ema): EMA of counts and sums, counts smoothed as (c + eps) / "
        "(n + K eps) * n with eps 1e-5, centroid = sums / smoothed counts, padded tokens left out. lucidrains "
        "(normalized_mean_ema): centroid <- decay * centroid + (1 - decay) * normalize(sum of its vectors), "
        "unchanged when it has none. Fails counting padded tokens, skipping the smoothing, not renormalising "
        "the new mean, and swapping decay and 1 - decay."
    ),
    "HYBRID_HEAD_ORDER": (
        "A hybrid layer's heads are in its preset's order: google-research routing heads first, local heads "
        "last (attention_nd splits the routing heads off first); lucidrains local heads first (SelfAttention "
        "concatenates [local_out, global_out]), and its local heads are causal even in a non-causal layer. "
        "Cases have unequal numbers of local and routing heads; fails the other order."
    ),
    "SOFT_ROUTING": (
        "Soft routing mixes P attention paths per token: out[b, h, n] = sum_p softmax_p(x[b, n] . W_r) * "
        "O_p[b, h, n], the heads of a token sharing its distribution; gradients reach W_r, x and every path. "
        "Fails normalising the probabilities over tokens instead of paths, W_r applied transposed, and "
        "gradients that stop at the probabilities."
    ),
}


def describe(names) -> dict[str, str]:
    """The catalogue entries for ``names``, sorted by name.

    Raises
    ------
    KeyError
        Naming every flag that the catalogue does not describe.
    """
    unknown = sorted(set(names) - set(FLAGS))
    if unknown:
        raise KeyError(f"flags not in refattn/conformance/flags.py: {unknown}")
    return {name: FLAGS[name] for name in sorted(set(names))}
