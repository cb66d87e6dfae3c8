"""Conformance cases for BigBird: the paper's union (a random block that is also a
sliding block counts once), random blocks that differ per head, HF eval mode's
all-zero random blocks (key block 0 weighted 1 + r times), HF training-mode draws
HF's full attention for short sequences, and ETC's extra global tokens."""

from __future__ import annotations

import numpy as np

from ...conformance.case import Case, Dims, draw, make_case

FLAGS: dict[str, str] = {
    "BIGBIRD_GLOBAL_BLOCKS": (
        "ITC: query blocks 0 and nb - 1 attend to every key and every query block attends to key blocks 0 and "
        "nb - 1. Fails global rows restricted to their band."
    ),
    "BIGBIRD_UNION": (
        "Canonical: a key block listed as random and also sliding or global (or twice as random) counts once. "
        "Fails counting it again, as HF's gathered columns do."
    ),
    "BIGBIRD_RANDOM_PER_HEAD": "Random blocks differ per head: head h reads random_blocks[h]. Fails sharing head 0's.",
    "BIGBIRD_HF_REPEATED_BLOCKS": (
        "preset 'hf' (eval): random indices all 0, so middle query blocks weight key block 0 (1 + r) times. "
        "Fails the paper's union, or ignoring the random columns."
    ),
    "BIGBIRD_HF_SHORT_FULL": "preset 'hf': N <= (5 + 2 r) * block_size is full attention (BigBirdModel's switch).",
    "BIGBIRD_ETC_GLOBAL_TOKENS": (
        "ETC (extra_global_tokens = g): the first g tokens attend to every token and every token attends to them; "
        "the sequence has sliding and random blocks (row t for every block t) and no global blocks. Fails sequence "
        "rows that do not see the extra tokens, or ITC's global blocks kept."
    ),
}


def _case(name, description, flags, dims, random_blocks, **params) -> Case:
    extra = {"random_blocks": lambda rng, dims: random_blocks(rng, dims)}
    return make_case("bigbird", name, description, flags, draw(dims, extra), params=params,
                     preset=params.get("preset"))  # fmt: skip


def _uniform(block: int, r: int):
    def make(rng, dims):
        nb = dims.nq // block
        return rng.integers(0, nb, (dims.hq, nb - 2, r))

    return make


def _etc_uniform(block: int, r: int, extra: int):
    """ETC: one row of r random blocks for every block of the sequence (the g extra tokens excluded)."""

    def make(rng, dims):
        nb = (dims.nq - extra) // block
        return rng.integers(0, nb, (dims.hq, nb, r))

    return make


def _avoiding(block: int, r: int):
    """HF training-mode draws: no sliding or global block of the query block."""

    def make(rng, dims):
        nb = dims.nq // block
        return np.array([[rng.choice([s for s in range(1, nb - 1) if abs(s - t) > 1], r, replace=False)
                          for t in range(1, nb - 1)] for _ in range(dims.hq)])  # fmt: skip

    return make


def _overlapping(rng, dims):
    """Blocks of 3 over 24 tokens (nb = 8), r = 2: query block t's second random block is t + 1 (sliding)."""
    random_blocks = rng.integers(0, 8, (dims.hq, 6, 2))
    random_blocks[:, :, 1] = np.arange(2, 8)
    return random_blocks


def cases() -> list[Case]:
    return [
        _case("itc_union", "Blocks of 3, nb = 8, r = 2 with a random block that is also sliding: counted once.",
              ("BIGBIRD_UNION", "BIGBIRD_GLOBAL_BLOCKS", "BIGBIRD_RANDOM_PER_HEAD"), Dims(1, 2, 2, 24, 24, 16),
              _overlapping, block_size=3),
        _case("itc_gqa", "Blocks of 2, nb = 9, r = 1, GQA 4:2, B = 2, D = 59.",
              ("BIGBIRD_RANDOM_PER_HEAD", "GQA_HEAD_MAP", "MULTI_BATCH", "AWKWARD_HEAD_DIM"), Dims(2, 4, 2, 18, 18, 59),
              _uniform(2, 1), block_size=2),
        _case("hf_eval", "preset 'hf': random indices all 0 (eval), blocks of 2, nb = 12, r = 2.",
              ("BIGBIRD_HF_REPEATED_BLOCKS",), Dims(1, 2, 2, 24, 24, 16),
              lambda rng, dims: np.zeros((dims.hq, 10, 2), dtype=np.int64), block_size=2, preset="hf",
              count_repeated_blocks=True, short_sequence_full=True, random_blocks_avoid_pattern=False),
        _case("hf_train", "preset 'hf_train': random blocks avoid the sliding and global blocks, nb = 11, r = 2.",
              ("BIGBIRD_RANDOM_PER_HEAD",), Dims(1, 2, 2, 22, 22, 8), _avoiding(2, 2), block_size=2,
              preset="hf_train", count_repeated_blocks=True, short_sequence_full=True, random_blocks_avoid_pattern=True),
        _case("hf_short_full", "preset 'hf': N = 14 <= (5 + 2) * 2: full attention.",
              ("BIGBIRD_HF_SHORT_FULL",), Dims(1, 2, 2, 14, 14, 8), _uniform(2, 1), block_size=2, preset="hf",
              count_repeated_blocks=True, short_sequence_full=True, random_blocks_avoid_pattern=False),
        _case("etc_extra_global", "ETC: g = 3 extra global tokens, blocks of 2, nb = 8, r = 1, GQA 2:1.",
              ("BIGBIRD_ETC_GLOBAL_TOKENS", "BIGBIRD_RANDOM_PER_HEAD", "GQA_HEAD_MAP"), Dims(1, 2, 1, 19, 19, 8),
              _etc_uniform(2, 1, 3), block_size=2, extra_global_tokens=3),
    ]  # fmt: skip
