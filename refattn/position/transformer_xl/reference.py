"""Transformer-XL relative attention scores: the executable specification.

Dai et al. 2019, "Transformer-XL: Attentive Language Models Beyond a
Fixed-Length Context", Sec. 3.3, in the form of the authors' code
(kimiyoung/transformer-xl, pytorch/mem_transformer.py:
``PositionalEmbedding``, ``RelPartialLearnableMultiHeadAttn``). The score of
query ``i`` and key ``j`` is a content term plus a position term::

    s_ij = scale * ( (q_i + u) . k_j  +  (q_i + v_bias) . r[R - 1 - (p_i - p'_j)] )

with ``p = q_positions`` and ``p' = k_positions``. ``r`` (Hq, R, D) holds the
projected relative embeddings, row ``t`` for the distance ``R - 1 - t``
(descending, as the original's ``pos_seq = arange(klen - 1, -1, -1)``);
``u`` is the original's ``r_w_bias`` and ``v_bias`` its ``r_r_bias``. The
scores then go through dense attention's remaining steps: soft-cap, bias,
mask, softmax, dropout, ``· v``.

The original scores every query against every row of ``r`` and moves the
result into place with :func:`rel_shift`. The reference instead picks each
pair's row by its distance (:func:`relative_position_scores`), which needs no
particular layout of positions; the two agree on every pair the original's
causal mask keeps. Pairs whose distance has no row (negative, or beyond
``R - 1``) must be masked; an unmasked one raises :class:`SpecError`.

Keys and values may include cached memory: the original has
``Nk = mem_len + Nq``, ``q_positions = mem_len + arange(Nq)``,
``k_positions = arange(Nk)`` and ``R = Nk``.

Equations and their numbers are in spec/position.md (Transformer-XL). Step
(1) of dense attention is split into (1a)-(1c) here; (2)-(7) keep dense's
numbers.

Einsum letters: b batch, h query head, q query position, k key position,
t row of r (one relative distance), d head dim (of q, k and r), e value dim.
"""

from __future__ import annotations

import numbers

import numpy as np

from ...core import registry
from ...core.errors import SpecError
from ...core.precision import FLOAT64, Numerics
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads, sum_kv_heads, sum_to_shape
from ...core.softcap import softcap, softcap_slope
from ...dense import reference as dense_reference
from ...dense.inputs import DenseInputs, check_dense_inputs
from .inputs import TransformerXLInputs, check_every_unmasked_pair_has_a_row, check_position_term_inputs, pair_rows

# --------------------------------------------------------------------------
# The encoding: sinusoids, the original's shift, the position term.
# --------------------------------------------------------------------------


def sinusoid_relative_embeddings(klen, d_model, *, clamp_len=-1) -> np.ndarray:
    """The original's ``PositionalEmbedding`` of ``pos_seq = arange(klen - 1, -1, -1)``.

    Row ``t`` embeds the distance ``klen - 1 - t`` (descending), clamped to at
    most ``clamp_len`` when ``clamp_len > 0``. Columns are ``[sin | cos]``,
    concatenated, not interleaved::

        E[t, m]               = sin(d_t / 10000^(2m / d_model))    m < d_model / 2
        E[t, d_model/2 + m]   = cos(d_t / 10000^(2m / d_model))

    The original projects these with ``r_net`` (no bias) to ``n_head * d_head``
    and reads the result as (klen, n_head, d_head); transposed to (H, klen, D)
    that is ``r``.

    Parameters
    ----------
    klen : int >= 1
        Number of rows, ``R`` (the original uses the key length ``mem_len + qlen``).
    d_model : int >= 2, even
        Embedding width.
    clamp_len : int
        Distances above it use its embedding when ``> 0``; ``<= 0`` clamps nothing.

    Returns
    -------
    ndarray (klen, d_model), float64
        The original computes in its model's dtype (float32 by default).
    """
    klen = _integer(klen, "klen", minimum=1)
    d_model = _integer(d_model, "d_model", minimum=2)
    if d_model % 2:
        raise SpecError("d_model", "an even width (half sines, half cosines)", repr(d_model))
    clamp_len = _integer(clamp_len, "clamp_len")
    # (S1) Distances, descending: row t is distance klen - 1 - t.
    distance = np.arange(klen - 1, -1, -1, dtype=np.float64)  # (klen,)
    if clamp_len > 0:
        distance = np.minimum(distance, clamp_len)
    # (S2) Inverse frequencies 1 / 10000^(2m / d_model).
    inverse_frequency = 1.0 / 10000.0 ** (np.arange(0.0, d_model, 2.0) / d_model)  # (d_model / 2,)
    # (S3) Angles, then sines and cosines side by side.
    angle = np.outer(distance, inverse_frequency)  # (klen, d_model / 2)
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)  # (klen, d_model)


def rel_shift(x) -> np.ndarray:
    """The original's ``_rel_shift``, exactly: pad, reshape, drop a row, reshape back.

    ``x`` is (..., Nq, R): query ``i`` scored against every row ``t`` of ``r``.
    A zero column is put in front, giving (..., Nq, R + 1); the same memory is
    read as (..., R + 1, Nq), its first row dropped, and the rest read as
    (..., Nq, R). Element ``(i, j)`` of the result is therefore the element at
    flat offset ``f = i * R + j + Nq`` of the padded array, i.e. with
    ``(a, c) = divmod(f, R + 1)`` it is 0 if ``c == 0`` and ``x[a, c - 1]``
    otherwise. For ``R >= Nq`` (the original has ``R = Nk >= Nq``):

    * ``j <= i + R - Nq``: ``x[i, Nq - 1 - i + j]``, the row of distance
      ``R - Nq + i - j`` (``= mem_len + i - j`` when ``R = Nk``), which is the
      position term of the pair (i, j);
    * ``j == i + R - Nq + 1``: 0;
    * ``j >= i + R - Nq + 2``: ``x[i + 1, j - i - R + Nq - 2]``, a score of the
      *next* query, the position term of no pair (i, j). The original's causal
      mask (``triu(ones, 1 + mem_len)``) removes exactly these and the zeros.

    Parameters
    ----------
    x : ndarray (..., Nq, R)

    Returns
    -------
    ndarray (..., Nq, R)
    """
    if not isinstance(x, np.ndarray) or x.ndim < 2:
        raise SpecError("x", "an array of at least 2 dimensions (..., Nq, R)", f"{type(x).__name__} {np.shape(x)}")
    nq, n_rows = x.shape[-2:]
    padded = np.concatenate([np.zeros(x.shape[:-1] + (1,), x.dtype), x], axis=-1)  # (..., Nq, R + 1)
    dropped = padded.reshape(x.shape[:-2] + (n_rows + 1, nq))[..., 1:, :]  # (..., R, Nq)
    return dropped.reshape(x.shape)  # (..., Nq, R)


def relative_position_scores(q, r, v_bias, *, q_positions, k_positions) -> np.ndarray:
    """The position term ``(q_i + v_bias) . r[R - 1 - (p_i - p'_j)]``, unscaled: steps (1b) of the forward.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    r : ndarray (Hq, R, D)
        Row ``t`` holds the distance ``R - 1 - t``.
    v_bias : ndarray (Hq, D)
        The original's ``r_r_bias``.
    q_positions : int ndarray (Nq,)
    k_positions : int ndarray (Nk,)

    Returns
    -------
    ndarray (B, Hq, Nq, Nk), float64
        Pairs whose distance ``p_i - p'_j`` lies outside ``[0, R - 1]`` have
        no row; they get 0 here and attention must mask them.
    """
    q, r, v_bias, q_positions, k_positions = check_position_term_inputs(q, r, v_bias, q_positions, k_positions)
    selection = _row_selection(*pair_rows(q_positions, k_positions, r.shape[1]), r.shape[1], np.float64)
    q_position = q.astype(np.float64) + v_bias.astype(np.float64)[:, None, :]  # (B, Hq, Nq, D)
    return _position_term(q_position, r.astype(np.float64), selection, FLOAT64)[1]


def _row_selection(rows: np.ndarray, has_row: np.ndarray, n_rows: int, dtype) -> np.ndarray:
    """``E[i, j, t] = 1`` if pair (i, j) reads row ``t`` of ``r``, else 0: (Nq, Nk, R).

    Each pair reads at most one row, so ``sum_t G[i, t] E[i, j, t]`` picks
    ``G[i, row(i, j)]`` exactly, and its adjoint ``sum_j dP[i, j] E[i, j, t]``
    adds every pair's gradient into the row it read.
    """
    return ((rows[..., None] == np.arange(n_rows)) & has_row[..., None]).astype(dtype)


def _position_term(q_position, r, selection, num: Numerics) -> tuple[np.ndarray, np.ndarray]:
    """(1b) Score every query against every row of ``r``, then pick each pair's row.

    Returns the scores by row (B, Hq, Nq, R) and by pair (B, Hq, Nq, Nk).
    """
    by_row = num.store(np.einsum("bhqd,htd->bhqt", q_position, r, optimize=True))  # (B, Hq, Nq, R)
    by_pair = np.einsum("bhqt,qkt->bhqk", by_row, selection, optimize=True)  # (B, Hq, Nq, Nk), one term each
    return by_row, by_pair


# --------------------------------------------------------------------------
# The mechanism: the scores above, through dense attention.
# --------------------------------------------------------------------------


def transformer_xl_attention(
    q, k, v, *,
    r, u, v_bias, q_positions, k_positions,
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Attention with Transformer-XL's relative scores ``scale * ((q + u) kᵀ + position term)``.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
        May include cached memory (the original's ``cat([mems, w])``).
    v : ndarray (B, Hkv, Nk, Dv)
    r : ndarray (Hq, R, D)
        Projected relative embeddings (the original's ``r_head_k``), shared
        across the batch; row ``t`` holds the distance ``R - 1 - t``.
    u : ndarray (Hq, D)
        Content bias, added to q against the keys (``r_w_bias``).
    v_bias : ndarray (Hq, D)
        Position bias, added to q against ``r`` (``r_r_bias``).
    q_positions : int ndarray (Nq,)
        Position of each query; the original's is ``mem_len + arange(Nq)``.
    k_positions : int ndarray (Nk,)
        Position of each key; the original's is ``arange(Nk)``. Pair (i, j)
        reads row ``R - 1 - (q_positions[i] - k_positions[j])``; a pair with
        no such row must be masked.
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As :func:`refattn.dense_attention`. Masks, causality and windows are
        index-based, as there. ``scale`` (default ``1/sqrt(D)``) multiplies
        both terms; the soft-cap applies to the whole scaled score.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), float64; ``aux`` is empty.

    Raises
    ------
    SpecError
        On bad input, including an unmasked pair whose distance has no row of ``r``.
    """
    return registry.call_forward("transformer_xl", locals())


def forward(x: TransformerXLInputs, num: Numerics) -> Result:
    """The reference backend: steps (1a)-(3) here, (4)-(7) by dense attention's reference, in precision ``num``."""
    check_every_unmasked_pair_has_a_row(x)
    logits = _forward_steps(x, num)["logits"]
    return dense_reference.forward(_over_logits(x, logits), num)


def _forward_steps(x: TransformerXLInputs, num: Numerics) -> dict:
    """Steps (1a)-(3) of spec/position.md; returns every intermediate the VJP needs."""
    group = x.dense.shape.group
    q = num.load(x.dense.q)  # (B, Hq, Nq, D)
    k = repeat_kv_heads(num.load(x.dense.k), group)  # (B, Hq, Nk, D)
    r = num.load(x.r)  # (Hq, R, D)
    u, v_bias = num.load(x.u), num.load(x.v_bias)  # (Hq, D)
    selection = _row_selection(*x.rows(), x.n_rows, q.dtype)  # (Nq, Nk, R)

    # (1a) Content term: queries moved by u, against the keys.
    q_content = num.store(q + u[:, None, :])  # (B, Hq, Nq, D)
    content = num.store(np.einsum("bhqd,bhkd->bhqk", q_content, k, optimize=True))  # (B, Hq, Nq, Nk)
    # (1b) Position term: queries moved by v_bias, against the row of r of each pair's distance.
    q_position = num.store(q + v_bias[:, None, :])  # (B, Hq, Nq, D)
    _, position = _position_term(q_position, r, selection, num)  # (B, Hq, Nq, Nk)
    # (1c) Scaled scores: the scale multiplies both terms.
    scores = num.store(x.dense.scale * (content + position))  # (B, Hq, Nq, Nk)
    # (2) Soft-capping of the whole score, c * tanh(s / c).
    cap = x.dense.softcap
    capped = num.store(softcap(scores, cap)) if cap > 0 else scores
    # (3) The user's bias.
    logits = capped if x.dense.bias is None else num.store(capped + num.load(x.dense.bias))
    return dict(k=k, r=r, selection=selection, q_content=q_content, q_position=q_position, scores=scores, logits=logits)


def _over_logits(x: TransformerXLInputs, logits: np.ndarray) -> DenseInputs:
    """Dense attention's checked inputs for steps (4)-(7) on ``logits``: queries and keys of head dim 1,
    all 0, and the logits as its bias.

    With q = k = 0 its scores are exactly 0 in every precision, with no
    soft-cap its logits are then exactly its bias, and it masks, normalises,
    drops and sums the values as spec/dense.md says. Its VJP returns the
    logits' gradient as the bias's.
    """
    d, s = x.dense, x.dense.shape
    return check_dense_inputs(
        np.zeros((s.batch, s.q_heads, s.q_len, 1)), np.zeros((s.batch, s.kv_heads, s.kv_len, 1)), d.v,
        mask=d.mask, bias=logits, causal=d.causal, causal_alignment=d.causal_alignment, window=d.window,
        scale=None, softcap=0.0, dropout_keep=d.dropout_keep, dropout_p=d.dropout_p,
    )  # fmt: skip


transformer_xl_attention_vjp = registry.vjp_function(
    transformer_xl_attention, "transformer_xl", grads="""    ``q``, ``k``, ``v``, ``r``, ``u``, ``v_bias`` (shapes of the inputs)
    and ``bias`` (its own shape) when a bias was given. Positions, masks
    and the keep-mask are not differentiable. Row ``t`` of ``dr`` sums
    the pairs that read row ``t``, over the batch.""",
)


def vjp(x: TransformerXLInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: (7')-(4') by dense attention's reference, (3')-(1a') here, in precision ``num``."""
    check_every_unmasked_pair_has_a_row(x)
    s = x.dense.shape
    f = _forward_steps(x, num)

    # (7')-(4') Dense attention's VJP over the logits: dv, and the logits' gradient dZ.
    dense_grads = dense_reference.vjp(_over_logits(x, f["logits"]), cotangents, num)
    d_logits = num.load(dense_grads["bias"])  # (B, Hq, Nq, Nk)
    # (3') The user bias's gradient is dZ, summed over the axes it was broadcast along.
    d_bias = None if x.dense.bias is None else sum_to_shape(d_logits.astype(np.float64), x.dense.bias.shape)
    # (2') Soft-cap: d/ds [c tanh(s/c)] = sech²(s/c), formed without cancellation.
    d_scores = d_logits
    if x.dense.softcap > 0:
        d_scores = num.store(d_logits * softcap_slope(f["scores"], x.dense.softcap))
    # (1c') s = scale * (content + position): each term's gradient is scale * dS.
    d_terms = num.store(x.dense.scale * d_scores)  # (B, Hq, Nq, Nk)
    # (1b') Position term: each pair's gradient goes to the row it read, then to q + v_bias and to r.
    d_by_row = num.store(np.einsum("bhqk,qkt->bhqt", d_terms, f["selection"], optimize=True))  # (B, Hq, Nq, R)
    dq_position = num.store(np.einsum("bhqt,htd->bhqd", d_by_row, f["r"], optimize=True))  # (B, Hq, Nq, D)
    dr = num.store(np.einsum("bhqt,bhqd->htd", d_by_row, f["q_position"], optimize=True))  # (Hq, R, D)
    # (1a') Content term: to q + u and to the keys.
    dq_content = num.store(np.einsum("bhqk,bhkd->bhqd", d_terms, f["k"], optimize=True))  # (B, Hq, Nq, D)
    dk_per_q_head = num.store(np.einsum("bhqk,bhqd->bhkd", d_terms, f["q_content"], optimize=True))  # (B, Hq, Nk, D)
    # q enters both terms; u and v_bias are added to every query of every batch element.
    grads = Grads(
        q=num.store(dq_content + dq_position).astype(np.float64),
        k=sum_kv_heads(dk_per_q_head.astype(np.float64), s.group),  # GQA: summed over each group
        v=dense_grads["v"],
        r=dr.astype(np.float64),
        u=num.store(dq_content.sum(axis=(0, 2))).astype(np.float64),
        v_bias=num.store(dq_position.sum(axis=(0, 2))).astype(np.float64),
    )
    if d_bias is not None:
        grads["bias"] = d_bias
    return grads


def _integer(x, name: str, minimum: int | None = None) -> int:
    """A Python or NumPy integer (not a bool), at least ``minimum`` when given."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise SpecError(name, "an int" if minimum is None else f"an int >= {minimum}", f"{type(x).__name__} {x!r}")
    if minimum is not None and x < minimum:
        raise SpecError(name, f"an int >= {minimum}", repr(x))
    return int(x)
