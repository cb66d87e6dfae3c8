"""Segmented attention with an explicit inter-segment step: the executable specification.

The sequence is split into non-overlapping segments of ``segment_len`` tokens;
every token attends densely inside its segment (step 2). An optional
inter-segment step then integrates information across segments through
segment summaries formed by an explicit pooling matrix ``R`` (segments x N):
either (a) a second attention of every token over the summaries (``RK``,
``RV``), combined with the local output by a sum, a given gate, or one
softmax over local keys plus summaries (lse-merge), or (b) concatenation of
the local output with its segment's summary followed by a given linear map.
Summarising segments with a pooling matrix is the algebra of Nyström
landmarks (Xiong et al. 2021) and of the segment-level recurrence of
segment-wise models; the variants are those of the seed's segmented section
(spec/segmented.md, "Segmented attention").

Every attention here is :func:`refattn.dense.dense_attention` with an explicit
boolean mask over explicit keys: the reference shows the pattern, never a
second softmax.

Einsum letters: b batch, h head, n token, s segment (or summary key),
e value dim, f output dim of the concatenation's linear map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads, sum_kv_heads, sum_to_shape
from ...dense import dense_attention, dense_attention_vjp
from ..pattern import self_attention_qkv

LAST_SEGMENTS = ("short", "pad")
POOLINGS = ("mean", "first")
INTEGRATIONS = ("none", "sum", "gate", "lse_merge", "concat")
CURRENT_SUMMARIES = ("exclude", "prefix")


def segmented_attention(
    q, k, v, *,
    segment_len, last_segment="short", pooling="mean", integration="none", current_summary="exclude", gate=None,
    projection=None,
    causal=False,
    scale=None, precision=None, backend="reference") -> Result:
    """Attention inside segments of ``segment_len`` tokens, then an optional inter-segment step.

    Parameters
    ----------
    q : ndarray (B, Hq, N, D)
    k : ndarray (B, Hkv, N, D)
        Self-attention: the same N as ``q``. ``Hq % Hkv == 0`` (GQA rule).
    v : ndarray (B, Hkv, N, Dv)
    segment_len : int >= 1
        ``L``: token ``i`` is in segment ``i // L``; ``S = ceil(N / L)`` segments.
    causal : bool
        Local attention keeps keys ``j <= i``; summaries are restricted as
        ``current_summary`` says, so that no token sees a summary of its future.
    last_segment : {"short", "pad"}
        ``"short"``: the last segment has ``N - (S-1) L`` tokens and ``L <= N``
        is required. ``"pad"``: the sequence is taken as padded with zero tokens
        to ``S L``; padded keys are never attended, but a mean summary divides
        by ``L`` (padding counted, as a library that pads before pooling does).
    pooling : {"mean", "first"} or ndarray (S, N)
        The pooling matrix ``R``: mean of each segment, its first token, or any
        given weights (max pooling is a given one-hot selection). A given ``R``
        is not differentiated; with ``causal`` it may weight no token after its
        segment, and ``current_summary`` must be ``"exclude"``.
    integration : {"none", "sum", "gate", "lse_merge", "concat"}
        (a) ``"sum"``: ``local + over_summaries``; ``"gate"``:
        ``g * local + (1 - g) * over_summaries``; ``"lse_merge"``: one softmax
        over the local keys and the visible summary keys. (b) ``"concat"``:
        ``[local, own segment's summary value] @ projection``.
    current_summary : {"exclude", "prefix"}
        With ``causal``: token ``i`` sees the summaries of earlier segments and,
        of its own segment, nothing (``"exclude"``) or the summary of the
        segment's tokens ``<= i`` (``"prefix"``: their mean, or the first
        token). ``"concat"`` with ``causal`` needs ``"prefix"``. Without
        ``causal`` every token sees every summary.
    gate : float ndarray broadcastable to (B, Hq, N, Dv)
        The gate ``g`` (already through its nonlinearity); required by ``"gate"`` only.
    projection : float ndarray (2 Dv, F)
        The linear map of ``"concat"``; required by it only.
    scale : float > 0, optional
        Logit scale of every attention; default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv), or (B, Hq, N, F) for ``"concat"``; ``lse``
        (B, Hq, N): of the one softmax for ``"lse_merge"``, of the local
        attention otherwise. ``aux`` is empty.
    """
    return registry.call_forward("segmented", locals())


segmented_attention_vjp = registry.vjp_function(
    segmented_attention, "segmented", grads="""    ``q``, ``k``, ``v`` (shapes of the inputs), ``gate`` (its own shape,
    broadcast axes summed) for ``"gate"`` and ``projection`` for ``"concat"``.
    A given pooling matrix is not differentiated.""",
)


# --------------------------------------------------------------------------
# Checked inputs.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentedInputs:
    """Checked arguments of :func:`segmented_attention`."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    shape: checks.AttentionShape
    segment_len: int
    num_segments: int
    causal: bool
    last_segment: str
    pooling: str | np.ndarray
    integration: str
    current_summary: str
    gate: np.ndarray | None
    projection: np.ndarray | None
    scale: float

    @property
    def uses_prefix(self) -> bool:
        """Whether token i sees the prefix summary of its own segment (causal, ``"prefix"``)."""
        return self.causal and self.current_summary == "prefix" and self.integration != "none"

    @property
    def out_dim(self) -> int:
        return self.projection.shape[1] if self.integration == "concat" else self.shape.value_dim

    def cotangent_shapes(self) -> dict:
        s = self.shape
        return {"dout": (s.batch, s.q_heads, s.q_len, self.out_dim), "dlse": (s.batch, s.q_heads, s.q_len)}


def check_segmented_inputs(
    q, k, v, *, segment_len, causal, last_segment, pooling, integration, current_summary, gate, projection, scale
) -> SegmentedInputs:
    """Check every argument of ``segmented_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = self_attention_qkv(q, k, v)
    n = shape.q_len
    last_segment = checks.choice(last_segment, "last_segment", LAST_SEGMENTS)
    if isinstance(segment_len, bool) or not isinstance(segment_len, (int, np.integer)) or segment_len < 1:
        raise SpecError("segment_len", "an int >= 1", checks.summary(segment_len))
    if segment_len > n and last_segment == "short":
        raise SpecError("segment_len", f"at most N = {n} (or last_segment='pad')", checks.summary(segment_len))
    segment_len = int(segment_len)
    num_segments = -(-n // segment_len)
    causal = checks.flag(causal, "causal")
    integration = checks.choice(integration, "integration", INTEGRATIONS)
    current_summary = checks.choice(current_summary, "current_summary", CURRENT_SUMMARIES)
    if isinstance(pooling, np.ndarray):
        pooling = _check_pooling_matrix(pooling, num_segments, n, segment_len, causal)
        if causal and current_summary == "prefix":
            raise SpecError("current_summary", "'exclude' with a given pooling matrix (prefix pooling is defined "
                            "for 'mean' and 'first')", checks.summary(current_summary))  # fmt: skip
    else:
        pooling = checks.choice(pooling, "pooling", POOLINGS)
    if integration == "concat" and causal and current_summary != "prefix":
        raise SpecError("current_summary", "'prefix' for a causal 'concat' (its own segment's summary)",
                        checks.summary(current_summary))  # fmt: skip
    out_shape = (shape.batch, shape.q_heads, n, shape.value_dim)
    if integration == "gate":
        if gate is None:
            raise SpecError("gate", f"a float array broadcastable to {out_shape} for integration='gate'", "None")
        gate = checks.broadcastable(gate, "gate", out_shape, "float")
    elif gate is not None:
        raise SpecError("gate", "None unless integration='gate'", "an array")
    if integration == "concat":
        projection = checks.float_array(projection, "projection") if projection is not None else None
        if projection is None or projection.ndim != 2 or projection.shape[0] != 2 * shape.value_dim:
            given = "None" if projection is None else f"shape {projection.shape}"
            raise SpecError("projection", f"a float array (2 Dv, F) = ({2 * shape.value_dim}, F)", given)
    elif projection is not None:
        raise SpecError("projection", "None unless integration='concat'", "an array")
    scale = checks.scale(scale, shape.head_dim)
    checks.scores_within_range(q, k, scale)  # summaries are convex combinations of keys: no larger
    return SegmentedInputs(q, k, v, shape, segment_len, num_segments, causal, last_segment, pooling, integration,
                           current_summary, gate, projection, scale)  # fmt: skip


def _check_pooling_matrix(pooling, num_segments: int, n: int, segment_len: int, causal: bool) -> np.ndarray:
    pooling = checks.float_array(pooling, "pooling")
    if pooling.shape != (num_segments, n):
        raise SpecError("pooling", f"a matrix (S, N) = ({num_segments}, {n}), or 'mean' or 'first'",
                        f"shape {pooling.shape}")  # fmt: skip
    if causal:
        after_segment = np.arange(n)[None, :] >= (np.arange(num_segments)[:, None] + 1) * segment_len
        if np.any((pooling != 0) & after_segment):
            raise SpecError("pooling", "no weight on tokens after the summary's segment (causal)", "such weights")
    return pooling


# --------------------------------------------------------------------------
# The pattern: segments, pooling matrices, masks (steps 1-4 of spec/segmented.md).
# --------------------------------------------------------------------------


def segment_of(x: SegmentedInputs) -> np.ndarray:
    """(1) The segment of every token, ``i // L``: (N,) int."""
    return np.arange(x.shape.q_len) // x.segment_len


def pooling_matrix(x: SegmentedInputs) -> np.ndarray:
    """(3) ``R`` (S, N): row s pools segment s (mean or first token), or the given matrix."""
    if isinstance(x.pooling, np.ndarray):
        return x.pooling.astype(np.float64)
    n, segment = x.shape.q_len, segment_of(x)
    members = segment[None, :] == np.arange(x.num_segments)[:, None]  # (S, N)
    if x.pooling == "first":
        return (members & (np.arange(n)[None, :] % x.segment_len == 0)).astype(np.float64)
    counts = members.sum(axis=1, keepdims=True) if x.last_segment == "short" else x.segment_len
    return members / counts


def prefix_pooling_matrix(x: SegmentedInputs) -> np.ndarray:
    """(3) ``P`` (N, N): row i pools its own segment's tokens ``<= i`` (their mean, or the first token)."""
    n, segment = x.shape.q_len, segment_of(x)
    position = np.arange(n)
    members = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])  # (N, N)
    if x.pooling == "first":
        return (members & (position[None, :] % x.segment_len == 0)).astype(np.float64)
    return members / members.sum(axis=1, keepdims=True)


def local_mask(x: SegmentedInputs) -> np.ndarray:
    """(2) (N, N): key j is in query i's segment (and ``j <= i`` when causal)."""
    segment = segment_of(x)
    allowed = segment[:, None] == segment[None, :]
    if x.causal:
        allowed &= np.tril(np.ones_like(allowed))
    return allowed


def summary_mask(x: SegmentedInputs) -> np.ndarray:
    """(4) (N, S [+ N]): which summary keys query i sees.

    Not causal: every segment summary. Causal: those of earlier segments,
    then (``"prefix"``) one prefix-summary key per query, its own.
    """
    n, segment = x.shape.q_len, segment_of(x)
    summaries = np.arange(x.num_segments)[None, :]  # (1, S)
    seen = np.ones((n, x.num_segments), dtype=bool) if not x.causal else summaries < segment[:, None]
    if x.uses_prefix:
        seen = np.concatenate([seen, np.eye(n, dtype=bool)], axis=1)  # (N, S + N)
    return seen


def summary_pooling(x: SegmentedInputs) -> np.ndarray:
    """(3) The pooling of every summary key: ``R`` (S, N), stacked over ``P`` (N, N) with prefixes."""
    pooled = pooling_matrix(x)
    return np.concatenate([pooled, prefix_pooling_matrix(x)]) if x.uses_prefix else pooled


# --------------------------------------------------------------------------
# The reference backend.
# --------------------------------------------------------------------------


def forward(x: SegmentedInputs, num: Numerics) -> Result:
    """Steps (1)-(5) in precision ``num``."""
    return _forward_steps(x, num)["result"]


def _forward_steps(x: SegmentedInputs, num: Numerics) -> dict:
    q, k, v = num.load(x.q), num.load(x.k), num.load(x.v)
    attend = dict(scale=x.scale, precision=num)
    # (2) Dense attention inside each segment.
    local = dense_attention(q, k, v, mask=local_mask(x), **attend)  # out (B, Hq, N, Dv)
    steps = dict(q=q, k=k, v=v, local=local)
    if x.integration == "none":
        steps["result"] = local
        return steps
    # (3) Summaries: pooled keys and values, (B, Hkv, S [+ N], D).
    pooled = summary_pooling(x)
    summary_k = num.store(np.einsum("sn,bhnd->bhsd", pooled, k))
    summary_v = num.store(np.einsum("sn,bhne->bhse", pooled, v))
    steps.update(pooled=pooled, summary_k=summary_k, summary_v=summary_v)
    if x.integration == "lse_merge":
        # (5a) One softmax over the segment's keys and the visible summary keys.
        merged = dense_attention(q, np.concatenate([k, summary_k], axis=2), np.concatenate([v, summary_v], axis=2),
                                 mask=_merged_mask(x), **attend)  # fmt: skip
        steps["result"] = merged
        return steps
    if x.integration == "concat":
        # (5b) [local, own segment's summary value] @ projection.
        own = num.store(_own_summary(x, summary_v))  # (B, Hq, N, Dv)
        joined = np.concatenate([local.out, own], axis=-1)  # (B, Hq, N, 2 Dv)
        out = num.store(np.einsum("bhnc,cf->bhnf", joined, num.load(x.projection)))
        steps.update(own=own, joined=joined, result=Result(out=out, lse=local.lse))
        return steps
    # (4) A second attention of every token over the summaries it may see.
    over_summaries = dense_attention(q, summary_k, summary_v, mask=summary_mask(x), **attend)
    steps["over_summaries"] = over_summaries
    if x.integration == "sum":
        out = num.store(local.out + over_summaries.out)
    else:  # (5a) gate
        g = num.load(x.gate)
        out = num.store(g * local.out + (1.0 - g) * over_summaries.out)
    steps["result"] = Result(out=out, lse=local.lse)
    return steps


def _merged_mask(x: SegmentedInputs) -> np.ndarray:
    """(N, N + S [+ N]): the local mask beside the summary mask."""
    return np.concatenate([local_mask(x), summary_mask(x)], axis=1)


def _own_summary(x: SegmentedInputs, summary_v: np.ndarray) -> np.ndarray:
    """Token i's own segment summary value, per query head: (B, Hq, N, Dv).

    Not causal: row ``seg(i)`` of ``R v``; causal: its prefix summary (row ``S + i``).
    """
    rows = x.num_segments + np.arange(x.shape.q_len) if x.uses_prefix else segment_of(x)
    return repeat_kv_heads(summary_v[:, :, rows], x.shape.group)


def vjp(x: SegmentedInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """Steps (5')-(1'): the chain rule through dense attention and the pooling matrices."""
    f = _forward_steps(x, num)
    q, k, v = f["q"], f["k"], f["v"]
    dout, dlse = num.load(cotangents.dout), cotangents.dlse
    attend = dict(scale=x.scale, precision=num)
    grads = Grads()
    if x.integration == "none":
        return dense_attention_vjp(dout, q, k, v, dlse=dlse, mask=local_mask(x), **attend)
    d_summary_k = d_summary_v = 0.0
    if x.integration == "lse_merge":
        n = x.shape.q_len
        merged = dense_attention_vjp(dout, q, np.concatenate([k, f["summary_k"]], axis=2),
                                     np.concatenate([v, f["summary_v"]], axis=2), dlse=dlse, mask=_merged_mask(x),
                                     **attend)  # fmt: skip
        dq, dk, dv = merged["q"], merged["k"][:, :, :n], merged["v"][:, :, :n]
        d_summary_k, d_summary_v = merged["k"][:, :, n:], merged["v"][:, :, n:]
    elif x.integration == "concat":
        projection = num.load(x.projection)
        dv_dim = x.shape.value_dim
        # (5b') out = [local, own] W.
        grads["projection"] = np.einsum("bhnc,bhnf->cf", f["joined"], dout)
        d_joined = num.store(np.einsum("bhnf,cf->bhnc", dout, projection))
        local = dense_attention_vjp(d_joined[..., :dv_dim], q, k, v, dlse=dlse, mask=local_mask(x), **attend)
        dq, dk, dv = local["q"], local["k"], local["v"]
        d_own = sum_kv_heads(d_joined[..., dv_dim:].astype(np.float64), x.shape.group)  # (B, Hkv, N, Dv)
        rows = x.num_segments + np.arange(x.shape.q_len) if x.uses_prefix else segment_of(x)
        d_summary_v = np.zeros(f["summary_v"].shape)
        np.add.at(d_summary_v, (slice(None), slice(None), rows), d_own)
    else:
        d_local, d_over = dout, dout
        if x.integration == "gate":
            g = num.load(x.gate)
            d_local, d_over = num.store(g * dout), num.store((1.0 - g) * dout)
            grads["gate"] = sum_to_shape(dout * (f["local"].out - f["over_summaries"].out), x.gate.shape)
        local = dense_attention_vjp(d_local, q, k, v, dlse=dlse, mask=local_mask(x), **attend)
        over = dense_attention_vjp(d_over, q, f["summary_k"], f["summary_v"], mask=summary_mask(x), **attend)
        dq, dk, dv = local["q"] + over["q"], local["k"], local["v"]
        d_summary_k, d_summary_v = over["k"], over["v"]
    # (3') Summaries are R k and R v: their gradients flow back through Rᵀ.
    pooled = f["pooled"]
    grads["q"] = dq
    grads["k"] = dk + np.einsum("sn,bhsd->bhnd", pooled, d_summary_k) if np.ndim(d_summary_k) else dk
    grads["v"] = dv + np.einsum("sn,bhse->bhne", pooled, d_summary_v)
    return Grads({name: grads[name] for name in ("q", "k", "v", "gate", "projection") if name in grads})
