"""Hypothesis strategies of Infini-attention problems.

A stream (:func:`refattn.memory.xl_recurrence.strategies.streams`) with a
segment length anywhere in ``[1, N + 1]``, gate logits per query head, both
update rules, both feature maps, both update orders, ``eps`` of 0 (the zero
first denominator), small or 1, a logit scale, and sometimes a given state:
what a previous stream of up to :data:`MAX_PRIOR` tokens writes with the linear
rule (``M = σ(K₀)ᵀV₀``, ``z = Σ σ(K₀)``), so the norm is as the feature map
makes it (positive for ELU + 1, of any sign without σ). Everything shrinks
toward one head, few tokens, one-token segments, the zero state and the
paper's options.

The retrieval divides by ``σ(q)·z + ε``, which has a pole: without σ the
denominator takes any sign, and a float32 implementation must see the same
sign, and the same exact zeros, as the oracle. Every denominator (queries'
and, with the delta rule, keys') is either exactly 0 (nothing written yet and
``ε = 0``: the retrieval is 0 in every precision) or has a margin
(:func:`denominator_margins`) of at least
:func:`refattn.strategies.tie_margin` of the precision under test: the tokens
short of it are redrawn, and a draw still short after :data:`MAX_REDRAWS`
rounds is rejected.
"""

from __future__ import annotations

import numpy as np
from hypothesis import reject
from hypothesis import strategies as st

from ...strategies import MechanismProblem, tie_margin
from ..xl_recurrence.strategies import optional_scale, streams
from .reference import FEATURE_MAPS, UPDATE_ORDERS, UPDATES, features

#: The longest previous stream a given state summarises.
MAX_PRIOR = 8
EPSILONS = (0.0, 1e-3, 1.0)
#: Rounds of redrawing the tokens of a denominator short of its margin before the draw is rejected.
MAX_REDRAWS = 50


def denominator_margins(q, k, *, segment_len: int, norm, feature_map: str, update: str, update_order: str,
                        eps: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """How far each retrieval's denominator is from 0, relative to its rounding scale.

    A denominator ``d = σ(x)·z + ε`` is moved by rounding by a few unit
    roundoffs of ``Σ_d |σ(x)_d z_d| + ε``; its margin is ``|d|`` divided by
    that, and infinite where both are 0 (an exact zero, in every precision).
    The norm ``z`` depends on the keys alone (``z_s = z_{s-1} + Σ σ(K_t)``), so
    no memory ``M`` is needed.

    Parameters
    ----------
    q, k : ndarray (B, Hq, N, D), (B, Hkv, N, D)
    norm : ndarray (B, Hkv, D)
        The initial ``z``.
    segment_len, feature_map, update, update_order, eps
        As :func:`refattn.memory.infini_attention`.

    Returns
    -------
    ndarray (B, Hq, N), ndarray (B, Hkv, N)
        The queries' margins, and the keys' (the delta rule's reads; infinite
        with the linear rule).
    """
    group = q.shape[1] // k.shape[1]
    phi_q, phi_k = features(q, feature_map), features(k, feature_map)
    query_margins, key_margins = np.full(q.shape[:3], np.inf), np.full(k.shape[:3], np.inf)
    for start in range(0, q.shape[2], segment_len):
        segment = slice(start, start + segment_len)
        written = norm + phi_k[:, :, segment].sum(axis=2)  # (B, Hkv, D)
        read = norm if update_order == "retrieve_first" else written
        query_margins[:, :, segment] = _margins(phi_q[:, :, segment], np.repeat(read, group, axis=1), eps)
        if update == "delta":
            key_margins[:, :, segment] = _margins(phi_k[:, :, segment], norm, eps)
        norm = written
    return query_margins, key_margins


def _margins(phi: np.ndarray, norm: np.ndarray, eps: float) -> np.ndarray:
    """``|φ·z + ε| / (Σ|φ_d z_d| + ε)`` per row of ``phi`` (B, H, n, D) against ``norm`` (B, H, D); inf for 0 / 0."""
    denominator = np.abs(np.einsum("bhnd,bhd->bhn", phi, norm) + eps)  # (B, H, n)
    rounding = np.einsum("bhnd,bhd->bhn", np.abs(phi), np.abs(norm)) + eps
    return np.where(rounding > 0, denominator / np.where(rounding > 0, rounding, 1.0), np.inf)


@st.composite
def _problems(draw, precision: str) -> MechanismProblem:
    stream = draw(streams())
    s = stream.shape
    options = dict(
        segment_len=draw(st.integers(1, s.q_len + 1)), update=draw(st.sampled_from(UPDATES)),
        feature_map=draw(st.sampled_from(FEATURE_MAPS)), update_order=draw(st.sampled_from(UPDATE_ORDERS)),
        eps=draw(st.sampled_from(EPSILONS)),
    )  # fmt: skip
    state = {}
    if draw(st.booleans()):
        prior_k = features(stream.keys(draw(st.integers(1, MAX_PRIOR))), options["feature_map"])
        prior_v = stream.values(prior_k.shape[2])
        state = {"memory": np.einsum("bhnd,bhne->bhde", prior_k, prior_v), "norm": prior_k.sum(axis=2)}
    norm = state.get("norm", np.zeros((s.batch, s.kv_heads, s.head_dim)))
    q, k = stream.q.copy(), stream.k.copy()
    for _ in range(MAX_REDRAWS):
        query_margins, key_margins = denominator_margins(q, k, norm=norm, **options)
        short_q, short_k = query_margins < tie_margin(precision), key_margins < tie_margin(precision)
        if not (short_q.any() or short_k.any()):
            break
        q[short_q] = stream.value_scale * stream.rng.standard_normal((short_q.sum(), s.head_dim))
        k[short_k] = stream.value_scale * stream.rng.standard_normal((short_k.sum(), s.head_dim))
    else:
        reject()
    arguments = dict(q=q, k=k, v=stream.v, beta=2.0 * stream.rng.standard_normal(s.q_heads), **state, **options)
    return MechanismProblem("infini", {**arguments, **optional_scale(draw)})


def problems(precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Infini-attention problems whose retrieval denominators are exact zeros or far from 0 at ``precision``."""
    return _problems(precision)
