"""Invariants of LSH attention (spec/lsh.md, "Invariants"), reusable on any implementation.

The central one is the dense identity: without dropout, the whole multi-round
computation is *one* softmax over the keys, each weighted by how many times
it occurs in the query's windows,

    out_i = Σ_j n_ij exp(z_ij) v_j / Σ_j n_ij exp(z_ij),    lse_i = log Σ_j n_ij exp(z_ij),

with ``z_ij`` the logit of step (8) (the same for every occurrence of the
pair, since masks and self pairs are decided by position) and ``n_ij`` the
occurrence count. With the duplicate correction every ``n_ij > 0`` counts
once. :func:`window_counts` computes ``n`` from the buckets by enumerating
the windows, independently of the reference's chunk-offset formula
(:func:`refattn.lsh.pair_counts`), and :func:`lsh_as_dense` evaluates the
identity: given an implementation's buckets, the output it should produce.

Properties take ``attend(qk, v, **params)``, an implementation returning an
object with ``.out``, ``.lse`` and ``.aux["buckets"]`` (a refattn
:class:`~refattn.core.results.Result` or a kernel wrapped to look like one),
and a problem (``qk``, ``v``, ``params``: the keyword arguments of
:func:`refattn.lsh.lsh_attention`, rotations included). They raise
``AssertionError`` describing the violation. ``rtol`` is a normwise relative
tolerance: 1e-10 suits float64 implementations.
"""

from __future__ import annotations

import inspect

import numpy as np

from ..core.invariants import close, require
from ..core.registry import DISPATCH_ARGUMENTS
from ..core.results import Result
from ..core.softmax import masked_softmax
from .inputs import LSHInputs, check_lsh_inputs
from .reference import hash_buckets_of, log_pair_counts, lsh_attention, normalised_keys, pair_logits


def sorted_slots(buckets: np.ndarray) -> np.ndarray:
    """The slot of every item ``t = r·N + n`` in the (bucket, position) order, by counting.

    ``slot[t] = #{t' : (b[t'], t') < (b[t], t)}``: no sort routine, so it
    checks the reference's stable argsort. (B, H, R·N), int64.
    """
    b, h, r, n = buckets.shape
    key = buckets.reshape(b, h, r * n)
    items = np.arange(r * n)
    before = (key[..., None, :] < key[..., :, None]) | ((key[..., None, :] == key[..., :, None]) & (items[None, :] < items[:, None]))
    return before.sum(axis=-1)


def window_counts(buckets: np.ndarray, chunk_len: int, num_chunks_before: int, num_chunks_after: int,
                  same_round: bool = False) -> np.ndarray:  # fmt: skip
    """``n_ij``: how many times token ``j`` occurs in the windows of token ``i``'s copies, (B, H, N, N).

    Enumerates, for every chunk ``c`` and every offset ``d`` in
    ``-before .. after``, the pairs (query item in chunk ``c``, key item in
    chunk ``(c + d) mod C``) and adds one for each; with ``same_round``, only
    pairs whose two items come from the same round (reformer-pytorch's ``n'_ij``).
    """
    b, h, r, n = buckets.shape
    chunk = sorted_slots(buckets) // chunk_len  # (B, H, R·N): chunk of each item
    num_chunks = -(-(r * n) // chunk_len)
    position = np.arange(r * n) % n  # token of each item
    round_of = np.arange(r * n) // n  # round of each item
    counts = np.zeros((b, h, n, n), dtype=np.int64)
    for bi in range(b):
        for hi in range(h):
            for c in range(num_chunks):
                queries = np.flatnonzero(chunk[bi, hi] == c)
                for d in range(-num_chunks_before, num_chunks_after + 1):
                    keys = np.flatnonzero(chunk[bi, hi] == (c + d) % num_chunks)
                    pair = np.ones((len(queries), len(keys)), dtype=np.int64)
                    if same_round:
                        pair = (round_of[queries][:, None] == round_of[keys][None, :]).astype(np.int64)
                    np.add.at(counts[bi, hi], (position[queries][:, None], position[keys][None, :]), pair)
    return counts


def lsh_as_dense(qk, v, *, buckets=None, **params) -> Result:
    """The output and log-sum-exp that buckets imply, by the dense identity (module docstring).

    Parameters
    ----------
    qk, v : ndarray (B, H, N, D), (B, H, N, Dv)
    buckets : int ndarray (B, H, R, N), optional
        Buckets with round offsets (``aux["buckets"]``) from any
        implementation; by default the reference's hashing of ``qk``. Ignored
        on the short-sequence path, where every key counts once.
    **params
        The keyword arguments of :func:`refattn.lsh.lsh_attention`
        (``rotations``, ``num_buckets``, ..., ``preset``).

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv), ``lse`` (B, H, N); ``aux["counts"]`` is ``n``.
    """
    x = _checked(qk, v, params)
    b, h, n, _ = qk.shape
    qk, v = qk.astype(np.float64), v.astype(np.float64)
    if x.short:
        counts = same_round = np.ones((b, h, n, n), dtype=np.int64)
    else:
        buckets = hash_buckets_of(x) if buckets is None else np.asarray(buckets)
        counts = window_counts(buckets, x.chunk_len, x.num_chunks_before, x.num_chunks_after)
        same_round = window_counts(buckets, x.chunk_len, x.num_chunks_before, x.num_chunks_after, same_round=True)
    positions = np.broadcast_to(np.arange(n), (b, h, n))
    keys = normalised_keys(qk, x.key_norm, x.key_norm_eps)
    scores = x.scale * np.einsum("bhid,bhjd->bhij", qk, keys)  # (B, H, N, N)
    logits, kept, _ = pair_logits(
        scores, positions, positions, causal=x.causal, valid=x.valid, self_mask_value=x.self_mask_value,
        mask_value=x.mask_value, mask_mode=x.mask_mode, mask_padded_queries=x.mask_padded_queries,
        padding_marks=x.padding_marks,
    )  # fmt: skip
    present = counts > 0
    allowed = present if kept is None else present & kept
    weighted = logits + np.log(np.maximum(counts, 1))  # n_ij occurrences of exp(z_ij)
    if x.dup_correction and x.dup_count == "occurrences":
        weighted = logits
    elif x.dup_correction:
        weighted = weighted - np.where(present, log_pair_counts(same_round, x.dup_count), 0.0)
    weights, lse = masked_softmax(weighted, allowed)
    out = np.einsum("bhij,bhje->bhie", weights, v)
    return Result(out=out, lse=lse, aux={"counts": counts})


def _checked(qk, v, params: dict) -> LSHInputs:
    """The checked inputs of ``lsh_attention(qk, v, **params)``, its defaults filling what ``params`` leaves out."""
    bound = inspect.signature(lsh_attention).bind(qk, v, **params)
    bound.apply_defaults()
    arguments = {name: value for name, value in bound.arguments.items() if name not in DISPATCH_ARGUMENTS}
    return check_lsh_inputs(**arguments)


def dense_identity(attend, qk, v, params, rtol=1e-10):
    """The implementation's output and log-sum-exp are the dense identity's for its own buckets."""
    result = attend(qk, v, **params)
    dense = lsh_as_dense(qk, v, buckets=result.aux.get("buckets"), **params)
    close("out", result.out, dense.out, rtol)
    close("lse", result.lse, dense.lse, rtol)


def causal_prefix(attend, qk, v, params, rtol=1e-10):
    """With ``causal=True``, the outputs of tokens before ``N // 2`` do not depend on the later values."""
    require(bool(params.get("causal")), "causal=True")
    cut = qk.shape[2] // 2
    changed = v.copy()
    changed[:, :, cut:] += 1.0
    base, moved = attend(qk, v, **params), attend(qk, changed, **params)
    close("out[:N // 2]", moved.out[:, :, :cut], base.out[:, :, :cut], rtol)
