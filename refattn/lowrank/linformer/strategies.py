"""Hypothesis strategies of Linformer problems: projections E and F drawn with the sizes and sharing modes.

q, k, v are :func:`refattn.strategies.shapes`' (GQA and MQA heads, ``Nq != Nk``,
awkward head dims, value scales of :data:`refattn.strategies.VALUE_SCALES`).
Drawn: P from 1 to above Nk; E one matrix (P, Nmax) shared by every head or one
per kv head (Hkv, P, Nmax); F its own or F = E (key-value sharing); Nmax = Nk
or, with ``slice_projections``, longer; a key padding mask (its first key
real); a logit scale. Projections are uniform ±1/√P as lucidrains initialises
them. ``causal`` is never drawn: it is always refused. No decision is discrete.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, generators, random_qkv, seeds, shapes

MAX_PROJECTED = 8


@st.composite
def _problems(draw) -> MechanismProblem:
    shape = draw(shapes(max_len=17, head_dims=(1, 3, 8, 17)))
    q, k, v = random_qkv(shape, draw(seeds()), draw(st.sampled_from(VALUE_SCALES)))
    rng = draw(generators())
    projected = draw(st.integers(1, MAX_PROJECTED))
    arguments = dict(q=q, k=k, v=v)
    columns = shape.kv_len
    if draw(st.booleans()):
        arguments["slice_projections"] = True
        columns += draw(st.integers(0, 8))
    headwise = draw(st.booleans())
    projection_shape = ((shape.kv_heads,) if headwise else ()) + (projected, columns)
    arguments["e"] = rng.uniform(-1.0, 1.0, projection_shape) / projected**0.5
    if draw(st.booleans()):  # its own F (else F = E, key-value sharing, the default)
        arguments["f"] = rng.uniform(-1.0, 1.0, projection_shape) / projected**0.5
    if draw(st.booleans()):
        real = rng.random((shape.batch, shape.kv_len)) >= 0.3
        real[:, 0] = True
        arguments["key_padding_mask"] = real
    if draw(st.booleans()):
        arguments["scale"] = draw(st.sampled_from([0.05, 1.0, 3.0]))
    return MechanismProblem("linformer", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Linformer problems (no discrete decision: the precision changes nothing)."""
    return _problems()
