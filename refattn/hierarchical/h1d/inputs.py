"""Checked inputs of one H-Transformer-1D call, and its compatibility presets.

Every behaviour on which lucidrains' h-transformer-1d departs from the paper
is one named parameter (spec/hierarchical.md, "How h-transformer-1d
differs"); ``preset="lucidrains"`` sets them all, ``preset=None`` is the
paper's hierarchical matrix. An explicit argument always wins.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ...core import checks
from ...core.errors import SpecError
from ...core.presets import FROM_PRESET

#: ``row_max``: one shift per query row over every level (a single softmax), or one per level and block.
ROW_MAXIMA = ("shared", "per_level")
#: ``coarse_denominator``: what a coarse key adds to the normaliser, its token count or 1.
COARSE_DENOMINATORS = ("counts", "ones")
#: ``coarse_queries``: the group's mean stands for every token of it ("all"), only for its last token ("last"),
#: or the group's first token's query stands for every token of it ("first", causal without later queries).
COARSE_QUERIES = ("all", "last", "first")
#: ``neighbours``: the blocks each block meets at every level: the block before and after it, less what the
#: finer level covers (the paper's H-matrix), or only its sibling (lucidrains).
NEIGHBOURS = ("tridiagonal", "siblings")
#: A term's key blocks: the query block itself, its sibling, the block before it, the block after it.
KEY_BLOCKS = ("own", "sibling", "left", "right")
PRESET_NAMES = (None, "lucidrains")
#: The parameters a preset sets, with their canonical (paper) values.
#: (Causal, the coarse query is the group's first token's instead: ``coarse_queries="first"``.)
CANONICAL = {"row_max": "shared", "coarse_denominator": "counts", "finest_sibling": True,
             "coarse_queries": "all", "denominator_eps": 0.0, "neighbours": "tridiagonal"}  # fmt: skip


def preset_values(preset: str | None, causal: bool) -> dict:
    """The parameter values of ``preset`` (h-transformer-1d 0.1.9 differs between its two classes)."""
    if preset is None:
        return {**CANONICAL, "coarse_queries": "first" if causal else "all"}
    return {"row_max": "per_level", "coarse_denominator": "ones", "finest_sibling": not causal,
            "coarse_queries": "last" if causal else "all", "denominator_eps": 1e-8, "neighbours": "siblings"}  # fmt: skip


def preset_levels(preset: str | None, causal: bool, blocks: int) -> int:
    """Levels (level 0 included) when ``num_levels`` is None: recurse until 2 top blocks remain.

    h-transformer-1d's ``HAttention1D`` coarsens ``log2(N / block) - 2`` times
    (its L172), stopping at 4 top blocks: one level fewer than the paper.
    """
    full = max(1, int(np.log2(blocks)))
    return full - 1 if preset == "lucidrains" and not causal else full


@dataclass(frozen=True)
class Term:
    """One block-sparse product of the hierarchy: ``level`` (coarsening 2**level) and whose keys.

    ``keys`` (one of :data:`KEY_BLOCKS`): ``"own"``, each block attends to
    itself (level 0 only, the diagonal); ``"sibling"``, block ``2m`` to
    ``2m + 1`` and vice versa; ``"left"`` / ``"right"``, block ``m`` to
    ``m - 1`` / ``m + 1`` (at levels >= 1 less the pairs of adjacent
    half-blocks, which the finer level covers).
    """

    level: int
    keys: str


@dataclass(frozen=True)
class H1DInputs:
    """Checked q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) and parameters."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    shape: checks.AttentionShape
    block_size: int
    num_levels: int
    causal: bool
    scale: float
    padded_len: int  # P = block_size · 2**k >= N; P = N without padding
    preset: str | None
    row_max: str
    coarse_denominator: str
    finest_sibling: bool
    coarse_queries: str
    denominator_eps: float
    neighbours: str

    @property
    def defines_lse(self) -> bool:
        """Whether the output is one softmax (the paper's normalisation), so that it has a log-sum-exp."""
        return self.row_max == "shared" and self.coarse_denominator == "counts" and self.denominator_eps == 0.0

    def cotangent_shapes(self) -> dict:
        s = self.shape
        lse = (s.batch, s.q_heads, s.q_len) if self.defines_lse else None
        return {"dout": (s.batch, s.q_heads, s.q_len, s.value_dim), "dlse": lse}

    def terms(self) -> list[Term]:
        """The block products, finest first: level 0's diagonal and neighbours, then each coarser level's neighbours.

        Neighbours are the sibling, or the blocks before and after (causal: only before).
        """
        blocks = self.padded_len // self.block_size
        sides = ("sibling",) if self.neighbours == "siblings" else ("left",) if self.causal else ("left", "right")
        terms = [Term(0, "own")]
        if blocks > 1 and self.finest_sibling:
            terms += [Term(0, side) for side in sides]
        terms += [Term(level, side) for level in range(1, self.num_levels) for side in sides]
        return terms


def check_h1d_inputs(q, k, v, *, block_size, num_levels, causal, scale, padding, preset, row_max,
                     coarse_denominator, finest_sibling, coarse_queries, denominator_eps,
                     neighbours=FROM_PRESET) -> H1DInputs:  # fmt: skip
    """Check every argument of ``h1d_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = checks.qkv(q, k, v)
    if shape.q_len != shape.kv_len:
        raise SpecError("k", f"N = {shape.q_len} keys, as many as queries (a hierarchy over one sequence)",
                        f"{shape.kv_len} keys")  # fmt: skip
    if preset not in PRESET_NAMES:
        raise SpecError("preset", f"one of {list(PRESET_NAMES)}", checks.summary(preset))
    causal = checks.flag(causal, "causal")
    padding = checks.flag(padding, "padding")
    block_size = _positive_int(block_size, "block_size")
    padded_len = _padded_length(shape.q_len, block_size, padding)
    if padding and preset == "lucidrains":
        raise SpecError("padding", "False with preset='lucidrains' (the library pads with zero tokens that attend)",
                        "True")  # fmt: skip
    blocks = padded_len // block_size
    if num_levels is None:
        num_levels = preset_levels(preset, causal, blocks)
        if num_levels < 1:
            raise SpecError("q", f"N >= 4 · block_size = {4 * block_size} (h-transformer-1d's HAttention1D "
                            "coarsens log2(N / block) - 2 >= 0 times)", f"N = {shape.q_len}")  # fmt: skip
    num_levels = _positive_int(num_levels, "num_levels")
    if num_levels > max(1, int(np.log2(blocks))):
        raise SpecError("num_levels", f"at most log2(N / block_size) = {max(1, int(np.log2(blocks)))} "
                        "(the coarsest level has two blocks)", repr(num_levels))  # fmt: skip
    values = preset_values(preset, causal)
    given = {"row_max": row_max, "coarse_denominator": coarse_denominator, "finest_sibling": finest_sibling,
             "coarse_queries": coarse_queries, "denominator_eps": denominator_eps, "neighbours": neighbours}  # fmt: skip
    values.update({name: value for name, value in given.items() if value is not FROM_PRESET})
    row_max = checks.choice(values["row_max"], "row_max", ROW_MAXIMA)
    coarse_denominator = checks.choice(values["coarse_denominator"], "coarse_denominator", COARSE_DENOMINATORS)
    finest_sibling = checks.flag(values["finest_sibling"], "finest_sibling")
    coarse_queries = checks.choice(values["coarse_queries"], "coarse_queries", COARSE_QUERIES)
    denominator_eps = checks.real_number(values["denominator_eps"], "denominator_eps", minimum=0.0)
    neighbours = checks.choice(values["neighbours"], "neighbours", NEIGHBOURS)
    if neighbours == "tridiagonal" and num_levels > 1 and block_size % 2:
        raise SpecError("block_size", "an even number with neighbours='tridiagonal' and more than one level (level "
                        "l >= 1 leaves out the pairs of adjacent half-blocks, which level l - 1 covers)",
                        repr(block_size))  # fmt: skip
    if denominator_eps > 0 and row_max == "shared":
        raise SpecError("denominator_eps", "0 with row_max='shared' (the eps would depend on the shift)",
                        repr(denominator_eps))  # fmt: skip
    scale = checks.scale(scale, shape.head_dim)
    checks.scores_within_range(q, k, scale)
    return H1DInputs(q, k, v, shape, block_size, num_levels, causal, scale, padded_len, preset, row_max,
                     coarse_denominator, finest_sibling, coarse_queries, denominator_eps, neighbours)  # fmt: skip


def _positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise SpecError(name, "a positive int", checks.summary(x))
    return int(x)


def _padded_length(length: int, block_size: int, padding: bool) -> int:
    """``block_size · 2**k``: N itself without padding (else SpecError), the smallest >= N with it."""
    padded = block_size
    while padded < length:
        padded *= 2
    if padded != length and not padding:
        raise SpecError("q", f"N = block_size · 2**k (block_size {block_size}; or padding=True)",
                        f"N = {length}")  # fmt: skip
    return padded
