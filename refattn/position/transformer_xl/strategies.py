"""Hypothesis strategies of Transformer-XL problems, in the original's setup: causal (bottom-right), queries the
last ``Nq`` of ``Nk`` positions (memory before them), ``R = Nk`` relative rows, so that every visible pair has
a row; GQA, masks, biases, soft-caps and dropout as dense problems draw them."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...strategies import MechanismProblem, dense_problems, generators

OPTIONS = ("mask", "bias", "softcap", "scale", "dropout")


@st.composite
def _problems(draw) -> MechanismProblem:
    problem = draw(dense_problems(max_len=17, options=OPTIONS).filter(lambda p: p.shape.q_len <= p.shape.kv_len))
    shape = problem.shape
    rng = draw(generators())
    relative = shape.kv_len
    return problem.of(
        "transformer_xl", causal=True, causal_alignment="bottom_right",
        q_positions=shape.kv_len - shape.q_len + np.arange(shape.q_len), k_positions=np.arange(shape.kv_len),
        r=rng.standard_normal((shape.q_heads, relative, shape.head_dim)),
        u=rng.standard_normal((shape.q_heads, shape.head_dim)), v_bias=rng.standard_normal((shape.q_heads, shape.head_dim)),
    )  # fmt: skip


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Transformer-XL problems (no discrete decision: the precision changes nothing)."""
    return _problems()
