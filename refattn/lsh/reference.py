"""LSH attention (Reformer): the executable specification.

Kitaev, Kaiser & Levskaya 2020, "Reformer: The Efficient Transformer" (ICLR),
section 2 and appendix A. Queries and keys share one projection ``x``
(shared-QK). Each token is hashed into a bucket by an angular LSH
(``argmax([x·Rot; -x·Rot])`` for a random rotation ``Rot``), once per hashing
round; the rounds' tokens are sorted by bucket and cut into chunks, and each
query attends only to the keys of its chunk and its neighbouring chunks.
Queries are the raw ``x``; keys are ``x`` length-normalised. A token does not
attend to itself unless nothing else is available (its logit is a large
negative constant). The rounds are combined by their log-sum-exps.
spec/lsh.md maps the paper's symbols and equations to the steps below and
says where the canonical semantics departs from the paper.

The stages are separate functions, in the order of spec/lsh.md, whose step
numbers the comments carry:

* hashing, steps (1)-(3): :func:`rotate`, :func:`hash_buckets` (and
  :func:`bucket_margins`, how far each decision is from a tie);
* sorting, step (4): :func:`sort_items`;
* chunking, step (5): :func:`chunk_windows`;
* keys, step (6): :func:`normalised_keys`;
* logits, steps (7)-(8): :func:`pair_logits`;
* duplicate correction, step (9): :func:`window_multiplicity`,
  :func:`pair_counts`;
* per-chunk softmax, step (10) (``core.masked_softmax``); unsorting,
  step (11): :func:`unsort`; combining the rounds, step (12):
  :func:`combine_rounds`.

Symbols: ``R = num_hashes`` hashing rounds (``R'``: the rounds combined in
step (12), 1 on the short-sequence path), ``Rot`` the rotations, ``F`` the
buckets of one round, ``F'`` its bucket ids (``F`` plus the padding bucket),
``C`` the number of chunks.

Einsum letters: b batch, h head, r hashing round, n token position, q query
slot, k key slot (of a chunk's window), d head dim of ``qk``, e value dim,
p rotation column.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..core import checks, registry
from ..core.errors import SpecError
from ..core.precision import FLOAT64, Numerics
from ..core.presets import FROM_PRESET
from ..core.results import Cotangents, Grads, Result
from ..core.softmax import masked_softmax, merge
from .inputs import (
    LSHInputs,
    bucket_factors,
    checked_key_padding_mask,
    checked_rotations,
    has_padding_bucket,
)
from .presets import DUP_COUNTS, KEY_NORMS, MASK_MODES, PADDING_BUCKETS, PADDING_MARKS

# --- hashing: steps (1)-(3) ---------------------------------------------------


def rotate(qk: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """Step (1): the rotated vectors ``y[r, n] = x_n · Rot_r``, (B, H, R, N, P).

    ``qk`` is (B, H, N, D) and ``rotations`` (B, H, R, D, P), ``R = num_hashes``.
    """
    if not isinstance(qk, np.ndarray) or qk.ndim != 4:
        raise SpecError("qk", "a numpy array of shape (B, H, N, D)", checks.summary(qk))
    if (not isinstance(rotations, np.ndarray) or rotations.ndim != 5 or rotations.shape[:2] != qk.shape[:2]
            or rotations.shape[3] != qk.shape[3]):  # fmt: skip
        wanted = f"a numpy array of shape (B, H, R, D, P) with (B, H) = {qk.shape[:2]} and D = {qk.shape[3]}, as qk"
        raise SpecError("rotations", wanted, checks.summary(rotations))
    qk, rotations = checks.float_array(qk, "qk"), checks.float_array(rotations, "rotations")
    return np.einsum("bhnd,bhrdp->bhrnp", qk, rotations, optimize=True)


def _factor_buckets(rotated: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Step (2): the bucket of each token in each round from hashing alone, (B, H, R, N) int64.

    Factor ``k`` reads the next ``f_k / 2`` rotation columns; its bucket is
    ``argmax([y_k, -y_k])`` (in ``[0, f_k)``), and the factors combine with
    the first one least significant: ``Σ_k (Π_{k' < k} f_k') · bucket_k``.
    """
    bucket = np.zeros(rotated.shape[:-1], dtype=np.int64)
    base, start = 1, 0
    for factor in factors:
        part = rotated[..., start : start + factor // 2]  # (B, H, R, N, f/2)
        bucket += base * np.argmax(np.concatenate([part, -part], axis=-1), axis=-1)
        base, start = base * factor, start + factor // 2
    return bucket


def _offset_buckets(bucket: np.ndarray, num_buckets: int, valid: np.ndarray | None, padding_bucket: bool) -> np.ndarray:
    """Step (3): padded tokens to bucket ``F = num_buckets`` (when it exists), then round ``r`` offset by ``r · F'``."""
    buckets_per_round = num_buckets + 1 if padding_bucket else num_buckets  # F'
    if padding_bucket:
        bucket = np.where(valid[:, None, None, :], bucket, num_buckets)  # (B, H, R, N)
    offsets = np.arange(bucket.shape[2], dtype=np.int64)[:, None] * buckets_per_round  # (R, 1)
    return bucket + offsets


def hash_buckets_of(x: LSHInputs) -> np.ndarray:
    """Steps (1)-(3) for checked inputs, in float64: buckets (B, H, R, N) int64."""
    return _hash(x, x.qk.astype(np.float64), FLOAT64)


def _hash(x: LSHInputs, qk: np.ndarray, num: Numerics) -> np.ndarray:
    """Steps (1)-(3) for checked inputs: buckets (B, H, R, N) int64, round offsets included."""
    # (1) Rotate, in the compute dtype (the rotated values are not a stored step).
    rotated = rotate(qk, num.load(x.rotations))  # (B, H, R, N, P)
    # (2) One bucket per factor, combined.
    bucket = _factor_buckets(rotated, x.factors)  # (B, H, R, N)
    # (3) Padding bucket and round offsets.
    return _offset_buckets(bucket, x.num_buckets, x.valid, x.has_padding_bucket)


def hash_buckets(qk, rotations, num_buckets, *, key_padding_mask=None, padding_bucket="if_mask") -> np.ndarray:
    """Steps (1)-(3): the bucket of every token in every round, round offsets included.

    Parameters
    ----------
    qk : ndarray (B, H, N, D)
        The shared query-key vectors (hashed unnormalised; the argmax does not
        depend on their length).
    rotations : ndarray (H, R, D, P) or (B, H, R, D, P)
        ``Rot``, ``R`` rounds of ``P = Σ_k f_k / 2`` columns: the columns of
        factor ``k`` follow those of factor ``k - 1``.
    num_buckets : int or list of int
        Even bucket count, or even factors (factorised hashing).
    key_padding_mask : bool ndarray (B, N) or (1, N), optional
        True = real token.
    padding_bucket : {"if_mask", "if_padded", "none"}
        When padded tokens get the extra bucket ``Π f_k`` (spec/lsh.md (3)).

    Returns
    -------
    ndarray (B, H, R, N), int64
        ``b[r, n] = r · F' + bucket``, ``F' = Π f_k`` (+ 1 with the padding
        bucket). Returned as ``aux["buckets"]`` by :func:`lsh_attention`.
    """
    qk, rotations, factors, valid = _hashing_arguments(qk, rotations, num_buckets, key_padding_mask)
    padding = has_padding_bucket(valid, checks.choice(padding_bucket, "padding_bucket", PADDING_BUCKETS))
    rotated = rotate(qk.astype(np.float64), rotations.astype(np.float64))  # (B, H, R, N, P)
    return _offset_buckets(_factor_buckets(rotated, factors), int(np.prod(factors)), valid, padding)


def _hashing_arguments(qk, rotations, num_buckets, key_padding_mask):
    """Checked ``qk`` (B, H, N, D), rotations (B, H, R, D, P), factors and key padding mask."""
    if isinstance(qk, np.ndarray) and qk.ndim != 4:
        raise SpecError("qk", "4 dimensions (B, H, N, D)", f"shape {qk.shape}")
    qk = checks.float_array(qk, "qk")
    factors = bucket_factors(num_buckets)
    num_hashes = rotations.shape[-3] if isinstance(rotations, np.ndarray) and rotations.ndim >= 4 else 1
    batch, heads, length, head_dim = qk.shape
    rotations = checked_rotations(rotations, batch, heads, num_hashes, head_dim, factors)
    return qk, rotations, factors, checked_key_padding_mask(key_padding_mask, batch, length)


def bucket_margins(qk, rotations, num_buckets) -> np.ndarray:
    """How far each hashing decision is from a tie, relative to its rounding scale.

    For factor ``k`` the decision is the argmax of ``[y_k, -y_k]``; its margin
    is the gap between the largest and the second-largest entry divided by
    ``max_p Σ_d |x_d Rot_dp|`` over the factor's columns, which bounds how far
    rounding ``x`` and ``Rot`` can move any entry (by a few unit roundoffs of
    that scale). The returned margin is the smallest over the factors.
    A float32 implementation reproduces every bucket when the margins exceed
    a few times 2⁻²⁴; conformance cases have margins of at least 0.05, enough
    for bfloat16 inputs.

    Returns
    -------
    ndarray (B, H, R, N), float64
    """
    qk, rotations, factors, _ = _hashing_arguments(qk, rotations, num_buckets, None)
    qk, rotations = qk.astype(np.float64), rotations.astype(np.float64)
    rotated = rotate(qk, rotations)  # (B, H, R, N, P)
    scale = rotate(np.abs(qk), np.abs(rotations))  # (B, H, R, N, P)
    margin = np.full(rotated.shape[:-1], np.inf)
    start = 0
    for factor in factors:
        columns = slice(start, start + factor // 2)
        entries = np.concatenate([rotated[..., columns], -rotated[..., columns]], axis=-1)
        top_two = np.sort(entries, axis=-1)[..., -2:]
        gap = (top_two[..., 1] - top_two[..., 0]) / np.maximum(scale[..., columns].max(axis=-1), np.finfo(float).tiny)
        margin = np.minimum(margin, gap)
        start += factor // 2
    return margin


# --- sorting: step (4) ----------------------------------------------------------


def sort_items(buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step (4): sort the ``R · N`` items (round ``r``, token ``n``) by (bucket, position).

    Item ``t = r · N + n`` is token ``n``'s copy in round ``r``. The sort is
    stable by bucket over items in that order, so equal buckets (always of the
    same round, by the offsets) keep position order: HF's ``_stable_argsort``
    and trax's key ``N · bucket + position`` give the same order.

    Parameters
    ----------
    buckets : int ndarray (B, H, R, N), round offsets included

    Returns
    -------
    permutation : ndarray (B, H, R·N), int64
        ``permutation[s]`` is the item in sorted slot ``s`` (HF's
        ``sorted_bucket_idx``, trax's ``sticker``).
    inverse : ndarray (B, H, R·N), int64
        ``inverse[t]`` is the slot of item ``t`` (HF's ``undo_sorted_bucket_idx``).
    """
    b, h, r, n = checks.integer_array(buckets, "buckets", 4, "(B, H, R, N)").shape
    permutation = np.argsort(buckets.reshape(b, h, r * n), axis=-1, kind="stable")
    inverse = np.argsort(permutation, axis=-1, kind="stable")
    return permutation, inverse


# --- chunking: step (5) -----------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One chunk of the sorted items: its own slots, and the slots of its window.

    ``key_slots`` are the slots of chunks ``c - before, ..., c, ..., c + after``
    (modulo the number of chunks), in that order; a chunk appears as many
    times as it occurs in that list (when there are few chunks).
    """

    query_slots: np.ndarray  # (Lc,) int64
    key_slots: np.ndarray  # (Wc,) int64


def chunk_windows(num_items: int, chunk_len: int, num_chunks_before: int, num_chunks_after: int) -> list[Chunk]:
    """Step (5): cut ``num_items`` sorted slots into chunks of ``chunk_len`` and give each its window.

    The chunks run over the concatenated rounds, so a chunk may hold the end
    of one round and the start of the next; the last chunk is shorter when
    ``chunk_len`` does not divide ``num_items``. Windows wrap around: chunk 0's
    previous chunk is the last one.
    """
    num_items, chunk_len = checks.integer(num_items, "num_items", minimum=1), checks.integer(chunk_len, "chunk_len", minimum=1)
    num_chunks_before = checks.integer(num_chunks_before, "num_chunks_before", minimum=0)
    num_chunks_after = checks.integer(num_chunks_after, "num_chunks_after", minimum=0)
    num_chunks = -(-num_items // chunk_len)
    slots = [np.arange(c * chunk_len, min((c + 1) * chunk_len, num_items)) for c in range(num_chunks)]
    offsets = range(-num_chunks_before, num_chunks_after + 1)
    return [Chunk(slots[c], np.concatenate([slots[(c + d) % num_chunks] for d in offsets])) for c in range(num_chunks)]


# --- keys and logits: steps (6)-(8) --------------------------------------------


def _key_norms(qk: np.ndarray, key_norm: str, eps: float) -> np.ndarray:
    """``ρ_n`` of step (6), (B, H, N, 1): ``sqrt(|x|² + D·eps)`` (rms) or ``max(|x|, eps)`` (l2)."""
    squared = np.sum(qk * qk, axis=-1, keepdims=True)
    if key_norm == "rms":
        return np.sqrt(squared + qk.shape[-1] * eps)
    return np.maximum(np.sqrt(squared), eps)


def normalised_keys(qk: np.ndarray, key_norm: str = "rms", key_norm_eps: float = 1e-6, num: Numerics = FLOAT64) -> np.ndarray:
    """Step (6): the keys ``u_n = x_n / ρ_n``, (B, H, N, D).

    ``"rms"``: ``ρ = sqrt(|x|² + D·eps)``: HF's and trax's
    ``x / sqrt(mean(x²) + eps) / sqrt(D)``, a unit vector up to ``eps``.
    ``"l2"``: ``ρ = max(|x|, eps)``, ``torch.nn.functional.normalize``.
    """
    qk = checks.float_array(qk, "qk")
    key_norm = checks.choice(key_norm, "key_norm", KEY_NORMS)
    key_norm_eps = checks.real_number(key_norm_eps, "key_norm_eps", minimum=0.0, inclusive=False)
    return num.store(qk / _key_norms(qk, key_norm, key_norm_eps))


def _gather(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``x[b, h, positions[b, h, s]]``: (B, H, N, E) gathered to (B, H, S, E)."""
    return np.take_along_axis(x, positions[..., None], axis=2)


def pair_logits(scores, pos_q, pos_k, *, causal, valid, self_mask_value, mask_value, mask_mode, mask_padded_queries,
                padding_marks="mask"):  # fmt: skip
    """Step (8): the logits of (query, key) pairs, decided by original positions.

    A pair is *masked* when causality forbids it (``j > i``), when key ``j``
    is padded, or, with ``mask_padded_queries``, when query ``i`` is padded.
    A pair is a *self* pair when ``i == j`` (the same token, whichever rounds
    its two copies come from). With ``padding_marks="negated_positions"``
    (trax) padding is read from trax's marks instead (:func:`_trax_marks`).

    * ``"replace"``: a masked pair's logit is ``mask_value`` (excluded exactly
      when it is None), then a self pair's is ``self_mask_value``, masked or not.
    * ``"add"``: ``z = s + self_mask_value · [self] + mask_value · [masked]``
      (a None ``mask_value`` excludes masked pairs exactly).

    Parameters
    ----------
    scores : ndarray (B, H, Lq, Lk)
        Step (7)'s ``s``.
    pos_q : int ndarray (B, H, Lq)
    pos_k : int ndarray (B, H, Lk)
    valid : bool ndarray (B, N) or None
        True = real token.

    Returns
    -------
    logits : ndarray (B, H, Lq, Lk)
    kept : bool ndarray (B, H, Lq, Lk) or None
        False where a pair is excluded exactly (None: nothing is).
    from_scores : bool ndarray (B, H, Lq, Lk)
        Where the logit depends on the score (its gradient flows).
    """
    mask_mode = checks.choice(mask_mode, "mask_mode", MASK_MODES)
    padding_marks = checks.choice(padding_marks, "padding_marks", PADDING_MARKS)
    causal, mask_padded_queries = checks.flag(causal, "causal"), checks.flag(mask_padded_queries, "mask_padded_queries")
    if not isinstance(scores, np.ndarray) or scores.ndim != 4:
        raise SpecError("scores", "a numpy array of shape (B, H, Lq, Lk)", checks.summary(scores))
    b, h, lq, lk = scores.shape
    checks.integer_array(pos_q, "pos_q", 3, f"(B, H, Lq) = {(b, h, lq)}")
    checks.integer_array(pos_k, "pos_k", 3, f"(B, H, Lk) = {(b, h, lk)}")
    if pos_q.shape != (b, h, lq) or pos_k.shape != (b, h, lk):
        raise SpecError("pos_q, pos_k", f"shapes (B, H, Lq) = {(b, h, lq)} and (B, H, Lk) = {(b, h, lk)}, as scores",
                        f"shapes {pos_q.shape} and {pos_k.shape}")  # fmt: skip
    query, key = pos_q[..., :, None], pos_k[..., None, :]  # (B, H, Lq, 1), (B, H, 1, Lk)
    if valid is not None:
        valid = np.broadcast_to(valid[:, None, :], pos_q.shape[:2] + valid.shape[-1:])  # (B, H, N)
    if padding_marks == "negated_positions" and valid is not None:
        self_pair, allowed = _trax_marks(query, key, np.take_along_axis(valid, pos_k, axis=2)[..., None, :], causal)
    else:
        self_pair = query == key
        allowed = np.ones(np.broadcast_shapes(query.shape, key.shape), dtype=bool)
        if causal:
            allowed &= key <= query
        if valid is not None:
            allowed &= np.take_along_axis(valid, pos_k, axis=2)[..., None, :]
    if valid is not None and mask_padded_queries:
        allowed &= np.take_along_axis(valid, pos_q, axis=2)[..., :, None]
    dtype = scores.dtype  # the constants join the scores in their dtype
    if mask_mode == "replace":
        masked = scores if mask_value is None else np.where(allowed, scores, mask_value)
        logits = np.where(self_pair, self_mask_value, masked).astype(dtype)
        kept = None if mask_value is not None else allowed | self_pair
        return logits, kept, allowed & ~self_pair
    logits = (scores + self_mask_value * self_pair).astype(dtype)
    if mask_value is None:
        return logits, allowed, allowed
    return (logits + np.where(allowed, 0.0, mask_value)).astype(dtype), None, np.ones_like(allowed)


def _trax_marks(query: np.ndarray, key: np.ndarray, key_real: np.ndarray, causal: bool):
    """Self pairs and allowed pairs from trax's marks (``padding_marks="negated_positions"``).

    trax (``LSHSelfAttention.forward_unbatched``, ``attend``,
    ``mask_self_attention``) marks token ``n`` by ``info = n + 1`` when real and
    ``1 - n`` when padded; a pair is a self pair when ``info_i == info_j``, the
    key is padded when ``info_j < 0`` and causally masked when
    ``info_i < info_j``. Queries are never padded here (trax uses the query's
    position). Returns ``self_pair`` and ``allowed``, broadcast to (B, H, Lq, Lk).
    """
    query_info = query + 1  # (B, H, Lq, 1)
    key_info = np.where(key_real, key + 1, 1 - key)  # (B, H, 1, Lk)
    self_pair = query_info == key_info  # (B, H, Lq, Lk)
    allowed = np.broadcast_to(key_info >= 0, self_pair.shape).copy()
    if causal:
        allowed &= key_info <= query_info
    return self_pair, allowed


# --- duplicate correction: step (9) ---------------------------------------------


def window_multiplicity(num_chunks: int, num_chunks_before: int, num_chunks_after: int) -> np.ndarray:
    """Step (9)'s ``m[δ]``, δ in [0, C): how many of the offsets ``d = -before .. after`` are ``≡ δ (mod C)``.

    A window (step (5)) contains chunk ``(c + δ) mod C`` exactly ``m[δ]`` times.
    """
    num_chunks = checks.integer(num_chunks, "num_chunks", minimum=1)
    num_chunks_before = checks.integer(num_chunks_before, "num_chunks_before", minimum=0)
    num_chunks_after = checks.integer(num_chunks_after, "num_chunks_after", minimum=0)
    multiplicity = np.zeros(num_chunks, dtype=np.int64)
    np.add.at(multiplicity, np.arange(-num_chunks_before, num_chunks_after + 1) % num_chunks, 1)
    return multiplicity


def pair_counts(item_chunk: np.ndarray, pos_q: np.ndarray, pos_k: np.ndarray, multiplicity: np.ndarray,
                same_round: bool = False) -> np.ndarray:  # fmt: skip
    """Step (9)'s ``n_ij``: how many times token ``j`` occurs in the windows of all copies of token ``i``.

    ``n_ij = Σ_r Σ_r' m[(c_r'(j) - c_r(i)) mod C]`` with ``c_r(n)`` the chunk of
    token ``n``'s round-``r`` copy: wrapped windows, windows that cross into
    another round and chunks repeated in small windows all count. With
    ``same_round`` only ``r' = r`` is summed: reformer-pytorch's ``n'_ij``
    (``dup_count="reformer_pytorch"``), which misses the windows that reach
    into another round.

    Parameters
    ----------
    item_chunk : int ndarray (B, H, R, N)
        ``c_r(n)``.
    pos_q : int ndarray (B, H, Lq)
    pos_k : int ndarray (B, H, Lk)
    multiplicity : int ndarray (C,)
        :func:`window_multiplicity`.

    Returns
    -------
    ndarray (B, H, Lq, Lk), int64
    """
    _check_pair_count_arguments(item_chunk, pos_q, pos_k, multiplicity)
    chunk_q = np.take_along_axis(item_chunk, pos_q[:, :, None, :], axis=3)  # (B, H, R, Lq)
    chunk_k = np.take_along_axis(item_chunk, pos_k[:, :, None, :], axis=3)  # (B, H, R, Lk)
    if same_round:
        delta = (chunk_k[:, :, :, None, :] - chunk_q[:, :, :, :, None]) % len(multiplicity)  # (B, H, R, Lq, Lk)
        return multiplicity[delta].sum(axis=2)
    delta = (chunk_k[:, :, None, :, None, :] - chunk_q[:, :, :, None, :, None]) % len(multiplicity)  # (B, H, R, R, Lq, Lk)
    return multiplicity[delta].sum(axis=(2, 3))


def _check_pair_count_arguments(item_chunk, pos_q, pos_k, multiplicity) -> None:
    """:func:`pair_counts`' arguments: integer arrays of consistent shapes, indices in range."""
    b, h, _, n = checks.integer_array(item_chunk, "item_chunk", 4, "(B, H, R, N)").shape
    num_chunks = len(checks.integer_array(multiplicity, "multiplicity", 1, "(C,)"))
    if num_chunks == 0 or item_chunk.size and not 0 <= item_chunk.min() <= item_chunk.max() < num_chunks:
        raise SpecError("item_chunk", f"chunk indices in [0, C) = [0, {num_chunks}) (C = len(multiplicity))",
                        f"values {item_chunk.min()} to {item_chunk.max()}" if item_chunk.size else "C = 0")  # fmt: skip
    for name, positions in (("pos_q", pos_q), ("pos_k", pos_k)):
        checks.integer_array(positions, name, 3, f"(B, H, L) with (B, H) = {(b, h)}")
        if positions.shape[:2] != (b, h) or positions.size and not 0 <= positions.min() <= positions.max() < n:
            raise SpecError(name, f"token positions in [0, N) = [0, {n}), shape (B, H, L) with (B, H) = {(b, h)}",
                            checks.summary(positions))  # fmt: skip


def log_pair_counts(counts: np.ndarray, dup_count: str) -> np.ndarray:
    """What step (9) subtracts from a logit, float64: ``log n_ij``, or reformer-pytorch's
    ``log(n'_ij + 1e-9)`` rounded to float32 (``torch.log`` of the float32 ``dup_counts + 1e-9``;
    the nearest float32, which torch's float32 log also gives for every count up to 6)."""
    dup_count = checks.choice(dup_count, "dup_count", DUP_COUNTS)
    if not isinstance(counts, np.ndarray) or counts.dtype.kind not in "iu":
        raise SpecError("counts", "an integer numpy array of pair counts", checks.summary(counts))
    smallest = 1 if dup_count == "occurrences" else 0  # log n_ij needs n_ij >= 1; n'_ij + 1e-9 allows 0
    if counts.size and counts.min() < smallest:
        raise SpecError("counts", f"counts >= {smallest} (dup_count={dup_count!r})", f"a count of {counts.min()}")
    if dup_count == "occurrences":
        return np.log(counts)
    shifted = counts.astype(np.float32) + np.float32(1e-9)  # float32, as torch promotes int64 + 1e-9
    return np.log(shifted.astype(np.float64)).astype(np.float32).astype(np.float64)


# --- the plan: every discrete decision, held fixed by the VJP --------------------


@dataclass(frozen=True)
class Plan:
    """The discrete part of one call: buckets, sort, chunks.

    On the short-sequence path there is one round, no buckets, the identity
    permutation and one chunk whose window is every token once.
    """

    buckets: np.ndarray | None  # (B, H, R, N) int64
    permutation: np.ndarray  # (B, H, R'·N): slot -> item r·N + n
    inverse: np.ndarray  # (B, H, R'·N): item -> slot
    item_chunk: np.ndarray  # (B, H, R', N): c_r(n) of step (9), the chunk of each item
    chunks: list[Chunk]
    multiplicity: np.ndarray  # (C,): m[δ] of step (9)
    num_rounds: int  # R', the rounds combined in step (12): num_hashes, or 1 on the short path


def _plan(x: LSHInputs, qk: np.ndarray, num: Numerics) -> Plan:
    b, h, n = x.qk.shape[:3]
    if x.short:
        # (S) One dense round: every token attends to every token once.
        identity = np.broadcast_to(np.arange(n), (b, h, n))
        every = np.arange(n)
        return Plan(None, identity, identity, np.zeros((b, h, 1, n), np.int64), [Chunk(every, every)], np.ones(1, np.int64), 1)
    # (1)-(3) Buckets.
    buckets = _hash(x, qk, num)  # (B, H, R, N)
    # (4) Stable sort of the R·N items by (bucket, position).
    permutation, inverse = sort_items(buckets)  # (B, H, R·N) each
    # (5) Chunks over the concatenated rounds, with wrapped windows.
    num_items = x.num_hashes * n
    chunks = chunk_windows(num_items, x.chunk_len, x.num_chunks_before, x.num_chunks_after)
    # (9) What the duplicate count needs: the chunk of every item and the window multiplicities.
    multiplicity = window_multiplicity(len(chunks), x.num_chunks_before, x.num_chunks_after)
    item_chunk = (inverse // x.chunk_len).reshape(b, h, x.num_hashes, n)
    return Plan(buckets, permutation, inverse, item_chunk, chunks, multiplicity, x.num_hashes)


# --- steps (7)-(10) for one chunk --------------------------------------------------


def _statistics(num: Numerics) -> Numerics:
    """Where softmax statistics live: the compute dtype (float32 below float64).

    Kernels keep row maxima, sums and log-sum-exps in float32, as
    FlashAttention does; the self-mask constant -1e5 would overflow float16.
    """
    return replace(num, storage=num.compute)


def _attend_chunk(chunk: Chunk, plan: Plan, qk: np.ndarray, keys: np.ndarray, v: np.ndarray, x: LSHInputs, num: Numerics) -> dict:
    """Steps (7)-(10) for the queries of one chunk; returns what the VJP needs."""
    n = qk.shape[2]
    pos_q = plan.permutation[..., chunk.query_slots] % n  # (B, H, Lc)
    pos_k = plan.permutation[..., chunk.key_slots] % n  # (B, H, Wc)
    q, k, vv = _gather(qk, pos_q), _gather(keys, pos_k), _gather(v, pos_k)  # (B, H, Lc, D), (B, H, Wc, D), (B, H, Wc, Dv)
    # (7) Scores of the raw queries against the normalised keys.
    scores = num.store(x.scale * np.einsum("bhqd,bhkd->bhqk", q, k, optimize=True))  # (B, H, Lc, Wc)
    # (8) Masks, self pairs and their constants, by original position.
    logits, kept, from_scores = pair_logits(
        scores, pos_q, pos_k, causal=x.causal, valid=x.valid, self_mask_value=x.self_mask_value,
        mask_value=x.mask_value, mask_mode=x.mask_mode, mask_padded_queries=x.mask_padded_queries,
        padding_marks=x.padding_marks,
    )  # fmt: skip
    # (9) Duplicate correction: each occurrence of key j loses log n_ij (reformer-pytorch: log(n'_ij + 1e-9)).
    if x.dup_correction:
        counts = pair_counts(plan.item_chunk, pos_q, pos_k, plan.multiplicity, same_round=x.dup_count != "occurrences")
        logits = (logits - log_pair_counts(counts, x.dup_count)).astype(num.compute)
    # (10) Softmax over the window, its log-sum-exp, and the weighted values.
    weights, lse = masked_softmax(logits, kept, _statistics(num))  # (B, H, Lc, Wc), (B, H, Lc)
    weights = num.store(weights)
    out = num.store(np.einsum("bhqk,bhke->bhqe", weights, vv, optimize=True))  # (B, H, Lc, Dv)
    return dict(pos_q=pos_q, pos_k=pos_k, q=q, k=k, v=vv, weights=weights, lse=lse, out=out, from_scores=from_scores)


# --- steps (11)-(12) ----------------------------------------------------------------


def unsort(sorted_values: np.ndarray, inverse: np.ndarray, num_rounds: int) -> np.ndarray:
    """Step (11): slot order back to (round, token), (B, H, R·N, ...) -> (B, H, R, N, ...).

    ``inverse`` is :func:`sort_items`' second result: item ``r·N + n`` is at
    slot ``inverse[r·N + n]``.
    """
    b, h, items = checks.integer_array(inverse, "inverse", 3, "(B, H, R·N)").shape
    num_rounds = checks.integer(num_rounds, "num_rounds", minimum=1)
    if items % num_rounds:
        raise SpecError("num_rounds", f"a divisor of inverse's R·N = {items} items", checks.summary(num_rounds))
    if not isinstance(sorted_values, np.ndarray) or sorted_values.ndim < 3 or sorted_values.shape[:3] != inverse.shape:
        raise SpecError("sorted_values", f"a numpy array of shape (B, H, R·N, ...) = {inverse.shape + ('...',)}",
                        checks.summary(sorted_values))  # fmt: skip
    if inverse.size and not 0 <= inverse.min() <= inverse.max() < items:
        raise SpecError("inverse", f"slots in [0, R·N) = [0, {items})", f"values {inverse.min()} to {inverse.max()}")
    index = inverse.reshape(inverse.shape + (1,) * (sorted_values.ndim - 3))
    gathered = np.take_along_axis(sorted_values, index, axis=2)
    return gathered.reshape((b, h, num_rounds, items // num_rounds) + sorted_values.shape[3:])


def combine_rounds(round_out: np.ndarray, round_lse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step (12): ``LSE = log Σ_r exp(lse_r)``, ``out = Σ_r exp(lse_r - LSE) o_r`` (``core.merge``).

    ``round_out`` is (B, H, R, N, Dv) and ``round_lse`` (B, H, R, N); returns
    ``out`` (B, H, N, Dv) and ``lse`` (B, H, N), float64. Rounds with
    ``lse_r = -inf`` weigh 0; a token with no key in any round gets 0 and ``-inf``.
    """
    if not isinstance(round_lse, np.ndarray) or round_lse.ndim != 4:
        raise SpecError("round_lse", "a numpy array of shape (B, H, R, N)", checks.summary(round_lse))
    if not isinstance(round_out, np.ndarray) or round_out.ndim != 5 or round_out.shape[:4] != round_lse.shape:
        raise SpecError("round_out", f"a numpy array of shape (B, H, R, N, Dv) with (B, H, R, N) = {round_lse.shape}",
                        checks.summary(round_out))  # fmt: skip
    return merge([(round_out[:, :, r], round_lse[:, :, r]) for r in range(round_lse.shape[2])])


def _round_weights(round_lse: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """``exp(lse_r - LSE)`` (B, H, R, N); 0 for empty rounds and fully masked tokens."""
    has_key = np.isfinite(lse)
    shift = np.where(has_key, lse, 0.0)[:, :, None, :]  # (B, H, 1, N)
    return np.where(has_key[:, :, None, :], np.exp(round_lse - shift), 0.0)


def _forward_steps(x: LSHInputs, num: Numerics) -> dict:
    """Steps (1)-(12) of spec/lsh.md; returns every intermediate the VJP needs."""
    qk = num.load(x.qk)  # (B, H, N, D)
    v = num.load(x.v)  # (B, H, N, Dv)
    plan = _plan(x, qk, num)
    # (6) Length-normalised keys.
    keys = normalised_keys(qk, x.key_norm, x.key_norm_eps, num)  # (B, H, N, D)
    # (7)-(10) Chunk by chunk.
    chunks = [_attend_chunk(chunk, plan, qk, keys, v, x, num) for chunk in plan.chunks]
    sorted_out = np.concatenate([c["out"] for c in chunks], axis=2)  # (B, H, R'·N, Dv)
    sorted_lse = np.concatenate([c["lse"] for c in chunks], axis=2)  # (B, H, R'·N)
    # (11) Unsort: each round's output and log-sum-exp at each token.
    round_out = unsort(sorted_out, plan.inverse, plan.num_rounds)  # (B, H, R', N, Dv)
    round_lse = unsort(sorted_lse, plan.inverse, plan.num_rounds)  # (B, H, R', N)
    # (12) Combine the rounds by their log-sum-exps.
    out, lse = combine_rounds(round_out, round_lse)
    return dict(
        qk=qk, v=v, plan=plan, keys=keys, chunks=chunks, round_out=round_out, round_lse=round_lse,
        out=num.store(out), lse=lse.astype(num.compute),
    )  # fmt: skip


# --- the mechanism ------------------------------------------------------------------


def lsh_attention(
    qk, v, *,
    rotations, num_buckets, num_hashes, chunk_len, causal=False, key_padding_mask=None,
    num_chunks_before=FROM_PRESET, num_chunks_after=FROM_PRESET, key_norm=FROM_PRESET, key_norm_eps=FROM_PRESET,
    scale=FROM_PRESET, self_mask_value=FROM_PRESET, mask_value=FROM_PRESET, mask_mode=FROM_PRESET,
    mask_padded_queries=FROM_PRESET, padding_marks=FROM_PRESET, padding_bucket=FROM_PRESET,
    dup_correction=FROM_PRESET, dup_count=FROM_PRESET, short_sequence=FROM_PRESET,
    preset=None, return_rounds=False, precision=None, backend="reference") -> Result:
    """Reformer's LSH self-attention with shared queries and keys.

    Parameters
    ----------
    qk : ndarray (B, H, N, D)
        Shared query-key vectors ``x``: queries are ``x``, keys ``x``
        length-normalised (step (6)), and ``x`` is what is hashed.
    v : ndarray (B, H, N, Dv)
    rotations : ndarray (H, R, D, P) or (B, H, R, D, P)
        The random rotations, ``P = Σ_k f_k / 2`` (one set per head and round,
        optionally per batch element). HF draws (H, D, R, P): pass
        ``rotations.transpose(0, 2, 1, 3)``; spec/lsh.md maps trax's and
        lucidrains' layouts.
    num_buckets : int or list of int
        Even bucket count per round, or even factors whose product it is.
    num_hashes : int >= 1
        Hashing rounds ``R``; must match ``rotations``.
    chunk_len : int >= 1
        Items per chunk of the sorted, concatenated rounds.
    causal : bool
        Token ``i`` sees token ``j`` only if ``j <= i`` (original positions).
    key_padding_mask : bool ndarray (B, N) or (1, N), optional
        True = real token. Padded tokens are masked as keys (and as queries
        with ``mask_padded_queries``) and may get a bucket of their own.
    num_chunks_before, num_chunks_after, key_norm, key_norm_eps, scale,
    self_mask_value, mask_value, mask_mode, mask_padded_queries,
    padding_marks, padding_bucket, dup_correction, dup_count, short_sequence
        The behaviours on which implementations differ
        (:class:`refattn.lsh.presets.Preset` describes each). Each defaults to
        the preset's value; canonical values: 1, 0, "rms", 1e-6, 1.0 (the
        keys are unit length; ``scale=None`` means 1/sqrt(D), lucidrains'),
        -1e5, None (masked keys excluded exactly), "replace", False, "mask",
        "if_mask", False, "occurrences", "lsh".
    preset : {None, "hf", "trax", "lucidrains"}
        Whose values the unspecified behaviours take; presets also reject
        lengths their implementation does not accept.
    return_rounds : bool
        Also return the rounds' outputs and log-sum-exps in ``aux``.

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv) and ``lse`` (B, H, N), float64: ``lse`` is
        step (12)'s ``log Σ_r exp(lse_r)``. ``aux``: ``buckets`` (B, H, R, N)
        int64 with round offsets and ``permutation`` (B, H, R·N) int64 (the
        item ``r·N + n`` in each sorted slot); with ``return_rounds``, also
        ``round_out`` (B, H, R, N, Dv) and ``round_lse`` (B, H, R, N). The
        short-sequence path has no buckets: ``aux`` holds only the rounds.
    """
    return registry.call_forward("lsh", locals())


def forward(x: LSHInputs, num: Numerics) -> Result:
    """The reference backend: steps (1)-(12) in precision ``num``."""
    f = _forward_steps(x, num)
    plan = f["plan"]
    aux = {} if plan.buckets is None else {"buckets": plan.buckets, "permutation": plan.permutation}
    if x.return_rounds:
        aux.update(round_out=f["round_out"], round_lse=f["round_lse"])
    return Result(out=f["out"], lse=f["lse"], aux=aux)


lsh_attention_vjp = registry.vjp_function(
    lsh_attention, "lsh", grads="""    ``qk`` (B, H, N, D): the query path plus the key path through the
    normalisation of step (6); ``v`` (B, H, N, Dv). Buckets are held fixed:
    hashing, sorting, masks and counts are piecewise constant, no gradient
    flows through them, and ``rotations`` gets none.""",
)


def vjp(x: LSHInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (12')-(1') in precision ``num``, buckets held fixed."""
    f = _forward_steps(x, num)
    plan = f["plan"]
    b, h, n, dv = x.v.shape
    dout, dlse = num.load(cotangents.dout), cotangents.dlse  # (B, H, N, Dv), (B, H, N) or None

    # (12') out = Σ_r w_r o_r with w_r = exp(lse_r - LSE), LSE = log Σ_r exp(lse_r):
    #       do_r = w_r dout, dlse_r = w_r (dout · (o_r - out) + dLSE).
    weights = _round_weights(f["round_lse"], f["lse"])  # (B, H, R', N)
    d_round_out = num.store(weights[..., None] * dout[:, :, None])  # (B, H, R', N, Dv)
    spread = np.sum(dout[:, :, None] * (f["round_out"] - f["out"][:, :, None]), axis=-1)  # (B, H, R', N)
    if dlse is not None:
        spread = spread + num.load(dlse)[:, :, None]
    d_round_lse = num.store(weights * spread)  # (B, H, R', N)
    # (11') Back to slot order: slot s holds item permutation[s].
    d_sorted_out = np.take_along_axis(d_round_out.reshape(b, h, -1, dv), plan.permutation[..., None], axis=2)
    d_sorted_lse = np.take_along_axis(d_round_lse.reshape(b, h, -1), plan.permutation, axis=2)

    d_query = np.zeros(f["qk"].shape, dtype=num.compute)  # (B, H, N, D)
    d_keys = np.zeros(f["qk"].shape, dtype=num.compute)  # (B, H, N, D)
    d_v = np.zeros(f["v"].shape, dtype=num.compute)  # (B, H, N, Dv)
    for chunk, c in zip(plan.chunks, f["chunks"]):
        d_o = d_sorted_out[..., chunk.query_slots, :]  # (B, H, Lc, Dv)
        d_l = d_sorted_lse[..., chunk.query_slots]  # (B, H, Lc)
        p = c["weights"]  # (B, H, Lc, Wc)
        # (10') o = P v and lse: dv gathers P^T do; dz = P (dP - Σ_k P dP + dlse).
        _scatter_add(d_v, c["pos_k"], num.store(np.einsum("bhqk,bhqe->bhke", p, d_o, optimize=True)))
        d_p = num.store(np.einsum("bhqe,bhke->bhqk", d_o, c["v"], optimize=True))
        row_dot = num.store(np.sum(p * d_p, axis=-1, keepdims=True))  # (B, H, Lc, 1)
        d_logits = num.store(p * (d_p - row_dot + d_l[..., None]))
        # (9')-(8') Counts and constants are fixed: only entries whose logit is the score pass it on.
        d_scores = np.where(c["from_scores"], d_logits, 0.0)
        # (7') s = scale q · u: to the query positions and to the key positions.
        _scatter_add(d_query, c["pos_q"], num.store(x.scale * np.einsum("bhqk,bhkd->bhqd", d_scores, c["k"], optimize=True)))
        _scatter_add(d_keys, c["pos_k"], num.store(x.scale * np.einsum("bhqk,bhqd->bhkd", d_scores, c["q"], optimize=True)))
    # (6') u = x / ρ: dx = (du - u (u · du)) / ρ (l2 below eps: du / eps).
    d_from_keys = num.store(_normalisation_vjp(num.store(d_keys), f["qk"], f["keys"], x.key_norm, x.key_norm_eps))
    # (5')-(1') Sorting and hashing are piecewise constant: nothing more.
    return Grads(qk=(num.store(d_query) + d_from_keys).astype(np.float64), v=num.store(d_v).astype(np.float64))


def _normalisation_vjp(d_keys: np.ndarray, qk: np.ndarray, keys: np.ndarray, key_norm: str, eps: float) -> np.ndarray:
    """Adjoint of step (6) at ``x = qk`` with ``u = keys``, (B, H, N, D)."""
    rho = _key_norms(qk, key_norm, eps)  # (B, H, N, 1)
    projected = (d_keys - keys * np.sum(keys * d_keys, axis=-1, keepdims=True)) / rho
    if key_norm == "rms":
        return projected
    return np.where(np.sqrt(np.sum(qk * qk, axis=-1, keepdims=True)) > eps, projected, d_keys / eps)


def _scatter_add(target: np.ndarray, positions: np.ndarray, values: np.ndarray) -> None:
    """``target[b, h, positions[b, h, s]] += values[b, h, s]`` (repeated positions add up)."""
    b, h = np.indices(positions.shape[:2])
    np.add.at(target, (b[..., None], h[..., None], positions), values)
