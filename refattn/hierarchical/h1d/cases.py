"""Conformance cases of H-Transformer-1D (spec/hierarchical.md).

The paper's cases (``preset=None``) and h-transformer-1d's (``"lucidrains"``),
whose parameters are written out in full (the preset's values resolved and
the level count explicit), so a consumer needs no preset table. Sizes are
awkward where the mechanism allows: D = 59, Dv = 7, GQA 4:2, a block of 6
(blocks are even when levels are coarsened: the correction halves them),
N = 13 padded to 16, N = 11 padded to 16.
"""

from __future__ import annotations

from ...conformance.case import Case, Dims, draw, make_case
from .inputs import preset_levels, preset_values

FLAGS = {
    "H1D_COVERAGE": "Every (query, key) pair is covered by exactly one level: level 0 on the block-tridiagonal band, "
    "level l on the blocks before and after less the adjacent half-blocks, up to a coarsest level of two blocks; "
    "siblings only, or stopping at four top blocks (h-transformer-1d's HAttention1D), attend other pairs or none.",
    "H1D_NORMALISATION": "One softmax over the implied matrix: one shift per token row and coarse denominators "
    "weighted by token counts (the coarsened vector of ones); per-level maxima or unweighted denominators "
    "compute another function.",
    "H1D_COARSENING": "Coarse queries and keys are means over 2**l tokens, coarse values sums; means for values "
    "or sums for keys change every coarse level.",
    "H1D_CAUSAL_BLOCKS": "Causal: the diagonal blocks are masked triangular, only the blocks before a block are kept, "
    "at level 0 too, and a group's coarse query is its first token's (h-transformer-1d's causal class leaves level "
    "0's sibling out and gives the coarse levels to the last token of each group).",
    "H1D_PADDING": "N padded to block · 2**k with tokens outside every mean, sum and count.",
}


def _case(name, description, flags, dims, *, preset=None, **params) -> Case:
    """One h1d case; with a preset its values are written into the parameters."""
    if preset is not None:
        blocks = dims.nq // params["block_size"]
        params = {**preset_values(preset, params.get("causal", False)), **params,
                  "num_levels": params.get("num_levels", preset_levels(preset, params.get("causal", False), blocks))}  # fmt: skip
    return make_case("h1d", name, description, flags, draw(dims), params=params, preset=preset)


def cases() -> list[Case]:
    return [
        _case("baseline", "N=16, block 4: level 0 on blocks and siblings, level 1 on the two halves.",
              ("BASELINE", "H1D_COVERAGE", "H1D_NORMALISATION"), Dims(1, 2, 2, 16, 16, 16), block_size=4),
        _case("deep_hierarchy", "N=64, block 4: four levels; query 0 reaches key 63 only at level 3.",
              ("H1D_COVERAGE", "H1D_NORMALISATION", "H1D_COARSENING"), Dims(1, 2, 2, 64, 64, 8), block_size=4),
        _case("awkward_sizes", "Block 6 over N=24, D=59, Dv=7, GQA 4:2, B=2.",
              ("AWKWARD_HEAD_DIM", "VALUE_DIM_DIFFERS", "GQA_HEAD_MAP", "GQA_GRAD_REDUCTION", "MULTI_BATCH",
               "H1D_COARSENING"), Dims(2, 4, 2, 24, 24, 59, 7), block_size=6),  # fmt: skip
        _case("causal", "Causal, N=32, block 4: triangular diagonal blocks, earlier blocks only, first-token queries.",
              ("CAUSAL_MASK", "H1D_CAUSAL_BLOCKS", "H1D_NORMALISATION"), Dims(1, 2, 2, 32, 32, 16),
              block_size=4, causal=True),
        _case("padding", "N=13 padded to 16 with block 4: padded tokens in no mean, sum or count.",
              ("H1D_PADDING", "ODD_LENGTH"), Dims(1, 2, 2, 13, 13, 8), block_size=4, padding=True),
        _case("causal_padding", "Causal, N=11 padded to 16 with block 2, scale 0.3.",
              ("H1D_PADDING", "H1D_CAUSAL_BLOCKS", "SCALE_OVERRIDE"), Dims(1, 2, 1, 11, 11, 8),
              block_size=2, padding=True, causal=True, scale=0.3),
        _case("one_block_dense", "Block = N = 9: one level, the same as dense attention.",
              ("BASELINE", "ODD_LENGTH"), Dims(1, 2, 2, 9, 9, 16), block_size=9),
        _case("partial_levels", "N=32, block 4, num_levels 2: pairs beyond level 1 are not attended.",
              ("H1D_COVERAGE",), Dims(1, 2, 2, 32, 32, 8), block_size=4, num_levels=2),
        _case("lucidrains", "h-transformer-1d HAttention1D, N=32, block 4: two coarse levels, half the pairs missed.",
              ("H1D_COVERAGE", "H1D_NORMALISATION"), Dims(1, 2, 2, 32, 32, 16), preset="lucidrains", block_size=4),
        _case("lucidrains_causal", "h-transformer-1d CausalHAttention1D, N=32, block 4: no level-0 sibling, "
              "coarse levels at the last token of each group.",
              ("H1D_CAUSAL_BLOCKS", "H1D_NORMALISATION"), Dims(1, 2, 2, 32, 32, 16), preset="lucidrains",
              block_size=4, causal=True),
    ]  # fmt: skip


def large_cases() -> list[Case]:
    """``refattn export --large``: forward only, computed with the Numba kernel."""
    return [
        make_case("h1d", "long_65536", "N=65536, block 64, D=64: ten levels.", ("LONG_SEQUENCE",),
                  draw(Dims(1, 2, 2, 65536, 65536, 64)), params={"block_size": 64}, grad=False),
    ]

