"""Attention diagnostics on CPU: one streaming pass over key tiles in Numba.

The same function as :func:`refattn.dilution.diagnostics.attention_diagnostics`
(same name, parameters and step numbers), computed the way
:mod:`refattn.core.tiles` computes attention: queries in blocks of
``BLOCK_Q`` rows, keys in tiles of ``BLOCK_K``, logits (D1) by the tile
library's :func:`~refattn.core.tiles.logits_tile`, and nothing larger than a (BLOCK_K, BLOCK_Q)
tile of logits ever exists. Memory is O(N) (plus the caller's arrays), never
O(Nq * Nk). Work items, parallel with ``prange``, are (batch, query head,
query block).

Streaming statistics (spec/dilution.md, (S1)-(S4))
---------------------------------------------------------------------
For each query row keep, over the keys seen so far, the running maximum
``m`` of the logits, and with ``p_j = exp(z_j − m)``::

    l = Σ p_j                  normaliser
    t = Σ p_j (z_j − m)        for the entropy (<= 0)
    r = Σ p_j rel_j            relevant mass, unnormalised
    u = Σ p_j (1 − rel_j)      irrelevant mass, unnormalised
    c = Σ [z_j > −inf]         attended keys n_i
    heap                       the top_k largest logits seen

Each tile's terms are summed on their own and then added to the running
sums, so that rounding grows with ``Nk / BLOCK_K`` rather than ``Nk`` (in
float32 over 65536 keys this takes the masses' error from ~1e-4 to ~2e-6).
When a tile raises the maximum from ``m`` to ``m'`` every sum is rescaled
by ``alpha = exp(m − m')``, and ``t`` also shifts its centre:
``t' = alpha · (t + (m − m') · l)``. A row that has seen no allowed key
(``m = −inf``) has ``l = t = 0``, and keeps them 0. After the last tile::

    H          = log l − t / l                       (D4)   (lse = m + log l)
    max weight = exp(m − lse) = 1 / l                (D7)
    top-k mass = Σ_heap exp(z − m) / l               (D8)
    relevant   = r / l,  irrelevant = u / l          (D9)

A masked key has ``z = −inf``; its centred logit is clamped to a finite
number below ``exp``'s flush threshold, so that its ``p_j = 0`` and its
``p_j (z_j − m)`` is 0 rather than NaN. The heap is a binary min-heap of
``min(top_k, Nk)`` logits per row, initialised to −inf: a logit enters when
it beats the smallest held, in O(log k); −inf entries add exp(−inf) = 0.

Relevance is read where it lies, through the strides of its own shape
(:func:`refattn.core.tiles.flat`), like a mask. A per-key relevance,
``(1, Nk)`` or ``(B, 1, 1, Nk)``, keeps the whole call O(N); a full
``(Nq, Nk)`` one is accepted and read tile by tile, never copied to score
size beyond the caller's own array.

Precision: float64 inputs run in float64; float32, float16 and bfloat16
inputs run in float32 (tiles, running statistics and results), as the dense
kernels do. The entropy and effective support are clamped to [0, log n_i]
and [1, n_i], as in the reference.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..core import tiles
from ..core.tiles import BLOCK_K, BLOCK_Q, TileArgs, compute_dtype, exp_nonpositive
from .diagnostics import DEFAULT_TOP_K, Diagnostics, check_diagnostics_inputs


def attention_diagnostics(
    q,
    k,
    *,
    mask=None,
    bias=None,
    causal=False,
    causal_alignment="bottom_right",
    window=None,
    scale=None,
    softcap=0.0,
    top_k=DEFAULT_TOP_K,
    relevant=None,
) -> Diagnostics:
    """Streaming diagnostics; see :func:`refattn.dilution.diagnostics.attention_diagnostics`.

    Returns
    -------
    Diagnostics
        Arrays (B, Hq, Nq) in the compute dtype (float32 for
        float32/float16/bfloat16 ``q``, float64 otherwise); ``attended`` int64.
    """
    x = check_diagnostics_inputs(
        q, k, mask=mask, bias=bias, causal=causal, causal_alignment=causal_alignment, window=window,
        scale=scale, softcap=softcap, top_k=top_k, relevant=relevant,
    )  # fmt: skip
    dtype = compute_dtype(q)
    args = TileArgs.build(x.dense, dtype, (q, k, k))  # v is k, and unused
    relevance, relevance_strides = tiles.flat(x.relevant, np.bool_)
    rows = args.q.shape[:3]
    out = {
        name: np.empty(rows, dtype) for name in ("entropy", "normalized", "support", "max_weight", "top", "rel", "irr")
    }
    attended = np.empty(rows, np.int64)
    _diagnostics_kernel(
        args.q, args.k, *args.logits(),
        x.relevant is not None, relevance, relevance_strides, min(x.top_k, x.dense.shape.kv_len),
        out["entropy"], out["normalized"], out["support"], out["max_weight"], out["top"], out["rel"], out["irr"],
        attended,
    )  # fmt: skip
    has_relevance = x.relevant is not None
    return Diagnostics(
        entropy=out["entropy"],
        normalized_entropy=out["normalized"],
        effective_support=out["support"],
        max_weight=out["max_weight"],
        top_k_mass=out["top"],
        attended=attended,
        relevant_mass=out["rel"] if has_relevance else None,
        irrelevant_mass=out["irr"] if has_relevance else None,
        top_k=x.top_k,
    )


@njit(cache=True)
def _heap_push(heap, z):
    """Offer logit ``z`` to ``heap``, a min-heap of the largest logits seen (root = smallest held)."""
    size = heap.shape[0]
    if not z > heap[0]:
        return
    # Replace the root and sift it down.
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= z:
            break
        heap[i] = heap[child]
        i = child
    heap[i] = z


@njit(parallel=True, cache=True, fastmath=False)
def _diagnostics_kernel(
    q, k,
    scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,  # (D1): dense (1)-(4)
    has_relevance, relevance, relevance_strides, heap_size,  # (D8), (D9)
    entropy, normalized, support, max_weight, top_mass, rel_mass, irr_mass, attended,
):  # fmt: skip
    """Every output (B, Hq, Nq); parallel over (b, h, query block), sweeping key tiles."""
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dtype = q.dtype
    below_flush = dtype.type(-1.0e4)  # exp of this is flushed to 0 in float32 and float64
    zero = dtype.type(0.0)
    for item in prange(tiles.query_blocks(q)):
        b, h, kvh, i0, n_q = tiles.query_block(item, q, kv_heads)
        q_t = tiles.transposed(q, b, h, i0, n_q, BLOCK_Q)  # (D, BQ)
        s_t = np.empty((BLOCK_K, BLOCK_Q), dtype)  # logits; key-major
        dcap = np.empty((BLOCK_K, BLOCK_Q), dtype)  # unused
        m = np.full(BLOCK_Q, -np.inf, dtype)  # (S1) running max
        l = np.zeros(BLOCK_Q, dtype)  # Σ p
        t = np.zeros(BLOCK_Q, dtype)  # Σ p (z − m)
        r = np.zeros(BLOCK_Q, dtype)  # Σ p rel
        u = np.zeros(BLOCK_Q, dtype)  # Σ p (1 − rel)
        count = np.zeros(BLOCK_Q, np.int64)  # attended keys
        heap = np.full((BLOCK_Q, heap_size), -np.inf, dtype)  # top-k logits per row

        key_lo, key_hi = tiles.key_range(i0, i0 + n_q, offset, left, right, kv_len)
        for j0 in range(key_lo, key_hi, BLOCK_K):
            n_k = min(BLOCK_K, key_hi - j0)
            # (D1) Logits of this tile (-inf where masked).
            np.dot(k[b, kvh, j0 : j0 + n_k], q_t, s_t[:n_k])  # (n_k, BQ) = k q^T
            tiles.logits_tile(
                s_t, dcap, True, n_q, n_k, b, h, i0, j0,
                scale, softcap, has_bias, bias, bias_strides, has_mask, mask, mask_strides, offset, left, right,
            )  # fmt: skip
            for c in range(n_q):
                # (S2) New maximum; rescale and re-centre what was summed under the old one.
                m_new = m[c]
                for row in range(n_k):
                    m_new = max(m_new, s_t[row, c])
                if m_new == -np.inf:  # no allowed key yet
                    continue
                if m[c] > -np.inf:
                    alpha = exp_nonpositive(m[c] - m_new)
                    t[c] = alpha * (t[c] + (m[c] - m_new) * l[c])
                    l[c] *= alpha
                    r[c] *= alpha
                    u[c] *= alpha
                m[c] = m_new
                # (S3) This tile's terms, summed apart and then added (64 terms at a time,
                #      so that rounding grows with Nk / BLOCK_K, not Nk).
                l_tile, t_tile, r_tile, u_tile = zero, zero, zero, zero
                for row in range(n_k):
                    z = s_t[row, c]
                    centred = max(z - m_new, below_flush)  # finite, so that p * centred = 0 when p = 0
                    p = exp_nonpositive(centred)
                    l_tile += p
                    t_tile += p * centred
                    if has_relevance and relevance[tiles.at(relevance_strides, b, h, i0 + c, j0 + row)]:
                        r_tile += p
                    else:
                        u_tile += p
                    count[c] += z > -np.inf
                    _heap_push(heap[c], z)
                l[c] += l_tile
                t[c] += t_tile
                r[c] += r_tile
                u[c] += u_tile

        # (S4) Close the rows: (D3)-(D9).
        for c in range(n_q):
            i = i0 + c
            n = count[c]
            attended[b, h, i] = n
            if n == 0:  # fully masked: every quantity 0
                entropy[b, h, i] = normalized[b, h, i] = support[b, h, i] = 0
                max_weight[b, h, i] = top_mass[b, h, i] = rel_mass[b, h, i] = irr_mass[b, h, i] = 0
                continue
            log_n = math.log(n)
            ent = min(max(math.log(l[c]) - t[c] / l[c], 0.0), log_n)  # (D4), clamped to [0, log n]
            entropy[b, h, i] = ent
            normalized[b, h, i] = ent / log_n if n >= 2 else 0.0  # (D5)
            support[b, h, i] = min(math.exp(ent), n)  # (D6)
            max_weight[b, h, i] = 1 / l[c]  # (D7) the maximum's p is exp(0) = 1
            top = zero
            for slot in range(heap_size):
                top += exp_nonpositive(heap[c, slot] - m[c])
            top_mass[b, h, i] = top / l[c]  # (D8)
            rel_mass[b, h, i] = r[c] / l[c]  # (D9)
            irr_mass[b, h, i] = u[c] / l[c]
