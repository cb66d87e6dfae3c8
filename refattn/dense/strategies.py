"""Hypothesis strategies of dense attention problems (refattn.strategies.problems("dense")).

Every option of :func:`refattn.dense_attention` (masks with empty rows, bias,
causal in both alignments, windows wider than the sequence, soft-cap, scale,
dropout keep-masks) over awkward sizes (GQA/MQA, ``Nq != Nk``, ``N = 1``,
head dims 1, 3, 17, 59) and value scales up to huge logits. Dense attention
makes no discrete decision, so the precision changes nothing.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ..strategies import MechanismProblem, dense_problems


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Dense problems with any subset of the options switched on."""
    return dense_problems().map(lambda problem: problem.of("dense"))
