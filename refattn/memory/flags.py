"""The bug classes the recurrent-memory cases are built to catch; each mechanism's ``cases.FLAGS`` quotes
the ones its cases use (flag descriptions must agree wherever a flag is quoted)."""

MEMORY_FLAGS = {
    "STREAM_STATE": "A multi-segment run from a given initial state: state in, outputs per segment, state out "
    "(result.aux); catches state dropped, reset or reordered between steps.",
    "MEMORY_MASK_OFF_BY_ONE": "Memory and segment lengths where seeing one memory entry too many or too few, "
    "or the segment's own token, changes the output (the original's triu(ones, 1 + mlen)).",
    "GRADIENT_THROUGH_MEMORY": "Stored gradients hold the state fixed between steps (stop-gradient): a key gets "
    "gradient only from its own step's queries; backpropagating through the memory gives other numbers.",
    "MEMORY_ZERO_INIT": "HF TransfoXL's init_mems: the stream starts from mem_len zero keys and values, which "
    "take attention weight in the first segments.",
    "SAME_LENGTH": "Transformer-XL's same_length: every query sees exactly its last mem_len tokens.",
    "RELATIVE_MEMORY_POSITIONS": "Transformer-XL relative scores over memory: distances count memory entries "
    "(queries at mlen + i, keys at 0 .. mlen + L - 1).",
    "SINK_POSITIONS": "Attention sinks with RoPE positions by cache slot (StreamingLLM) or by stream position: "
    "the two give different outputs once tokens have been evicted.",
    "SINK_EVICTION": "The cache overflows: the first sink_count tokens stay, the middle is evicted, the last "
    "recent_size remain.",
    "RETRIEVE_AFTER_UPDATE": "Infini-attention retrieval must read M_{s-1}, before the segment is written; "
    "reading after the update gives other numbers (update_order='update_first' is that bug).",
    "ZERO_DENOMINATOR": "Infini-attention's first segment with eps = 0: σ(Q) z = 0, and the retrieval is "
    "defined as 0, never NaN.",
    "DELTA_RULE": "Infini-attention's delta-rule update, eq. (5): the memory writes V minus what it already "
    "returns for σ(K).",
    "FEATURE_MAP": "The feature map σ = ELU + 1 (or none): a missing σ gives other numbers.",
    "MEMORY_TOKEN_POSITIONS": "RMT memory tokens' RoPE positions: in sequence (the paper) or at 0 with the "
    "segment offset by 10000 (lucidrains).",
    "MEMORY_TOKEN_MASK": "RMT's mask over [read, segment, write]: causal, or read tokens mutually visible and "
    "write tokens seeing everything (lucidrains' memory_not_causal).",
    "COMPRESSION_STRIDE": "Compressed memory: each run of c evicted entries becomes one (stride c, not 1), "
    "in stream order, and the compressed memory keeps its last compressed_len.",
    "MOST_USED_SELECTION": "Most-used compression: the evicted entries with the largest accumulated attention "
    "are kept, in stream order (a discrete decision).",
}


def quote(*names: str) -> dict[str, str]:
    """The descriptions of ``names``, for a cases module's ``FLAGS``."""
    return {name: MEMORY_FLAGS[name] for name in names}
