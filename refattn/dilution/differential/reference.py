"""Differential attention: the executable specification.

Ye et al. 2024, "Differential Transformer" (arXiv:2410.05258, ICLR 2025),
eqs. (1)-(3), computed as the authors' code computes it (microsoft/unilm,
``Diff-Transformer/multihead_flashdiff_1.py``; ``multihead_diffattn.py`` is
the same function, with ``gqa_keys="repeat_kv"`` under GQA). Each output head ``h`` subtracts a second
softmax map from a first, both over the same values, then normalises:

    A_c   = softmax(mask(bias + cap(scale · q_{2h+c} k_{κ_c(h)}ᵀ)))      c = 0, 1
    diff  = A_0 v_{h // G} − λ · A_1 v_{h // G}
    out_h = (1 − λ_init) · RMSNorm(diff) ⊙ w

with one scalar ``λ = exp(λ_q1 · λ_k1) − exp(λ_q2 · λ_k2) + λ_init`` per
layer, shared by every head, and ``λ_init = 0.8 − 0.6 · exp(−0.3 · depth)``
for the 0-based layer index ``depth`` (the paper's ``l − 1``).

Layout (refattn's (B, H, N, D); the authors' tensors are (B, N, H, D) and
map to these by ``transpose(1, 2)``, with no other reshaping)::

    q  (B, 2H,   Nq, D)     authors' q.view(B, Nq, 2 * num_heads, head_dim)
    k  (B, 2Hkv, Nk, D)     authors' k.view(B, Nk, 2 * num_kv_heads, head_dim)
    v  (B, Hkv,  Nk, 2D)    authors' v.view(B, Nk, num_kv_heads, 2 * head_dim)
    out (B, H, Nq, 2D)      authors' attn before its final reshape to (B, Nq, H * 2D)
    map_lse (B, 2H, Nq)     not returned by the authors: aux["map_lse"], each query head's
                            map's log-sum-exp (``lse`` is None: an output head has none)

Query heads ``2h`` and ``2h + 1`` are the two maps of output head ``h``
(``attn_weights.view(B, H, 2, Nq, Nk)``; ``q.reshape(B, Nq, H, 2, D)``), not
``h`` and ``h + H``. Map ``c`` of output head ``h`` reads key head
``κ_c(h)`` (:func:`key_heads`): with ``gqa_keys="paired"`` (the default,
the flash variants) kv head ``j`` holds the key pair ``(2j, 2j + 1)`` and
output head ``h`` reads kv head ``h // G``, ``G = H / Hkv``; with
``"repeat_kv"`` (``multihead_diffattn.py``) the 2·Hkv key heads are repeated
as in ordinary GQA, so query head ``g`` reads key head ``g // G``. The two
agree when ``G = 1``.

The difference is formed from the two maps' outputs, ``o_0 − λ o_1``, as the
flash variants do (the naive code subtracts the weights, then multiplies by
``v``: equal in exact arithmetic), so each map is one dense attention call and
a kernel never holds an (Nq, Nk) array.

Equations and their numbers are in spec/dilution.md (differential
attention); the step numbers below match: (D1)-(D7), with dense attention's
steps (1)-(7) of spec/dense.md inside (D3).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...core import checks, registry
from ...core.checks import float_array
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import sum_kv_heads
from ...dense import reference as dense_reference
from ...dense.inputs import DenseInputs, check_dense_inputs

GQA_KEYS = ("paired", "repeat_kv")
LAMBDA_NAMES = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
#: exp(λ_q · λ_k) overflows float64 above this exponent, log(max float64).
MAX_LAMBDA_EXPONENT = math.log(np.finfo(np.float64).max)


# --- the schedule and the head maps -------------------------------------------


def lambda_init_from_depth(depth: int) -> float:
    """Step (D1): ``λ_init = 0.8 − 0.6 · exp(−0.3 · depth)``, the authors' ``lambda_init_fn``.

    Parameters
    ----------
    depth : int >= 0
        The layer's 0-based index (the authors pass ``depth=0`` for the first
        layer; the paper writes ``0.8 − 0.6 · exp(−0.3 · (l − 1))`` for the
        1-based ``l``). Python floats, as the authors': bitwise their value.
    """
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 0:
        raise SpecError("depth", "an integer >= 0 (the 0-based layer index)", checks.summary(depth))
    return 0.8 - 0.6 * math.exp(-0.3 * int(depth))


def key_heads(heads: int, kv_heads: int, gqa_keys: str = "paired") -> np.ndarray:
    """``κ[c, h]``: the key head (of k's 2·Hkv) read by map ``c`` of output head ``h``, (2, H) int64.

    ``"paired"``: ``2 · (h // G) + c`` (kv head ``h // G`` holds keys ``2j, 2j + 1``;
    the flash variants' ``k.reshape(B, N, Hkv, 2, D)``). ``"repeat_kv"``:
    ``(2h + c) // G`` (``repeat_kv`` over all 2·Hkv key heads, as
    ``multihead_diffattn.py`` does). ``G = heads // kv_heads``.
    """
    heads, kv_heads = checks.integer(heads, "heads", minimum=1), checks.integer(kv_heads, "kv_heads", minimum=1)
    if heads % kv_heads:
        raise SpecError("kv_heads", f"a divisor of heads = {heads} (H = G · Hkv)", checks.summary(kv_heads))
    gqa_keys = checks.choice(gqa_keys, "gqa_keys", GQA_KEYS)
    group = heads // kv_heads
    h = np.arange(heads)
    if gqa_keys == "paired":
        return np.stack([2 * (h // group), 2 * (h // group) + 1])
    return np.stack([(2 * h) // group, (2 * h + 1) // group])


# --- checked inputs -----------------------------------------------------------


@dataclass(frozen=True)
class DifferentialShape:
    """Sizes of one call: q (B, 2H, Nq, D), k (B, 2Hkv, Nk, D), v (B, Hkv, Nk, 2D)."""

    batch: int
    heads: int  # H, output heads (half of q's heads)
    kv_heads: int  # Hkv (half of k's heads; v's heads)
    q_len: int
    kv_len: int
    head_dim: int  # D of q and k; v and out have 2D

    @property
    def group(self) -> int:
        """G = H / Hkv: output heads per kv head."""
        return self.heads // self.kv_heads

    @property
    def scores(self) -> tuple[int, int, int, int]:
        """(B, 2H, Nq, Nk): one score matrix per query head, as masks and biases broadcast."""
        return (self.batch, 2 * self.heads, self.q_len, self.kv_len)


@dataclass(frozen=True)
class DifferentialInputs:
    """Checked arguments, arrays in the caller's dtype."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    shape: DifferentialShape
    lambdas: dict  # name -> (D,) array, LAMBDA_NAMES
    lambda_init: float
    norm_weight: np.ndarray | None  # (2D,)
    norm_eps: float
    apply_norm: bool
    gqa_keys: str
    mask: np.ndarray | None  # bool, broadcastable to (B, 2H, Nq, Nk)
    bias: np.ndarray | None  # real, broadcastable to (B, 2H, Nq, Nk)
    maps: tuple[DenseInputs, DenseInputs]  # the two maps' dense attention, :func:`map_inputs`

    def cotangent_shapes(self) -> dict:
        """Shape of ``dout`` (B, H, Nq, 2D); no ``dlse``: an output head has no log-sum-exp of its own."""
        s = self.shape
        return {"dout": (s.batch, s.heads, s.q_len, 2 * s.head_dim), "dlse": None}

    def add_map_kv_grads(self, c: int, dk: np.ndarray, dv: np.ndarray, map_dk: np.ndarray, map_dv: np.ndarray) -> None:
        """Adjoint of :func:`map_inputs`'s keys and values: add map ``c``'s gradients into
        dk (B, 2Hkv, Nk, D) and dv (B, Hkv, Nk, 2D), summing over every head that read a key or value."""
        if self.gqa_keys == "paired":
            dk[:, c::2] += map_dk
            dv += map_dv
        else:
            np.add.at(dk, (slice(None), key_heads(self.shape.heads, self.shape.kv_heads, self.gqa_keys)[c]), map_dk)
            dv += sum_kv_heads(map_dv, self.shape.group)


def _has_head_axis(x: np.ndarray) -> bool:
    """Whether a (broadcastable) mask or bias varies along the query-head axis."""
    return x.ndim >= 3 and x.shape[-3] != 1


def _map_heads(x: np.ndarray | None, c: int) -> np.ndarray | None:
    """Query heads ``c, c + 2, ...`` of a mask or bias broadcastable to (B, 2H, Nq, Nk)."""
    if x is None or not _has_head_axis(x):
        return x
    return x[..., c::2, :, :]


def map_inputs(q, k, v, shape: DifferentialShape, gqa_keys: str, mask, bias, dense_params: dict, c: int) -> DenseInputs:
    """The checked arguments of map ``c``'s dense attention: query heads ``c, c + 2, ...`` (B, H, Nq, D),
    the keys and values they read, and mask and bias with their query-head axis (if any) cut the same way.

    ``"paired"``: map ``c`` is ordinary GQA over the kv heads' ``c``-th keys, k[:, c::2] (B, Hkv, Nk, D),
    and v (B, Hkv, Nk, 2D), so no key or value is copied. ``"repeat_kv"``: key head ``(2h + c) // G``
    follows no group rule of map ``c``'s own, so keys and values are gathered per output head,
    (B, H, Nk, D) and (B, H, Nk, 2D).
    """
    if gqa_keys == "paired":
        keys, values = k[:, c::2], v
    else:
        keys = k[:, key_heads(shape.heads, shape.kv_heads, gqa_keys)[c]]
        values = np.repeat(v, shape.group, axis=1)
    return check_dense_inputs(
        q[:, c::2], keys, values, mask=_map_heads(mask, c), bias=_map_heads(bias, c), **dense_params,
        dropout_keep=None, dropout_p=0.0,
    )  # fmt: skip


def _check_qkv(q, k, v) -> DifferentialShape:
    arrays = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, np.ndarray) and x.ndim != 4:
            raise SpecError(name, "4 dimensions (B, H, N, D)", f"shape {x.shape}")
        arrays[name] = float_array(x, name)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    if min(q.shape) == 0 or min(k.shape) == 0 or min(v.shape) == 0:
        raise SpecError("q, k, v", "non-empty dimensions", f"shapes {q.shape}, {k.shape}, {v.shape}")
    b, two_h, nq, d = q.shape
    if two_h % 2:
        raise SpecError("q", "an even number of heads 2H (heads 2h and 2h + 1 are output head h's two maps)", f"{two_h} heads")
    if k.shape[0] != b:
        raise SpecError("k", f"batch {b} (as q)", f"batch {k.shape[0]} (shape {k.shape})")
    if k.shape[3] != d:
        raise SpecError("k", f"head dim {d} (as q)", f"head dim {k.shape[3]}")
    if k.shape[1] % 2:
        raise SpecError("k", "an even number of heads 2Hkv (heads 2j and 2j + 1 are kv head j's two keys)", f"{k.shape[1]} heads")
    heads, kv_heads, nk = two_h // 2, k.shape[1] // 2, k.shape[2]
    if heads % kv_heads:
        raise SpecError("k", f"2·Hkv heads with Hkv dividing H = {heads} (half of q's heads)", f"{k.shape[1]} heads")
    if v.shape[:3] != (b, kv_heads, nk):
        raise SpecError("v", f"(B, Hkv, Nk) = {(b, kv_heads, nk)} (half of k's heads)", f"shape {v.shape}")
    if v.shape[3] != 2 * d:
        raise SpecError("v", f"head dim 2·D = {2 * d} (an output head's value is twice q's head dim)", f"head dim {v.shape[3]}")
    return DifferentialShape(b, heads, kv_heads, nq, nk, d)


def _check_lambda_vector(x, name: str, head_dim: int) -> np.ndarray:
    x = float_array(x, name)
    if x.shape != (head_dim,):
        raise SpecError(name, f"shape (D,) = ({head_dim},), q's head dim", f"shape {x.shape}")
    return x


def _check_lambda_init(lambda_init, depth) -> float:
    """Exactly one of ``lambda_init`` (a finite number) and ``depth`` (step (D1))."""
    if (lambda_init is None) == (depth is None):
        given = "neither" if lambda_init is None else f"both (lambda_init={lambda_init!r}, depth={depth!r})"
        raise SpecError("lambda_init, depth", "exactly one of them", given)
    if depth is not None:
        return lambda_init_from_depth(depth)
    return checks.real_number(lambda_init, "lambda_init", minimum=-math.inf)


def check_differential_inputs(
    q, k, v, *, lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init, depth, norm_weight, norm_eps, apply_norm,
    gqa_keys, mask, bias, causal, causal_alignment, window, scale, softcap,
) -> DifferentialInputs:  # fmt: skip
    """Check every argument of :func:`differential_attention`; raise :class:`SpecError` on the first bad one."""
    shape = _check_qkv(q, k, v)
    given = dict(lambda_q1=lambda_q1, lambda_k1=lambda_k1, lambda_q2=lambda_q2, lambda_k2=lambda_k2)
    lambdas = {name: _check_lambda_vector(given[name], name, shape.head_dim) for name in LAMBDA_NAMES}
    for c in ("1", "2"):
        dot = float(np.dot(lambdas[f"lambda_q{c}"].astype(np.float64), lambdas[f"lambda_k{c}"].astype(np.float64)))
        if dot > MAX_LAMBDA_EXPONENT:
            wanted = f"lambda_q{c} · lambda_k{c} <= {MAX_LAMBDA_EXPONENT:.2f} (its exp must be a finite float64)"
            raise SpecError(f"lambda_q{c}, lambda_k{c}", wanted, f"{dot!r}")
    lambda_init = _check_lambda_init(lambda_init, depth)
    apply_norm = checks.flag(apply_norm, "apply_norm")
    norm_eps = checks.real_number(norm_eps, "norm_eps", minimum=0.0, inclusive=False)
    if norm_weight is not None:
        if not apply_norm:
            raise SpecError("norm_weight", "None when apply_norm=False (the weight belongs to the norm)", "an array")
        norm_weight = float_array(norm_weight, "norm_weight")
        if norm_weight.shape != (2 * shape.head_dim,):
            raise SpecError("norm_weight", f"shape (2D,) = ({2 * shape.head_dim},), v's head dim", f"shape {norm_weight.shape}")
    dense_params = dict(
        causal=checks.flag(causal, "causal"),
        causal_alignment=checks.choice(causal_alignment, "causal_alignment", checks.CAUSAL_ALIGNMENTS),
        window=checks.window(window),
        scale=checks.scale(scale, shape.head_dim),
        softcap=checks.real_number(softcap, "softcap", minimum=0.0),
    )
    gqa_keys = checks.choice(gqa_keys, "gqa_keys", GQA_KEYS)
    mask = None if mask is None else checks.broadcastable(mask, "mask", shape.scores, "bool")
    bias = None if bias is None else checks.broadcastable(bias, "bias", shape.scores, "float")
    maps = tuple(map_inputs(q, k, v, shape, gqa_keys, mask, bias, dense_params, c) for c in (0, 1))
    return DifferentialInputs(
        q=q, k=k, v=v, shape=shape, lambdas=lambdas, lambda_init=lambda_init, norm_weight=norm_weight,
        norm_eps=norm_eps, apply_norm=apply_norm, gqa_keys=gqa_keys, mask=mask, bias=bias, maps=maps,
    )  # fmt: skip


# --- the steps, shared with the Numba backend ------------------------------------


def interleave(even: np.ndarray, odd: np.ndarray) -> np.ndarray:
    """(B, H, ...) and (B, H, ...) -> (B, 2H, ...) with ``even`` at heads 2h and ``odd`` at 2h + 1."""
    b, h = even.shape[:2]
    return np.stack([even, odd], axis=2).reshape((b, 2 * h) + even.shape[2:])


def lambda_steps(x: DifferentialInputs, num: Numerics) -> dict:
    """Step (D2): ``λ = exp(λ_q1 · λ_k1) − exp(λ_q2 · λ_k2) + λ_init``; returns λ_1, λ_2 and λ (0-d, compute dtype)."""
    vectors = {name: num.load(value) for name, value in x.lambdas.items()}  # (D,) each
    # The authors sum and exponentiate in float32 (.float()), then store in q's dtype.
    lambda_1 = num.store(np.exp(num.store(np.sum(vectors["lambda_q1"] * vectors["lambda_k1"]))))
    lambda_2 = num.store(np.exp(num.store(np.sum(vectors["lambda_q2"] * vectors["lambda_k2"]))))
    lambda_full = num.store(lambda_1 - lambda_2 + x.lambda_init)
    return dict(vectors=vectors, lambda_1=lambda_1, lambda_2=lambda_2, lambda_full=lambda_full)


def forward_steps(x: DifferentialInputs, num: Numerics, attend: Callable[[DenseInputs], Result]) -> dict:
    """Steps (D2)-(D7); ``attend(map_inputs)`` is dense attention's forward (the reference at ``num``'s
    precision, or a kernel). Returns every intermediate the VJP needs."""
    steps = lambda_steps(x, num)
    # (D3) The two maps, each dense attention (1)-(7) over its query heads, keys and the shared values.
    maps = [attend(map_x) for map_x in x.maps]
    outs = [np.asarray(m.out, dtype=num.compute) for m in maps]  # 2 x (B, H, Nq, 2D)
    steps.update(maps=outs, map_lse=interleave(*(np.asarray(m.lse, dtype=num.compute) for m in maps)))  # (B, 2H, Nq)
    # (D4) The difference of the two maps' outputs.
    diff = num.store(outs[0] - steps["lambda_full"] * outs[1])  # (B, H, Nq, 2D)
    steps["diff"] = steps["out"] = diff
    if not x.apply_norm:
        return steps
    # (D5) RMS normalisation over each output head's 2D features (the authors' subln, in float32).
    mean_square = num.store(np.mean(diff * diff, axis=-1, keepdims=True))  # (B, H, Nq, 1)
    inv_rms = num.store(1.0 / np.sqrt(mean_square + x.norm_eps))  # (B, H, Nq, 1)
    normed = num.store(diff * inv_rms)  # (B, H, Nq, 2D)
    # (D6) The norm's elementwise weight, when it has one (elementwise_affine=True).
    weighted = normed if x.norm_weight is None else num.store(normed * num.load(x.norm_weight))
    # (D7) The fixed factor 1 − λ_init.
    steps.update(inv_rms=inv_rms, normed=normed, out=num.store((1.0 - x.lambda_init) * weighted))
    return steps


def vjp_steps(x: DifferentialInputs, num: Numerics, f: dict, dout: np.ndarray,
              attend_vjp: Callable[[DenseInputs, Cotangents], Grads]) -> Grads:  # fmt: skip
    """Steps (D7')-(D1') for the forward intermediates ``f`` and the cotangent ``dout`` of ``out`` (the
    maps' log-sum-exps are intermediates, ``aux["map_lse"]``, with no cotangent); ``attend_vjp(map_inputs,
    cotangents)`` is dense attention's VJP. Returns every gradient in the compute dtype."""
    d_diff, d_norm_weight = dout, None  # (B, H, Nq, 2D)
    if x.apply_norm:
        # (D7') out = (1 − λ_init) · weighted.
        d_weighted = num.store((1.0 - x.lambda_init) * dout)
        # (D6') weighted = normed ⊙ w: dw sums over batch, heads and queries.
        d_normed = d_weighted
        if x.norm_weight is not None:
            d_norm_weight = num.store(np.sum(d_weighted * f["normed"], axis=(0, 1, 2)))  # (2D,)
            d_normed = num.store(d_weighted * num.load(x.norm_weight))
        # (D5') normed = diff · r, r = (mean(diff²) + ε)^(−1/2): d diff = r · (d normed − normed · mean(d normed ⊙ normed)).
        projection = num.store(np.mean(d_normed * f["normed"], axis=-1, keepdims=True))  # (B, H, Nq, 1)
        d_diff = num.store(f["inv_rms"] * (d_normed - f["normed"] * projection))
    # (D4') diff = o_0 − λ o_1: the maps' cotangents, and dλ = −Σ ⟨d diff, o_1⟩.
    d_maps = (d_diff, num.store(-f["lambda_full"] * d_diff))
    d_lambda = num.store(-np.sum(d_diff * f["maps"][1]))
    # (D3') Each map's dense VJP, for its output's cotangent alone.
    dq = []
    dk, dv = np.zeros(x.k.shape, num.compute), np.zeros(x.v.shape, num.compute)
    dbias = None if x.bias is None else np.zeros(x.bias.shape, num.compute)
    for c in (0, 1):
        g = attend_vjp(x.maps[c], Cotangents(dout=d_maps[c]))
        dq.append(np.asarray(g["q"], num.compute))
        x.add_map_kv_grads(c, dk, dv, np.asarray(g["k"], num.compute), np.asarray(g["v"], num.compute))
        if dbias is not None:
            _add_map_heads(dbias, np.asarray(g["bias"], num.compute), c)
    grads = Grads(q=interleave(*dq), k=dk, v=dv)
    # (D2') λ = exp(λ_q1 · λ_k1) − exp(λ_q2 · λ_k2) + λ_init.
    vectors = f["vectors"]
    grads["lambda_q1"] = num.store(d_lambda * f["lambda_1"] * vectors["lambda_k1"])
    grads["lambda_k1"] = num.store(d_lambda * f["lambda_1"] * vectors["lambda_q1"])
    grads["lambda_q2"] = num.store(-d_lambda * f["lambda_2"] * vectors["lambda_k2"])
    grads["lambda_k2"] = num.store(-d_lambda * f["lambda_2"] * vectors["lambda_q2"])
    # (D1') λ_init (or depth) is a constant.
    if d_norm_weight is not None:
        grads["norm_weight"] = d_norm_weight
    if dbias is not None:
        grads["bias"] = dbias
    return grads


def _add_map_heads(total: np.ndarray, map_grad: np.ndarray, c: int) -> None:
    """Adjoint of :func:`_map_heads`: add map ``c``'s bias gradient into ``total``, of the bias's own shape."""
    if _has_head_axis(total):
        total[..., c::2, :, :] += map_grad
    else:
        total += map_grad


# --- the mechanism ------------------------------------------------------------


def differential_attention(
    q, k, v, *,
    lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init=None, depth=None, norm_weight=None, norm_eps=1e-5,
    apply_norm=True, gqa_keys="paired",
    mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
    scale=None, softcap=0.0, precision=None, backend="reference") -> Result:
    """Differential attention: two softmax maps subtracted with a learned λ, then a per-head RMSNorm.

    Parameters
    ----------
    q : ndarray (B, 2H, Nq, D)
        Query heads ``2h`` and ``2h + 1`` are the two maps of output head ``h``.
    k : ndarray (B, 2Hkv, Nk, D)
        ``H % Hkv == 0``; which key head each map reads is ``gqa_keys``'s rule.
    v : ndarray (B, Hkv, Nk, 2D)
        Output head ``h`` reads value head ``h // (H / Hkv)`` in both maps.
    lambda_q1, lambda_k1, lambda_q2, lambda_k2 : ndarray (D,)
        The re-parameterisation of λ (one per layer, shared by all heads).
    lambda_init : float, optional
        λ_init given directly. Exactly one of ``lambda_init`` and ``depth``.
    depth : int >= 0, optional
        0-based layer index; ``λ_init = 0.8 − 0.6 · exp(−0.3 · depth)``.
    norm_weight : ndarray (2D,), optional
        The RMSNorm's elementwise weight (``elementwise_affine=True`` in the
        top-level files of the authors' repository; their ``diff/`` copies and
        Hugging Face's DiffLlama have none). Needs ``apply_norm``.
    norm_eps : float > 0
        RMSNorm's ε, added to the mean square inside the square root (1e-5).
    apply_norm : bool
        False returns the difference (D4) itself, the paper's DiffAttn(X),
        without the norm and without the factor ``1 − λ_init``.
    gqa_keys : {"paired", "repeat_kv"}
        Key head of map ``c`` of output head ``h``: ``2 (h // G) + c`` (the
        flash variants) or ``(2h + c) // G`` (``multihead_diffattn.py``);
        see :func:`key_heads`. Equal when ``G = 1``.
    mask, bias : broadcastable to (B, 2H, Nq, Nk), optional
        Per *query* head, as the authors' ``attn_mask`` is added to the
        (B, 2H, Nq, Nk) weights: heads ``2h + c`` are map ``c`` of head ``h``.
    causal, causal_alignment, window, scale, softcap
        As :func:`refattn.dense_attention`, applied to both maps; ``scale``
        defaults to ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, H, Nq, 2D), float64, and ``lse`` None: output head ``h``
        is a difference of two softmax maps, then a norm, not one softmax
        average, so it has no log-sum-exp of its own. Each of its maps,
        query heads ``2h`` and ``2h + 1``, has one: ``aux["map_lse"]``
        (B, 2H, Nq), float64, in query-head order (``-inf`` on a fully
        masked row, whose output is 0).
    """
    return registry.call_forward("differential", locals())


def forward(x: DifferentialInputs, num: Numerics) -> Result:
    """The reference backend: steps (D1)-(D7) in precision ``num``, each map by dense attention's reference."""
    f = forward_steps(x, num, lambda map_x: dense_reference.forward(map_x, num))
    return Result(out=f["out"], lse=None, aux={"map_lse": f["map_lse"]})


differential_attention_vjp = registry.vjp_function(
    differential_attention, "differential", grads="""    ``q``, ``k``, ``v``, ``lambda_q1``, ``lambda_k1``, ``lambda_q2``,
    ``lambda_k2``, then ``norm_weight`` and ``bias`` (in the bias's own
    shape) when given. ``lambda_init`` and ``depth`` are constants. There
    is no ``dlse`` (``lse`` is None; ``aux["map_lse"]`` has no cotangent).""",
)


def vjp(x: DifferentialInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (D7')-(D1') in precision ``num``."""
    f = forward_steps(x, num, lambda map_x: dense_reference.forward(map_x, num))
    return vjp_steps(
        x, num, f, num.load(cotangents.dout),
        lambda map_x, map_cotangents: dense_reference.vjp(map_x, map_cotangents, num),
    )  # fmt: skip
