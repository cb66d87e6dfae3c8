"""Hypothesis strategies of generic low-rank attention problems, ``U (W V) ⊘ U (W 1)`` or ``U (W V)``.

Sizes shrink toward one batch element, one head, one query, one key, rank 1
and the normalised form. Drawn: ``Nq != Nk``, ranks from 1 to above ``Nk``,
value dims 1, 3, 8 and 17, factors scaled by
:data:`refattn.strategies.VALUE_SCALES`. Normalised factors are positive
(kernel features, as Performer's φ), so that no row sum is near 0;
unnormalised ones are positive or of both signs (Nyströmformer's ``kernel₁ Z⁺``).
No decision is discrete.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, generators

MAX_LEN = 33
MAX_RANK = 8
VALUE_DIMS = (1, 3, 8, 17)


@st.composite
def _problems(draw) -> MechanismProblem:
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    q_len, kv_len, rank = draw(st.integers(1, MAX_LEN)), draw(st.integers(1, MAX_LEN)), draw(st.integers(1, MAX_RANK))
    value_dim = draw(st.sampled_from(VALUE_DIMS))
    normalized = not draw(st.booleans())  # shrinks to the default, normalised
    scale = draw(st.sampled_from(VALUE_SCALES))
    signed = not normalized and draw(st.booleans())
    rng = draw(generators())

    def factor(shape):
        return scale * (rng.standard_normal(shape) if signed else rng.uniform(0.1, 1.1, shape))

    arguments = dict(u=factor((batch, heads, q_len, rank)), w=factor((batch, heads, rank, kv_len)),
                     v=rng.standard_normal((batch, heads, kv_len, value_dim)))  # fmt: skip
    if not normalized:
        arguments["normalized"] = False
    return MechanismProblem("lowrank", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Generic low-rank problems (no discrete decision: the precision changes nothing)."""
    return _problems()
