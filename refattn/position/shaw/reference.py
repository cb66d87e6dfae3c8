"""Shaw relative position representations: the executable specification.

Shaw, Uszkoreit and Vaswani 2018, "Self-Attention with Relative Position
Representations" (NAACL), eqs. (3)-(5). Two learned tables, one row per
clipped relative distance and shared by every head, are read at the distance
between the *positions* of a query and a key::

    r_ij  = clip(k_positions[j] - q_positions[i], -K, K) + K        (0)
    s_ij  = scale * (q_i · k_j + q_i · rel_k[r_ij])                  (1)
    out_i = sum_j P'_ij (v_j + rel_v[r_ij])                          (7)

with the dense pipeline in between (soft-cap, bias, mask, softmax, dropout:
steps (2)-(6) of spec/dense.md). ``K`` is ``max_relative_position``; the
tables are ``rel_k`` (2K+1, D) and ``rel_v`` (2K+1, Dv). Positions are
explicit integer arrays (a KV cache passes ``q_positions = offset +
arange(Nq)``); masks and causal alignment stay index-based, as in dense.

Equations and their numbers are in spec/position.md ("Shaw"); step numbers
below match. Steps (2)-(6) are written out here, not taken from
refattn.dense, because the value term (7) needs the dropped weights, which
dense attention does not return.

Einsum letters: b batch, h query head, q query position, k key position,
d head dim (of q and k), e value dim.
"""

from __future__ import annotations

import numpy as np

from ...core import checks, registry
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads, sum_kv_heads, sum_to_shape
from ...core.softcap import softcap_slope
from ...dense import reference as dense_reference
from .inputs import ShawInputs, check_clip_distance


def relative_index(q_positions, k_positions, max_relative_position) -> np.ndarray:
    """The table row each (query, key) pair reads: ``clip(k_pos[j] - q_pos[i], -K, K) + K``.

    Parameters
    ----------
    q_positions : int ndarray (Nq,)
    k_positions : int ndarray (Nk,)
    max_relative_position : int >= 0
        ``K``: distances beyond it in either direction share the edge rows
        ``0`` (keys ``K`` or more before the query) and ``2K`` (after).

    Returns
    -------
    ndarray (Nq, Nk), int64, values in ``[0, 2K]``; row ``K`` is distance 0.
    """
    clip = check_clip_distance(max_relative_position)
    q_positions = checks.positions(q_positions, "q_positions", None)
    k_positions = checks.positions(k_positions, "k_positions", None)
    return _relative_index(q_positions, k_positions, clip)


def _relative_index(q_positions: np.ndarray, k_positions: np.ndarray, clip: int) -> np.ndarray:
    distance = k_positions[None, :] - q_positions[:, None]  # (Nq, Nk): key position minus query position
    return np.clip(distance, -clip, clip) + clip


def shaw_attention(
    q, k, v, *,
    rel_k, rel_v, q_positions, k_positions, max_relative_position,
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, precision=None, backend="reference") -> Result:
    """Attention with Shaw relative position representations on keys and values.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
        ``Hq % Hkv == 0``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
    v : ndarray (B, Hkv, Nk, Dv)
    rel_k : ndarray (2K+1, D)
        Relative key embeddings ``a^K``, shared by every head and batch element.
    rel_v : ndarray (2K+1, Dv)
        Relative value embeddings ``a^V``; required (pass zeros for a
        keys-only variant).
    q_positions : int ndarray (Nq,)
        Position of each query (``offset + arange(Nq)`` with a KV cache).
    k_positions : int ndarray (Nk,)
        Position of each key.
    max_relative_position : int >= 0
        ``K``, the clipping distance.
    mask, bias, causal, causal_alignment, window, scale, softcap, dropout_keep, dropout_p
        As for :func:`refattn.dense.reference.dense_attention`. Masks,
        causality and windows are by index, not by position.

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq), float64, the lse of
        the final logits (relative term included); a fully masked row has out 0
        and lse ``-inf``. ``aux["relative_index"]`` is the (Nq, Nk) int64 index.
    """
    return registry.call_forward("shaw", locals())


def forward(x: ShawInputs, num: Numerics) -> Result:
    """The reference backend: steps (0)-(7) in precision ``num``."""
    steps = _forward_steps(x, num)
    return Result(out=steps["out"], lse=steps["lse"], aux={"relative_index": steps["index"]})


def _forward_steps(x: ShawInputs, num: Numerics) -> dict:
    """Steps (0)-(7); returns every intermediate the VJP needs."""
    d = x.dense
    group = d.shape.group
    q = num.load(d.q)  # (B, Hq, Nq, D)
    k = repeat_kv_heads(num.load(d.k), group)  # (B, Hq, Nk, D)
    v = repeat_kv_heads(num.load(d.v), group)  # (B, Hq, Nk, Dv)

    # (0) Table row of every (query, key) pair, from their positions; the
    #     rows Shaw calls a^K_ij and a^V_ij.
    index = _relative_index(x.q_positions, x.k_positions, x.max_relative_position)  # (Nq, Nk)
    rel_k = num.load(x.rel_k)[index]  # (Nq, Nk, D)
    rel_v = num.load(x.rel_v)[index]  # (Nq, Nk, Dv)

    # (1) Scaled scores: the relative key term is inside the scale (Shaw eq. 4).
    content = num.store(np.einsum("bhqd,bhkd->bhqk", q, k, optimize=True))  # (B, Hq, Nq, Nk)
    position = num.store(np.einsum("bhqd,qkd->bhqk", q, rel_k, optimize=True))  # (B, Hq, Nq, Nk)
    scores = num.store(d.scale * (content + position))
    # (2)-(6) Soft-cap, bias, mask, softmax and dropout, as dense attention's.
    weights, lse, dropped = dense_reference.scores_to_weights(scores, d, num)
    # (7) Weighted sum of values, each plus its relative value row (Shaw eq. 3);
    #     the dropped weights multiply both terms.
    content_out = num.store(np.einsum("bhqk,bhke->bhqe", dropped, v, optimize=True))  # (B, Hq, Nq, Dv)
    position_out = num.store(np.einsum("bhqk,qke->bhqe", dropped, rel_v, optimize=True))  # (B, Hq, Nq, Dv)
    out = num.store(content_out + position_out)
    return dict(
        index=index, q=q, k=k, v=v, rel_k=rel_k, rel_v=rel_v,
        scores=scores, weights=weights, dropped=dropped, lse=lse, out=out,
    )  # fmt: skip


shaw_attention_vjp = registry.vjp_function(
    shaw_attention, "shaw", grads="""    ``q``, ``k``, ``v``, ``rel_k``, ``rel_v`` (shapes of the inputs) and
    ``bias`` (its own shape) when a bias was given. A table row's gradient
    sums over every batch element, head and (query, key) pair that reads
    it. Positions, masks and the keep-mask are not differentiable. Fully
    masked rows contribute 0.""",
)


def vjp(x: ShawInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (7')-(0') in precision ``num``."""
    s = x.dense.shape
    dlse = cotangents.dlse
    f = _forward_steps(x, num)
    dout = num.load(cotangents.dout)  # (B, Hq, Nq, Dv)

    # (7') out = D v + D a^V, with D the dropped weights: gradients of the
    #      values, of the gathered value rows (summed over batch and heads,
    #      which share the table) and of D.
    dv_per_q_head = num.store(np.einsum("bhqk,bhqe->bhke", f["dropped"], dout, optimize=True))  # (B, Hq, Nk, Dv)
    d_rel_v_rows = num.store(np.einsum("bhqk,bhqe->qke", f["dropped"], dout, optimize=True))  # (Nq, Nk, Dv)
    d_dropped = num.store(
        np.einsum("bhqe,bhke->bhqk", dout, f["v"], optimize=True)
        + np.einsum("bhqe,qke->bhqk", dout, f["rel_v"], optimize=True)
    )  # (B, Hq, Nq, Nk)
    # (6') D = P * keep / (1 - p).
    d_weights = d_dropped
    if x.dense.dropout_keep is not None:
        d_weights = num.store(np.where(x.dense.dropout_keep, d_dropped / (1.0 - x.dense.dropout_p), 0.0))
    # (5') Softmax and lse: dS = P * (dP - sum_k P dP) + P * dlse. Masked
    #      entries and fully masked rows have P = 0 and so get 0.
    p = f["weights"]
    row_dot = num.store(np.sum(p * d_weights, axis=-1, keepdims=True))  # (B, Hq, Nq, 1)
    d_logits = p * (d_weights - row_dot)
    if dlse is not None:
        d_logits = d_logits + p * num.load(dlse)[..., None]
    d_logits = num.store(d_logits)  # (B, Hq, Nq, Nk)
    # (3') The bias gradient is dS summed over the axes the bias was broadcast along.
    # (2') Soft-cap: d/ds [c tanh(s/c)] = sech²(s/c), formed without cancellation.
    d_scores = d_logits
    if x.dense.softcap > 0:
        d_scores = num.store(d_logits * softcap_slope(f["scores"], x.dense.softcap))
    # (1') s = scale * (q kᵀ + q a^Kᵀ): q reads k_j + a^K_ij; k and the key rows read q.
    scale = x.dense.scale
    dq = num.store(
        scale
        * (
            np.einsum("bhqk,bhkd->bhqd", d_scores, f["k"], optimize=True)
            + np.einsum("bhqk,qkd->bhqd", d_scores, f["rel_k"], optimize=True)
        )
    )  # (B, Hq, Nq, D)
    dk_per_q_head = num.store(scale * np.einsum("bhqk,bhqd->bhkd", d_scores, f["q"], optimize=True))  # (B, Hq, Nk, D)
    d_rel_k_rows = num.store(scale * np.einsum("bhqk,bhqd->qkd", d_scores, f["q"], optimize=True))  # (Nq, Nk, D)
    # (0') a = table[r] is a gather: its adjoint adds each pair's gradient
    #      into the row it read (clipped distances all land in rows 0 and 2K).
    rows = 2 * x.max_relative_position + 1
    group = s.group
    grads = Grads()
    grads["q"] = dq.astype(np.float64)
    grads["k"] = sum_kv_heads(dk_per_q_head.astype(np.float64), group)
    grads["v"] = sum_kv_heads(dv_per_q_head.astype(np.float64), group)
    grads["rel_k"] = _scatter_rows(d_rel_k_rows.astype(np.float64), f["index"], rows)
    grads["rel_v"] = _scatter_rows(d_rel_v_rows.astype(np.float64), f["index"], rows)
    if x.dense.bias is not None:
        grads["bias"] = sum_to_shape(d_logits.astype(np.float64), x.dense.bias.shape)
    return grads


def _scatter_rows(per_pair: np.ndarray, index: np.ndarray, rows: int) -> np.ndarray:
    """Adjoint of ``table[index]``: (Nq, Nk, X) per-pair gradients summed into (rows, X) by their index."""
    table = np.zeros((rows, per_pair.shape[-1]))
    np.add.at(table, index, per_pair)
    return table

