"""Hypothesis strategies of sliding-window problems: every convention, windows from 0 (or 1) upward.

Sizes shrink toward one batch element, one head, one token and head dim 1;
``Nq != Nk`` is drawn (queries align bottom-right, a KV cache), and windows
range from the smallest each convention accepts (1 for ``"hf_causal"``, 0
otherwise, even for ``"longformer"``) to wider than the sequence. There is
no discrete decision: the precision changes nothing.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, random_qkv, seeds, shapes
from .reference import CONVENTIONS

HEAD_DIMS = (1, 3, 8, 17)
MAX_LEN = 20
#: Logit scales: the default 1 / sqrt(D) first.
SCALES = (None, 0.3, 2.0)


def window_sizes(convention: str) -> st.SearchStrategy[int]:
    """``W`` as ``convention`` counts it, small first: >= 1 for hf_causal, even for longformer, else >= 0."""
    if convention == "hf_causal":
        return st.integers(1, MAX_LEN + 1)
    if convention == "longformer":
        return st.integers(0, MAX_LEN // 2 + 1).map(lambda half: 2 * half)
    return st.integers(0, MAX_LEN + 1)


@st.composite
def _problems(draw) -> MechanismProblem:
    shape = draw(shapes(max_len=MAX_LEN, head_dims=HEAD_DIMS))
    q, k, v = random_qkv(shape, draw(seeds()), draw(st.sampled_from(VALUE_SCALES)))
    convention = draw(st.sampled_from(CONVENTIONS))
    arguments = dict(q=q, k=k, v=v, window_size=draw(window_sizes(convention)), convention=convention)
    scale = draw(st.sampled_from(SCALES))
    if scale is not None:
        arguments["scale"] = scale
    return MechanismProblem("sliding_window", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Sliding-window problems (no discrete decision: the precision changes nothing)."""
    return _problems()
