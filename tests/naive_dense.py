"""A second, independent formulation of dense attention for the tests:
plain Python loops over one query row at a time, with math.exp, written from
spec/dense.md without using any of refattn's code.
"""

import math

import numpy as np


def naive_dense(q, k, v, *, mask=None, bias=None, causal=False, causal_alignment="bottom_right",
                window=None, scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0):  # fmt: skip
    b_size, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    full = (b_size, hq, nq, nk)
    mask = np.broadcast_to(mask, full) if mask is not None else np.ones(full, bool)
    bias = np.broadcast_to(bias, full) if bias is not None else np.zeros(full)
    keep = np.broadcast_to(dropout_keep, full) if dropout_keep is not None else np.ones(full, bool)
    out = np.zeros((b_size, hq, nq, dv))
    lse = np.full((b_size, hq, nq), -math.inf)
    for b in range(b_size):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(nq):
                pos = i + (nk - nq if causal_alignment == "bottom_right" else 0)
                logits = {}
                for j in range(nk):
                    if not mask[b, h, i, j]:
                        continue
                    if causal and j > pos:
                        continue
                    if window is not None:
                        left, right = window
                        if left is not None and j < pos - left:
                            continue
                        if right is not None and j > pos + right:
                            continue
                    s = scale * sum(float(q[b, h, i, t]) * float(k[b, g, j, t]) for t in range(d))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    logits[j] = s + float(bias[b, h, i, j])
                if not logits:
                    continue
                top = max(logits.values())
                total = sum(math.exp(s - top) for s in logits.values())
                lse[b, h, i] = top + math.log(total)
                for j, s in logits.items():
                    weight = math.exp(s - top) / total
                    if keep[b, h, i, j]:
                        out[b, h, i] += weight / (1.0 - dropout_p) * v[b, g, j]
    return out, lse
