"""A small dense attention written for the flag tests, and one wrong variant per flag.

:class:`SmallAttention` is written from spec/dense.md in vectorised NumPy,
independently of refattn's reference: forward ``(out, lse)`` and a
hand-derived ``vjp``. ``SmallAttention(bug=FLAG)`` makes the mistake that
the conformance flag ``FLAG`` names (refattn/conformance/flags.py); each
mistake is the one line marked ``# bug FLAG`` next to the line it replaces.
tests/test_flags.py checks that every wrong variant fails a case carrying
its flag, and that the correct one passes them all.

Forward mistakes live in :func:`forward_steps`; the four gradient mistakes
(``GRADIENT_BUGS``) live in :meth:`SmallAttention.vjp`, whose backward is
otherwise that of the correct forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GRADIENT_BUGS = ("MULTI_QUERY", "GQA_GRAD_REDUCTION", "LSE_GRADIENT", "BIAS_BROADCAST")

#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "BASELINE": "forgets to normalise the softmax rows (out = sum_j exp(s_ij - max) v_j)",
    "SCALE_DEFAULT": "defaults the scale to 1/D instead of 1/sqrt(D)",
    "SCALE_OVERRIDE": "multiplies an explicit scale with 1/sqrt(D) instead of replacing it",
    "AWKWARD_HEAD_DIM": "drops the head-dim tail past the last multiple of 8 in q·k",
    "VALUE_DIM_DIFFERS": "defaults the scale to 1/sqrt(Dv), the value head dim",
    "ODD_LENGTH": "ignores keys in the last partial tile of 16",
    "UNEQUAL_LENGTHS": "uses the query length for the key axis (keys past Nq ignored)",
    "SINGLE_TOKEN": "takes the softmax over the last axis longer than 1, as np.squeeze would leave it",
    "MULTI_BATCH": "reads batch element 0's keys and values for every batch element",
    "GQA_HEAD_MAP": "maps query head h to kv head h % Hkv (tiling)",
    "MULTI_QUERY": "keeps the gradient of the first query head of each group for dk and dv",
    "GQA_GRAD_REDUCTION": "averages dk and dv over each group of query heads instead of summing",
    "CAUSAL_MASK": "excludes the diagonal (j < i instead of j <= i)",
    "CAUSAL_ALIGNMENT": "always aligns top-left, whatever causal_alignment says",
    "SLIDING_WINDOW": "makes both window bounds exclusive",
    "WINDOW_WIDER_THAN_SEQUENCE": "computes the window's lower bound i' - left in unsigned 32-bit arithmetic",
    "MASK_LAYOUT": "reads True as 'masked'",
    "MASK_BROADCAST": "applies a mask whose query axis has size 1 along the query axis instead of the key axis",
    "MASK_COMBINATION": "lets a user mask replace causality and the window instead of combining with them",
    "PADDING_MASK": "zeroes masked weights after the softmax without renormalising",
    "FULLY_MASKED_ROW": "masks with -1e9 instead of -inf",
    "LARGE_LOGITS": "exponentiates without subtracting the row maximum",
    "SOFTCAP": "hard-clips the scores to [-c, c] instead of c·tanh(s/c)",
    "SOFTCAP_BEFORE_BIAS": "soft-caps the biased scores, c·tanh((s + b)/c)",
    "SOFTCAP_BEFORE_MASK": "soft-caps after masking, turning -inf into -c",
    "BIAS": "adds the bias before scaling (scale·(q·k + b))",
    "BIAS_BROADCAST": "averages the bias gradient over broadcast axes instead of summing",
    "DROPOUT_SCALING": "drops weights without dividing the kept ones by 1 - p",
    "LSE_DEFINITION": "returns the log-sum-exp in base 2",
    "LSE_GRADIENT": "ignores dlse in the backward",
}


def allowed_keys(shape, *, mask, causal, causal_alignment, window, bug=None) -> np.ndarray:
    """(B, H, Nq, Nk) bool: which keys each query may attend to."""
    nq, nk = shape[2], shape[3]
    offset = nk - nq if causal_alignment == "bottom_right" else 0
    if bug == "CAUSAL_ALIGNMENT":
        offset = 0  # bug CAUSAL_ALIGNMENT
    i = np.arange(nq)[:, None] + offset  # aligned query position (Nq, 1)
    j = np.arange(nk)[None, :]  # key position (1, Nk)
    by_position = np.ones((nq, nk), bool)
    if causal:
        by_position &= (j < i) if bug == "CAUSAL_MASK" else (j <= i)  # bug CAUSAL_MASK
    if window is not None:
        left, right = window
        if left is not None:
            lower = i - left
            if bug == "WINDOW_WIDER_THAN_SEQUENCE":
                lower = lower % 2**32  # bug WINDOW_WIDER_THAN_SEQUENCE
            by_position &= (j > lower) if bug == "SLIDING_WINDOW" else (j >= lower)  # bug SLIDING_WINDOW
        if right is not None:
            by_position &= (j < i + right) if bug == "SLIDING_WINDOW" else (j <= i + right)  # bug SLIDING_WINDOW
    if bug == "UNEQUAL_LENGTHS":
        by_position &= j < nq  # bug UNEQUAL_LENGTHS
    if bug == "ODD_LENGTH":
        by_position &= j < nk - nk % 16  # bug ODD_LENGTH
    if mask is None:
        return np.broadcast_to(by_position, shape)
    if bug == "MASK_LAYOUT":
        mask = ~mask  # bug MASK_LAYOUT
    if bug == "MASK_BROADCAST" and mask.shape[-2] == 1:
        mask = np.swapaxes(mask, -1, -2)  # bug MASK_BROADCAST
    if bug == "MASK_COMBINATION":
        return np.broadcast_to(mask, shape)  # bug MASK_COMBINATION
    return np.broadcast_to(mask, shape) & by_position


def forward_steps(q, k, v, *, mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
                  scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0, bug=None) -> dict:  # fmt: skip
    """Every step of the forward, in float64, as a dict (out, lse and what the backward needs)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    bias = None if bias is None else np.asarray(bias, np.float64)
    hq, d = q.shape[1], q.shape[3]
    hkv, dv = k.shape[1], v.shape[3]
    if bug == "MULTI_BATCH":
        k, v = np.broadcast_to(k[:1], k.shape), np.broadcast_to(v[:1], v.shape)  # bug MULTI_BATCH
    heads = np.arange(hq) % hkv if bug == "GQA_HEAD_MAP" else np.arange(hq) // (hq // hkv)  # bug GQA_HEAD_MAP
    k_h, v_h = k[:, heads], v[:, heads]  # (B, Hq, Nk, D), (B, Hq, Nk, Dv)

    if scale is None:
        scale = {"SCALE_DEFAULT": 1 / d, "VALUE_DIM_DIFFERS": 1 / math.sqrt(dv)}.get(bug, 1 / math.sqrt(d))  # bugs
    elif bug == "SCALE_OVERRIDE":
        scale = scale / math.sqrt(d)  # bug SCALE_OVERRIDE
    used = d - d % 8 if bug == "AWKWARD_HEAD_DIM" else d  # bug AWKWARD_HEAD_DIM
    s = scale * np.einsum("bhqd,bhkd->bhqk", q[..., :used], k_h[..., :used])  # (B, Hq, Nq, Nk)
    if bug == "BIAS" and bias is not None:
        s, bias = s + scale * bias, None  # bug BIAS
    if bug == "SOFTCAP_BEFORE_BIAS" and bias is not None and softcap > 0:
        s, bias = s + bias, None  # bug SOFTCAP_BEFORE_BIAS
    capped = s
    if softcap > 0 and bug != "SOFTCAP_BEFORE_MASK":
        capped = np.clip(s, -softcap, softcap) if bug == "SOFTCAP" else softcap * np.tanh(s / softcap)  # bug SOFTCAP
    logits = capped if bias is None else capped + bias

    allowed = allowed_keys(logits.shape, mask=mask, causal=causal, causal_alignment=causal_alignment, window=window, bug=bug)
    masked = np.where(allowed, logits, -1e9 if bug == "FULLY_MASKED_ROW" else -np.inf)  # bug FULLY_MASKED_ROW
    if bug == "SOFTCAP_BEFORE_MASK" and softcap > 0:
        masked = softcap * np.tanh(masked / softcap)  # bug SOFTCAP_BEFORE_MASK
    p, lse = softmax(masked, bug)
    if bug == "PADDING_MASK":
        p = softmax(logits)[0] * allowed  # bug PADDING_MASK
    if bug == "LSE_DEFINITION":
        lse = lse / math.log(2)  # bug LSE_DEFINITION
    dropped = p
    if dropout_keep is not None:
        dropped = p * dropout_keep if bug == "DROPOUT_SCALING" else p * dropout_keep / (1 - dropout_p)  # bug DROPOUT_SCALING
    out = np.einsum("bhqk,bhke->bhqe", dropped, v_h)  # (B, Hq, Nq, Dv)
    return dict(out=out, lse=lse, p=p, dropped=dropped, q=q, k_h=k_h, v_h=v_h, s=s, scale=scale, group=hq // hkv)


def softmax(masked: np.ndarray, bug=None) -> tuple[np.ndarray, np.ndarray]:
    """Row softmax over keys and its natural-log normaliser; a row of -inf gives 0 and -inf."""
    top = masked.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    if bug == "LARGE_LOGITS":
        top = np.zeros_like(top)  # bug LARGE_LOGITS
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e = np.exp(masked - top)
        total = e.sum(axis=-1, keepdims=True)
        lse = np.where(total > 0, top + np.log(total), -np.inf)[..., 0]
        if bug == "SINGLE_TOKEN":
            axis = max(a for a, n in enumerate(masked.shape) if n > 1)
            total = e.sum(axis=axis, keepdims=True)  # bug SINGLE_TOKEN
        p = e if bug == "BASELINE" else e / np.where(total > 0, total, 1.0)  # bug BASELINE
    return p, lse


@dataclass(frozen=True)
class SmallAttention:
    """Dense attention ``impl(q, k, v, **params) -> (out, lse)`` with a ``vjp``; ``bug`` names a flag to get wrong."""

    bug: str | None = None

    def __call__(self, q, k, v, **params):
        steps = forward_steps(q, k, v, bug=self.bug, **params)
        return steps["out"], steps["lse"]

    def vjp(self, dout, q, k, v, *, dlse=None, **params) -> dict:
        """Hand-derived backward of the correct forward, with this variant's gradient bug if it has one."""
        bug = self.bug if self.bug in GRADIENT_BUGS else None
        f = forward_steps(q, k, v, **params)
        dout = np.asarray(dout, np.float64)
        dv_h = np.einsum("bhqk,bhqe->bhke", f["dropped"], dout)
        d_dropped = np.einsum("bhqe,bhke->bhqk", dout, f["v_h"])
        keep = params.get("dropout_keep")
        d_p = d_dropped if keep is None else d_dropped * keep / (1 - params.get("dropout_p", 0.0))
        p = f["p"]
        d_logits = p * (d_p - np.sum(p * d_p, axis=-1, keepdims=True))
        if dlse is not None and bug != "LSE_GRADIENT":  # bug LSE_GRADIENT skips this
            d_logits = d_logits + p * np.asarray(dlse, np.float64)[..., None]
        softcap = params.get("softcap", 0.0)
        d_s = d_logits * (1 - np.tanh(f["s"] / softcap) ** 2) if softcap > 0 else d_logits
        grads = {
            "q": f["scale"] * np.einsum("bhqk,bhkd->bhqd", d_s, f["k_h"]),
            "k": _reduce_group(f["scale"] * np.einsum("bhqk,bhqd->bhkd", d_s, f["q"]), f["group"], bug),
            "v": _reduce_group(dv_h, f["group"], bug),
        }
        if params.get("bias") is not None:
            grads["bias"] = _reduce_to(d_logits, np.shape(params["bias"]), bug)
        return grads


def _reduce_group(per_query_head: np.ndarray, group: int, bug) -> np.ndarray:
    """(B, Hq, N, D) -> (B, Hkv, N, D): the sum over the query heads that read each kv head."""
    b, hq, n, d = per_query_head.shape
    grouped = per_query_head.reshape(b, hq // group, group, n, d)
    if bug == "MULTI_QUERY":
        return grouped[:, :, 0]  # bug MULTI_QUERY
    if bug == "GQA_GRAD_REDUCTION":
        return grouped.mean(axis=2)  # bug GQA_GRAD_REDUCTION
    return grouped.sum(axis=2)


def _reduce_to(full: np.ndarray, shape: tuple, bug) -> np.ndarray:
    """The gradient of a bias of ``shape`` broadcast to ``full.shape``: summed over broadcast axes."""
    reduce = np.mean if bug == "BIAS_BROADCAST" else np.sum  # bug BIAS_BROADCAST
    lead = full.ndim - len(shape)
    full = reduce(full, axis=tuple(range(lead))) if lead else full
    axes = tuple(a for a, n in enumerate(shape) if n == 1 and full.shape[a] != 1)
    return reduce(full, axis=axes, keepdims=True) if axes else full


CORRECT = SmallAttention()
WRONG = {flag: SmallAttention(bug=flag) for flag in BUGS}
