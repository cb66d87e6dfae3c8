"""Hypothesis strategies of differential attention problems, for every option.

Sizes are :func:`refattn.strategies.shapes`' (head dims 1, 3, 8, 17,
``Nq != Nk``, one token) with the mechanism's layout: q (B, 2H, Nq, D),
k (B, 2Hkv, Nk, D), v (B, Hkv, Nk, 2D), H over Hkv as MHA, GQA 2:1 and 4:2,
MQA 3:1. Drawn: the four λ vectors (standard deviations from the authors'
0.1 up to 0.8, where exp(λ_q · λ_k) is far from 1 + λ_q · λ_k), λ_init from
a depth or given, the norm (its weight, its eps, or none), both GQA key
rules, and dense attention's options on the 2H maps (mask and bias per query
head, causal with both alignments, window, soft-cap, scale), with the value
scales of q and k of :data:`refattn.strategies.VALUE_SCALES` and values small
enough, sometimes, that the norm's eps matters. No decision is discrete.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ...strategies import VALUE_SCALES, MechanismProblem, Shape, generators, masks, windows
from .reference import LAMBDA_NAMES

#: (H, Hkv) output heads over kv heads: MHA, GQA 2:1 and 4:2, MQA 3:1, three heads.
HEAD_LAYOUTS = ((1, 1), (2, 2), (2, 1), (4, 2), (3, 1), (3, 3))
#: Standard deviations of the λ vectors: the authors' initialisation first.
LAMBDA_SCALES = (0.1, 0.4, 0.8)
#: Standard deviations of v: ordinary, and small enough that the norm's eps (1e-5) is comparable to the mean square.
V_SCALES = (1.0, 3e-3)


@st.composite
def dense_options(draw, scores: tuple[int, int, int, int]) -> dict:
    """Dense attention's options on score matrices ``scores`` (B, 2H, Nq, Nk), any subset (none when shrunk)."""
    rng = draw(generators())
    params = {}
    if draw(st.booleans()):
        batch, heads, q_len, kv_len = scores
        params["mask"] = draw(masks(Shape(batch, heads, heads, q_len, kv_len, head_dim=1, value_dim=1)))
    if draw(st.booleans()):
        params["bias"] = rng.standard_normal(draw(st.sampled_from([scores, (1, scores[1], 1, scores[3]), scores[-2:]])))
    if draw(st.booleans()):
        params["causal"] = True
    if draw(st.booleans()):
        params["window"] = list(draw(windows(max_side=20)))
    if "causal" in params or "window" in params:
        params["causal_alignment"] = draw(st.sampled_from(["bottom_right", "top_left"]))
    if draw(st.booleans()):
        params["softcap"] = draw(st.sampled_from([0.5, 5.0, 50.0]))
    if draw(st.booleans()):
        params["scale"] = draw(st.sampled_from([0.05, 1.0, 3.0]))
    return params


@st.composite
def _problems(draw) -> MechanismProblem:
    heads, kv_heads = draw(st.sampled_from(HEAD_LAYOUTS))
    batch, q_len, kv_len = draw(st.integers(1, 2)), draw(st.integers(1, 17)), draw(st.integers(1, 17))
    head_dim = draw(st.sampled_from((1, 3, 8, 17)))
    std, v_std, lambda_std = (draw(st.sampled_from(scales)) for scales in (VALUE_SCALES, V_SCALES, LAMBDA_SCALES))
    rng = draw(generators())
    arguments = dict(
        q=std * rng.standard_normal((batch, 2 * heads, q_len, head_dim)),
        k=std * rng.standard_normal((batch, 2 * kv_heads, kv_len, head_dim)),
        v=v_std * rng.standard_normal((batch, kv_heads, kv_len, 2 * head_dim)),
        **{name: lambda_std * rng.standard_normal(head_dim) for name in LAMBDA_NAMES},
    )  # fmt: skip
    if draw(st.booleans()):
        arguments["lambda_init"] = draw(st.sampled_from([0.5, 0.0, 0.95, -0.3]))
    else:
        arguments["depth"] = draw(st.integers(0, 12))
    if draw(st.booleans()):
        arguments["apply_norm"] = False
    elif draw(st.booleans()):
        arguments["norm_weight"] = rng.uniform(0.5, 1.5, 2 * head_dim)
    if draw(st.booleans()):
        arguments["norm_eps"] = draw(st.sampled_from([1e-6, 1e-2]))
    if draw(st.booleans()):
        arguments["gqa_keys"] = "repeat_kv"
    arguments.update(draw(dense_options((batch, 2 * heads, q_len, kv_len))))
    return MechanismProblem("differential", arguments)


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Differential-attention problems (no discrete decision: the precision changes nothing)."""
    return _problems()
