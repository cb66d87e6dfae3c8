"""The Compressive Transformer: the executable specification.

Rae, Potapenko, Jayakumar, Hillier and Lillicrap 2020, "Compressive
Transformers for Long-Range Sequence Modelling", Sec. 3 and Algorithm 1. As
Transformer-XL, each segment attends causally over a memory of the last
``mem_len`` tokens' keys and values, and over a *compressed memory* before it:
the keys are ``[compressed memory, memory, segment]``. The entries the memory
evicts (the oldest, ``n`` of them per step) are compressed by a rate ``c`` into
``n / c`` entries by ``f_c`` and appended to the compressed memory, which
keeps its last ``compressed_len``. ``f_c`` (Sec. 3.1):

* ``"max_pool"``, ``"mean_pool"``: over each run of ``c`` entries;
* ``"conv"``: a 1-D convolution with kernel = stride = ``c`` (weights are
  inputs, in ``torch.nn.Conv1d``'s (out, in, kernel) layout, no bias);
* ``"dilated_conv"``: the same with dilation ``δ`` (dividing ``c``): taps
  ``0, δ, 2δ, ...`` of each run, kernel ``c / δ``;
* ``"most_used"``: the ``n / c`` evicted entries with the largest usage (the
  attention they received, summed over queries and the heads reading them,
  accumulated while in memory), kept in stream order; ties go to the older.

Keys and values are compressed separately, with their own weights. The
attention-reconstruction loss (eq. (2)) that trains ``f_c`` is
:func:`attention_reconstruction_loss`, with its own VJP.

Steps (C1)-(C5) match spec/memory.md. Array letters: b batch, h head, n token,
t compressed entry, a tap, f feature (head or value dim), g output feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import FLOAT64, Numerics
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads
from .. import streaming

COMPRESSIONS = ("max_pool", "mean_pool", "conv", "dilated_conv", "most_used")
CONVOLUTIONS = ("conv", "dilated_conv")
REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class Compression:
    """Checked ``f_c``: the rule, rate ``c``, dilation and, for convolutions, the weights (out, in, c / δ)."""

    rule: str
    rate: int
    dilation: int
    weight_k: np.ndarray | None
    weight_v: np.ndarray | None


@dataclass(frozen=True)
class CompressiveInputs(streaming.StreamInputs):
    """Checked q (B, Hq, N, D), k, v, the initial memories and the options."""

    segment_len: int
    mem_len: int
    compressed_len: int
    compression: Compression
    memory_k: np.ndarray  # (B, Hkv, m, D)
    memory_v: np.ndarray  # (B, Hkv, m, Dv)
    compressed_k: np.ndarray  # (B, Hkv, p, D)
    compressed_v: np.ndarray  # (B, Hkv, p, Dv)
    memory_usage: np.ndarray | None  # (B, Hkv, m), most_used only
    scale: float


def check_compression(compression, rate, conv_weight_k, conv_weight_v, dilation, head_dim: int, value_dim: int) -> Compression:
    """Check ``f_c`` and its weights for keys of ``head_dim`` and values of ``value_dim`` features."""
    rule = checks.choice(compression, "compression", COMPRESSIONS)
    rate = streaming.integer(rate, "rate", 1)
    dilation = streaming.integer(dilation, "dilation", 1)
    if rate % dilation:
        raise SpecError("dilation", f"a divisor of the rate {rate} (taps 0, δ, 2δ, ... of each run)", repr(dilation))
    if dilation > 1 and rule != "dilated_conv":
        raise SpecError("dilation", "1 unless compression is 'dilated_conv'", repr(dilation))
    weights = {"conv_weight_k": None, "conv_weight_v": None}
    for name, x, features in (("conv_weight_k", conv_weight_k, head_dim), ("conv_weight_v", conv_weight_v, value_dim)):
        if rule not in CONVOLUTIONS:
            if x is not None:
                raise SpecError(name, f"None (compression {rule!r} has no weights)", checks.summary(x))
            continue
        expected = (features, features, rate // dilation)
        if not isinstance(x, np.ndarray) or x.shape != expected:
            raise SpecError(name, f"shape (out, in, rate / dilation) = {expected}", checks.summary(x))
        weights[name] = checks.float_array(x, name)
    return Compression(rule, rate, dilation, weights["conv_weight_k"], weights["conv_weight_v"])


def _evicted_counts(memory_len: int, seq_len: int, segment_len: int, mem_len: int) -> list[int]:
    """How many entries the memory evicts at each step."""
    counts = []
    for segment in streaming.segments(seq_len, segment_len):
        total = memory_len + segment.stop - segment.start
        counts.append(max(0, total - mem_len))
        memory_len = min(total, mem_len)
    return counts


def check_compressive_inputs(q, k, v, *, segment_len, mem_len, compressed_len, rate, compression, memory_k, memory_v,
                             compressed_k, compressed_v, memory_usage, conv_weight_k, conv_weight_v, dilation,
                             scale) -> CompressiveInputs:  # fmt: skip
    """Check every argument of ``compressive_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, s = streaming.self_attention_shape(q, k, v)
    segment_len = streaming.segment_length(segment_len, s.q_len, equal=False)
    mem_len = streaming.integer(mem_len, "mem_len", 0)
    compressed_len = streaming.integer(compressed_len, "compressed_len", 0)
    f_c = check_compression(compression, rate, conv_weight_k, conv_weight_v, dilation, s.head_dim, s.value_dim)
    memory_k, memory_v = streaming.memory_pair(memory_k, memory_v, ("memory_k", "memory_v"), s, mem_len)
    compressed_k, compressed_v = streaming.memory_pair(compressed_k, compressed_v, ("compressed_k", "compressed_v"),
                                                       s, compressed_len)  # fmt: skip
    counts = _evicted_counts(memory_k.shape[2], s.q_len, segment_len, mem_len)
    if any(count % f_c.rate for count in counts):
        raise SpecError("rate", f"a rate dividing every evicted block (this stream evicts {counts} per step)",
                        repr(f_c.rate))  # fmt: skip
    if f_c.rule == "most_used":
        leading = (s.batch, s.kv_heads)
        if memory_usage is None:
            if memory_k.shape[2]:
                raise SpecError("memory_usage", "the usage of every memory entry (B, Hkv, m)", "None")
            memory_usage = np.zeros(leading + (0,))
        elif not isinstance(memory_usage, np.ndarray) or memory_usage.shape != leading + (memory_k.shape[2],):
            raise SpecError("memory_usage", f"shape {leading + (memory_k.shape[2],)} (B, Hkv, m)",
                            checks.summary(memory_usage))  # fmt: skip
        memory_usage = checks.float_array(memory_usage, "memory_usage")
    elif memory_usage is not None:
        raise SpecError("memory_usage", "None unless compression is 'most_used'", checks.summary(memory_usage))
    return CompressiveInputs(q, k, v, s, segment_len, mem_len, compressed_len, f_c, memory_k, memory_v, compressed_k,
                             compressed_v, memory_usage, checks.scale(scale, s.head_dim))  # fmt: skip


def compressive_attention(
    q, k, v, *,
    segment_len, mem_len, compressed_len, rate, compression="mean_pool", memory_k=None, memory_v=None,
    compressed_k=None, compressed_v=None, memory_usage=None, conv_weight_k=None, conv_weight_v=None, dilation=1,
    scale=None, precision=None, backend="reference") -> Result:
    """Stream ``q, k, v`` through the Compressive Transformer's memory and compressed memory.

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, Dv)
    segment_len : int >= 1
        Tokens per step; the last segment may be shorter.
    mem_len : int >= 0
        Entries of the (uncompressed) memory.
    compressed_len : int >= 0
        Entries of the compressed memory.
    rate : int >= 1
        ``c``; it must divide every block the memory evicts.
    compression : {"max_pool", "mean_pool", "conv", "dilated_conv", "most_used"}
        ``f_c`` (module docstring).
    memory_k, memory_v, compressed_k, compressed_v : ndarray, optional
        The initial memories (B, Hkv, m <= mem_len, D or Dv) and (B, Hkv,
        p <= compressed_len, D or Dv), a previous call's ``aux``; None: empty.
    memory_usage : ndarray (B, Hkv, m), optional
        ``"most_used"`` only: the usage of each initial memory entry.
    conv_weight_k, conv_weight_v : ndarray (D, D, c / δ), (Dv, Dv, c / δ), optional
        The convolutions' weights; required by, and only by, the convolutions.
    dilation : int >= 1
        ``δ`` of ``"dilated_conv"``, dividing ``c``.
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv), ``lse`` (B, Hq, N); ``aux`` the final state
        ``memory_k``, ``memory_v``, ``compressed_k``, ``compressed_v`` (and
        ``memory_usage`` with ``"most_used"``).
    """
    return registry.call_forward("compressive", locals())


compressive_attention_vjp = registry.vjp_function(
    compressive_attention, "compressive", grads="""    ``q``, ``k``, ``v`` (the stream's shapes): each step's gradient with
    both memories held fixed (stop-gradient), summed over the steps. The
    convolution weights get none here (they act only on later steps' state);
    they are trained by :func:`attention_reconstruction_loss`.""",
)


def compressive_step(state, q, k, v, *, mem_len, compressed_len, rate, compression="mean_pool", conv_weight_k=None,
                     conv_weight_v=None, dilation=1, scale=None, precision=None, backend="reference"):  # fmt: skip
    """One step: ``state, out = compressive_step(state, q, k, v, ...)``; ``state`` is a previous ``aux`` or None."""
    memories = state or {}
    result = compressive_attention(
        q, k, v, segment_len=streaming.step_length(q), mem_len=mem_len,
        compressed_len=compressed_len, rate=rate, compression=compression, **memories, conv_weight_k=conv_weight_k,
        conv_weight_v=conv_weight_v, dilation=dilation, scale=scale, precision=precision, backend=backend,
    )  # fmt: skip
    return streaming.as_step(result)


# --------------------------------------------------------------------------
# f_c.
# --------------------------------------------------------------------------


def compress(x: np.ndarray, f_c: Compression, weight: np.ndarray | None, usage: np.ndarray | None) -> np.ndarray:
    """(C4) ``f_c`` of ``x`` (B, H, n, F), ``n`` a multiple of ``c``: (B, H, n / c, F)."""
    b, h, n, features = x.shape
    c = f_c.rate
    runs = x.reshape(b, h, n // c, c, features)  # (B, H, n / c, c, F)
    if f_c.rule == "max_pool":
        return runs.max(axis=3)
    if f_c.rule == "mean_pool":
        return runs.mean(axis=3)
    if f_c.rule in CONVOLUTIONS:
        taps = runs[:, :, :, :: f_c.dilation]  # (B, H, n / c, c / δ, F)
        return np.einsum("bhtaf,gfa->bhtg", streaming.einsum_operand(taps), streaming.einsum_operand(weight),
                         optimize=True)  # fmt: skip
    return np.take_along_axis(x, most_used(usage, n // c)[..., None], axis=2)  # "most_used"


def most_used(usage: np.ndarray, count: int) -> np.ndarray:
    """The indices (B, H, count) of the ``count`` largest usages along the last axis, in increasing order;
    equal usages go to the lower index."""
    order = np.argsort(-usage, axis=-1, kind="stable")[..., :count]
    return np.sort(order, axis=-1)


def compress_vjp(d_compressed: np.ndarray, x: np.ndarray, f_c: Compression) -> np.ndarray:
    """The gradient of a convolution's weights (out, in, c / δ) for ``d_compressed`` (B, H, n / c, out)."""
    b, h, n, features = x.shape
    taps = x.reshape(b, h, n // f_c.rate, f_c.rate, features)[:, :, :, :: f_c.dilation]  # (B, H, n / c, c / δ, F)
    return np.einsum("bhtg,bhtaf->gfa", d_compressed, taps, optimize=True)


# --------------------------------------------------------------------------
# The steps, for any backend of the attention.
# --------------------------------------------------------------------------


def _usage(x: CompressiveInputs, q, keys, lse, num: Numerics) -> np.ndarray:
    """The attention each key received in this step, summed over queries and the query heads reading it: (B, Hkv, K).

    ``P = exp(scale q·k - lse)`` on the causal (bottom-right) pairs.
    """
    group = x.shape.group
    scores = x.scale * np.einsum("bhnd,bhkd->bhnk", num.load(q), repeat_kv_heads(num.load(keys), group), optimize=True)
    n, total = scores.shape[-2:]
    allowed = np.arange(total)[None, :] <= np.arange(n)[:, None] + total - n  # (n, K)
    weights = np.where(allowed, np.exp(np.minimum(scores - num.load(lse)[..., None], 0.0)), 0.0)
    b, hq = weights.shape[:2]
    return weights.sum(axis=2).reshape(b, hq // group, group, total).sum(axis=2)


def _steps(x: CompressiveInputs, num: Numerics):
    """Yield, per step, the segment, the step's keys, values and the number of memory entries before the segment."""
    state = {"memory_k": x.memory_k, "memory_v": x.memory_v, "compressed_k": x.compressed_k,
             "compressed_v": x.compressed_v, "memory_usage": x.memory_usage}  # fmt: skip
    f_c = x.compression
    for segment in streaming.segments(x.shape.q_len, x.segment_len):
        # (C1) Keys and values: [compressed memory, memory, segment].
        held = streaming.extend(state["compressed_k"], state["memory_k"])
        keys = streaming.extend(held, x.k[:, :, segment])  # (B, Hkv, p + m + n, D)
        values = streaming.extend(streaming.extend(state["compressed_v"], state["memory_v"]), x.v[:, :, segment])
        # (C2) Causal bottom-right attention of the segment's queries.
        options = dict(causal=True, causal_alignment="bottom_right", scale=x.scale)
        result = yield segment, keys, values, held.shape[2], options
        # (C3) The memory takes the segment; the oldest entries beyond mem_len are evicted.
        p = state["compressed_k"].shape[2]
        grown_k, grown_v = keys[:, :, p:], values[:, :, p:]  # (B, Hkv, m + n, D)
        evicted = grown_k.shape[2] - min(x.mem_len, grown_k.shape[2])
        usage = None
        if f_c.rule == "most_used":
            received = _usage(x, x.q[:, :, segment], keys, result.lse, num)[:, :, p:]  # (B, Hkv, m + n)
            earlier = state["memory_usage"]  # (B, Hkv, m); the segment's entries start at 0
            usage = received + np.pad(earlier, ((0, 0), (0, 0), (0, received.shape[2] - earlier.shape[2])))
        # (C4) The evicted entries, compressed by f_c, join the compressed memory, which keeps its last compressed_len.
        new = {"memory_k": grown_k[:, :, evicted:], "memory_v": grown_v[:, :, evicted:]}
        evicted_usage = None if usage is None else usage[:, :, :evicted]
        squeezed_k = compress(grown_k[:, :, :evicted], f_c, f_c.weight_k, evicted_usage)
        squeezed_v = compress(grown_v[:, :, :evicted], f_c, f_c.weight_v, evicted_usage)
        new["compressed_k"] = streaming.last(streaming.extend(state["compressed_k"], squeezed_k), x.compressed_len)
        new["compressed_v"] = streaming.last(streaming.extend(state["compressed_v"], squeezed_v), x.compressed_len)
        # (C5) Usage of the entries still in memory.
        new["memory_usage"] = None if usage is None else usage[:, :, evicted:]
        state = new
    return {name: value for name, value in state.items() if value is not None}


def _run(x: CompressiveInputs, num: Numerics | None, backend: str, on_step) -> dict:
    """Drive :func:`_steps`, calling ``on_step(segment, keys, values, held, options) -> Result`` at each step;
    returns the final state."""
    steps = _steps(x, num if num is not None else FLOAT64)
    try:
        step = next(steps)
        while True:
            step = steps.send(on_step(*step))
    except StopIteration as done:
        return done.value


def stream(x: CompressiveInputs, num: Numerics | None, backend: str) -> Result:
    """Steps (C1)-(C5) over every segment; (C2) is dense attention on ``backend``."""
    outs, lses = [], []

    def attend(segment, keys, values, held, options):
        result = streaming.attend("dense", num, backend, q=x.q[:, :, segment], k=keys, v=values, **options)
        outs.append(result.out)
        lses.append(result.lse)
        return result

    state = _run(x, num, backend, attend)
    return Result(out=np.concatenate(outs, axis=2), lse=np.concatenate(lses, axis=2), aux=state)


def stream_vjp(x: CompressiveInputs, cotangents: Cotangents, num: Numerics | None, backend: str) -> Grads:
    """(C2') per step with both memories held fixed; their share of dk, dv is dropped."""
    dq, dk, dv = [], [], []

    def attend(segment, keys, values, held, options):
        arguments = dict(q=x.q[:, :, segment], k=keys, v=values, **options)
        grads = streaming.attend_vjp("dense", num, backend, streaming.rows(cotangents.dout, segment),
                                     streaming.rows(cotangents.dlse, segment), **arguments)  # fmt: skip
        dq.append(grads["q"])
        dk.append(grads["k"][:, :, held:])
        dv.append(grads["v"][:, :, held:])
        return streaming.attend("dense", num, backend, **arguments) if x.compression.rule == "most_used" else None

    _run(x, num, backend, attend)
    return Grads(q=np.concatenate(dq, axis=2), k=np.concatenate(dk, axis=2), v=np.concatenate(dv, axis=2))


def forward(x: CompressiveInputs, num: Numerics) -> Result:
    """The reference backend: (C1)-(C5) with dense attention's reference in precision ``num``."""
    return stream(x, num, registry.REFERENCE)


def vjp(x: CompressiveInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP in precision ``num``."""
    return stream_vjp(x, cotangents, num, registry.REFERENCE)


# --------------------------------------------------------------------------
# The attention-reconstruction loss, eq. (2).
# --------------------------------------------------------------------------


def attention_reconstruction_loss(q, k, v, *, rate, compression, conv_weight_k=None, conv_weight_v=None, dilation=1,
                                  usage=None, scale=None, reduction="sum") -> float:  # fmt: skip
    """``‖attn(q, k, v) − attn(q, f_c(k), f_c(v))‖²``: how well ``f_c`` preserves what the queries read.

    The paper's eq. (2): ``q`` the current segment's queries, ``k, v`` the
    memory entries being evicted, attention unmasked and content-only.
    Everything but ``f_c`` is held fixed (stop-gradient), so the only
    gradients are those of the convolution weights
    (:func:`attention_reconstruction_loss_vjp`).

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k, v : ndarray (B, Hkv, n, D), (B, Hkv, n, Dv), ``n`` a multiple of ``rate``
    rate, compression, conv_weight_k, conv_weight_v, dilation
        ``f_c``, as :func:`compressive_attention`.
    usage : ndarray (B, Hkv, n), optional
        ``"most_used"`` only: the entries' usage.
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.
    reduction : {"sum", "mean"}
        The squared norm (the paper), or its mean (lucidrains' ``F.mse_loss``).

    Returns
    -------
    float
    """
    x, f_c, usage, reduction = _check_loss_inputs(q, k, v, rate, compression, conv_weight_k, conv_weight_v, dilation,
                                                  usage, scale, reduction)  # fmt: skip
    difference = _reconstruction(x, f_c, usage)[0]
    total = np.sum(difference**2)
    return float(total / difference.size if reduction == "mean" else total)


def attention_reconstruction_loss_vjp(dloss, q, k, v, *, rate, compression, conv_weight_k=None, conv_weight_v=None,
                                      dilation=1, usage=None, scale=None, reduction="sum") -> Grads:  # fmt: skip
    """Gradients of :func:`attention_reconstruction_loss` times ``dloss`` (a float).

    Returns
    -------
    Grads
        ``conv_weight_k`` and ``conv_weight_v`` (their shapes) for the
        convolutions; empty for the pools and ``"most_used"``.
    """
    x, f_c, usage, reduction = _check_loss_inputs(q, k, v, rate, compression, conv_weight_k, conv_weight_v, dilation,
                                                  usage, scale, reduction)  # fmt: skip
    dloss = checks.real_number(dloss, "dloss", minimum=-np.inf)
    if f_c.rule not in CONVOLUTIONS:
        return Grads()
    difference, squeezed_k, squeezed_v = _reconstruction(x, f_c, usage)
    # d/dÂ of Σ (A − Â)² is −2 (A − Â); the mean divides by the count.
    d_reconstructed = -2.0 * dloss * difference / (difference.size if reduction == "mean" else 1.0)
    grads = streaming.attend_vjp("dense", FLOAT64, registry.REFERENCE, d_reconstructed, None, q=x.q, k=squeezed_k,
                                 v=squeezed_v, scale=x.scale)  # fmt: skip
    return Grads(conv_weight_k=compress_vjp(grads["k"], np.asarray(x.k, np.float64), f_c),
                 conv_weight_v=compress_vjp(grads["v"], np.asarray(x.v, np.float64), f_c))  # fmt: skip


def _check_loss_inputs(q, k, v, rate, compression, conv_weight_k, conv_weight_v, dilation, usage, scale, reduction):
    """The checked arguments of the reconstruction loss (dense attention's check for q, k, v)."""
    _, x = streaming.checked_inputs("dense", dict(q=q, k=k, v=v, scale=scale))
    f_c = check_compression(compression, rate, conv_weight_k, conv_weight_v, dilation, x.shape.head_dim,
                            x.shape.value_dim)  # fmt: skip
    if x.shape.kv_len % f_c.rate:
        raise SpecError("rate", f"a divisor of the {x.shape.kv_len} entries compressed", repr(f_c.rate))
    if f_c.rule == "most_used":
        expected = (x.shape.batch, x.shape.kv_heads, x.shape.kv_len)
        if not isinstance(usage, np.ndarray) or usage.shape != expected:
            raise SpecError("usage", f"shape {expected} (B, Hkv, n)", checks.summary(usage))
        usage = checks.float_array(usage, "usage")
    elif usage is not None:
        raise SpecError("usage", "None unless compression is 'most_used'", checks.summary(usage))
    return x, f_c, usage, checks.choice(reduction, "reduction", REDUCTIONS)


def _reconstruction(x, f_c: Compression, usage):
    """``attn(q, k, v) − attn(q, f_c(k), f_c(v))`` (B, Hq, Nq, Dv), and the compressed keys and values."""
    k, v = np.asarray(x.k, np.float64), np.asarray(x.v, np.float64)
    squeezed_k = compress(k, f_c, f_c.weight_k, usage)
    squeezed_v = compress(v, f_c, f_c.weight_v, usage)
    read = lambda keys, values: streaming.attend("dense", FLOAT64, registry.REFERENCE, q=x.q, k=keys, v=values,  # noqa: E731
                                                 scale=x.scale).out  # fmt: skip
    return read(k, v) - read(squeezed_k, squeezed_v), squeezed_k, squeezed_v
