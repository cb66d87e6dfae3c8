"""Hypothesis strategies of soft routing: a per-token mixture of dense-attention paths.

q, k, v are dense problems' (awkward sizes, GQA and MQA heads, Nq != Nk,
value scales: :func:`refattn.strategies.shapes`, :data:`~refattn.strategies.VALUE_SCALES`),
with one to four paths, each causal or not with a window or none, an optional
logit scale, the router's features ``x`` (B, Nq, Dx) and weights ``W_r``
(Dx, P) of a drawn spread (near-uniform to near-one-hot mixtures). Mixtures
are smooth in every input: no decision to keep away from a tie.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, generators, random_qkv, seeds, shapes
from ..hybrid.strategies import local_windows

MAX_PATHS = 4
#: Standard deviations of the router's weights: near-uniform mixtures to near-one-hot ones.
ROUTER_SCALES = (1.0, 0.1, 5.0)


@st.composite
def _problems(draw) -> MechanismProblem:
    shape = draw(shapes(max_len=17, head_dims=(1, 3, 8, 17)))
    q, k, v = random_qkv(shape, draw(seeds()), draw(st.sampled_from(VALUE_SCALES)))
    paths = draw(st.integers(1, MAX_PATHS))
    features = draw(st.integers(1, 6))
    rng = draw(generators())
    arguments = dict(
        q=q, k=k, v=v, x=rng.standard_normal((shape.batch, shape.q_len, features)),
        routing_weights=draw(st.sampled_from(ROUTER_SCALES)) * rng.standard_normal((features, paths)),
        path_causal=[draw(st.booleans()) for _ in range(paths)],
        path_window=[draw(local_windows()) for _ in range(paths)],
    )  # fmt: skip
    if draw(st.booleans()):
        arguments["scale"] = draw(st.sampled_from([0.05, 1.0, 3.0]))
    return MechanismProblem("soft_routing", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Soft-routing problems (no discrete decision: the precision changes nothing)."""
    return _problems()
