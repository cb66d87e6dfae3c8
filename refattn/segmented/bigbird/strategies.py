"""Hypothesis strategies of BigBird problems: ITC and ETC, every preset and each preset parameter on its own,
with explicit random blocks.

Sizes shrink toward one batch element, one head, blocks of one token, one
block, no random block and the paper's union. The sequence is ``g + nb *
block_size`` tokens (BigBird takes whole blocks; ``g`` extra global tokens
in ETC); ``nb`` reaches past HF's short-sequence threshold ``5 + 2 r``
blocks. Random blocks are uniform (repeats, and blocks that are also sliding
or global, included), all zero (HF in eval mode), or drawn among the blocks
that are neither sliding nor global (``random_blocks_avoid_pattern``), per
head. The random blocks are given, so there is no discrete decision: the
precision changes nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, generators, random_qkv, seeds, shapes
from .reference import PRESET_PARAMETERS, PRESETS, random_query_blocks

HEAD_DIMS = (1, 3, 8, 17)
MAX_LEN = 36
MAX_BLOCKS = 12
MAX_EXTRA = 3
MAX_RANDOM = 3
#: Random-block forms: uniform over the blocks, or all zero (HF eval). With ``random_blocks_avoid_pattern``
#: they are drawn among the pattern-free blocks instead (HF training).
RANDOM_FORMS = ("uniform", "zeros")


def pattern_free_blocks(t: int, num_blocks: int, etc: bool) -> np.ndarray:
    """Key blocks that are neither sliding (``|s - t| <= 1``) nor global (ITC: 0, nb - 1) for query block t."""
    s = np.arange(num_blocks)
    free = np.abs(s - t) > 1
    if not etc:
        free &= (s != 0) & (s != num_blocks - 1)
    return s[free]


def fewest_blocks(avoid_pattern: bool, random_count: int, etc: bool) -> int:
    """The fewest blocks for which every query block with random blocks has a block to draw.

    Avoiding the pattern needs a block two away that is not global: ETC 4 blocks, ITC 6.
    """
    if not (avoid_pattern and random_count):
        return 1
    return 4 if etc else 6


def random_blocks(rng, form: str, heads: int, num_blocks: int, etc: bool, r: int, avoid_pattern: bool) -> np.ndarray:
    """(Hq, rows, r) int64 random blocks of every query block in ``random_query_blocks`` order (repeats allowed)."""
    rows = random_query_blocks(num_blocks, int(etc))
    if avoid_pattern:
        return np.array([[rng.choice(pattern_free_blocks(t, num_blocks, etc), r) for t in rows] for _ in range(heads)],
                        dtype=np.int64).reshape(heads, len(rows), r)  # fmt: skip
    if form == "zeros":
        return np.zeros((heads, len(rows), r), dtype=np.int64)
    return rng.integers(0, num_blocks, (heads, len(rows), r))


@st.composite
def _problems(draw) -> MechanismProblem:
    preset = draw(st.sampled_from(tuple(PRESETS)))
    overrides = {}
    if draw(st.booleans()):  # each preset parameter given on its own, overriding the preset's
        overrides = {name: draw(st.booleans()) for name in PRESET_PARAMETERS}
    flags = {**dict(zip(PRESET_PARAMETERS, PRESETS[preset])), **overrides}
    etc = draw(st.booleans()) and preset is None and not flags["short_sequence_full"]  # HF has no ETC
    extra = draw(st.integers(1, MAX_EXTRA)) if etc else 0
    block_size = draw(st.integers(1, 4))
    r = draw(st.integers(0, MAX_RANDOM))
    avoid = flags["random_blocks_avoid_pattern"]
    fewest = fewest_blocks(avoid, r, etc)
    num_blocks = draw(st.integers(fewest, max(fewest, min(MAX_BLOCKS, MAX_LEN // block_size))))
    n = extra + num_blocks * block_size
    shape = replace(draw(shapes(max_len=1, head_dims=HEAD_DIMS)), q_len=n, kv_len=n)
    q, k, v = random_qkv(shape, draw(seeds()), draw(st.sampled_from(VALUE_SCALES)))
    blocks = random_blocks(draw(generators()), draw(st.sampled_from(RANDOM_FORMS)), shape.q_heads, num_blocks, etc,
                           r, avoid)  # fmt: skip
    arguments = dict(q=q, k=k, v=v, block_size=block_size, random_blocks=blocks, extra_global_tokens=extra,
                     preset=preset, **overrides)  # fmt: skip
    if draw(st.booleans()):
        arguments["scale"] = draw(st.sampled_from((0.3, 2.0)))
    return MechanismProblem("bigbird", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """BigBird problems (the random blocks are given: the precision changes nothing)."""
    return _problems()
