"""The device check of the GPU path (issue 19): verify every ``cupy`` backend, time it against SDPA and Flex.

One run, on one GPU, in under 8 minutes: no verification starts after ``--verify-budget-s`` (240)
seconds, no measurement is started that its prediction says would end after ``--budget-s`` (360),
and gpu_check.sh stops the run at 470 seconds.

1. **Verify**: every registered mechanism whose backends include ``"cupy"`` runs
   :func:`refattn.verify` through that backend against every conformance case, in float64 and
   float32, with gradients (what ``python -m pytest -q -m gpu tests/test_xp_path.py`` checks), in
   tiles of 16 x 32 so that the cases (N <= 80) cross tile edges.
2. **Check the Flex expressions**: for each mechanism whose function FlexAttention expresses
   (:data:`FLEX`: a ``score_mod`` and/or a ``mask_mod`` built from the problem's own arguments; why
   the others are not, :data:`FLEX_NOT_EXPRESSED`), eager ``flex_attention`` on the CPU against
   refattn's reference at N = 24 and 40 (windows scaled down), float64 and float32: ``flex_matches``.
   An expression that does not match is not timed.
3. **Time**: size by size (4K, 16K, 64K: ``--sizes``), PyTorch's CUDA ``scaled_dot_product_attention``
   and then each of those mechanisms (dense first) with a problem in :data:`PROBLEMS`, B = 1, H = 8,
   D = 64, N = Nq = Nk, float32 and float64: the forward and the backward of its tiled xp algorithm
   under CuPy in tiles of 1024 x 1024, with q, k, v already on the device (as a kernel author's are)
   and results left there. The backward is given the forward's result (``saved``), as autograd gives
   SDPA its own. Each time is the fastest of ``--repeats`` calls after one warm-up call, synchronised.
   ``--numba-sizes`` adds each mechanism's Numba forward on the machine's CPU. Then, size by size
   (``--flex-sizes``), each matching Flex expression: ``torch.compile(flex_attention)``,
   compiled once per (mechanism, dtype, N) before the timed calls (its compile time is predicted
   into the budget), forward and autograd backward, q, k, v on the device, and the largest
   difference of its output from the xp algorithm's on the same inputs.

It writes ``gpu_check.md`` (the tables) and ``gpu_check.json`` to ``$OUT`` (or ``./gpu_check_out``).
It installs nothing: CuPy, PyTorch and Numba are expected, and each missing one is named at the start
(and in the output); without CuPy and a device only ``--dry-run`` can run.

``--dry-run`` runs the same steps on the CPU with NumPy standing in for CuPy (the xp algorithm's
tested form), PyTorch's CPU SDPA and eager Flex (forward only: it has no CPU backward), at tiny N:
it checks the script, not the GPU.

    bash benchmarks/gpu_check.sh                      # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --sizes 32 --mechanisms dense
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

import refattn
from refattn.core import registry
from refattn.core import xp as core_xp
from refattn.core.results import Cotangents
from refattn.dense.inputs import DenseInputs
from refattn.lowrank.performer.reference import orthogonal_features
from refattn.position.t5 import reference as t5_reference

BATCH, HEADS, HEAD_DIM = 1, 8, 64
#: The model width H · D: the feature count of the mechanisms that read token vectors, not heads.
WIDTH = HEADS * HEAD_DIM
#: Mechanisms with no VJP (the centroid update runs outside autograd): their forward only is timed.
FORWARD_ONLY = {"centroid_ema"}
#: Mechanisms whose results include an (Nq, Nk) array made on the host (their aux): timed up to this N.
HOST_AUX_MAX_N = {"t5": 16384, "shaw": 16384}


# --- what is installed ------------------------------------------------------------


def tools(dry_run: bool) -> dict:
    """``{"cupy" | "torch" | "numba": (module or None, a line saying what was found)}``."""
    found = {}
    cupy = core_xp.cupy_or_none()
    found["cupy"] = (cupy, "CuPy with a CUDA device" if cupy else f"MISSING: CuPy or a CUDA device ({core_xp.INSTALL_HINT})")
    try:
        import torch

        usable = dry_run or torch.cuda.is_available()
        line = f"PyTorch {torch.__version__}" + ("" if usable else ": MISSING a CUDA device (no SDPA column)")
        found["torch"] = (torch if usable else None, line)
    except ImportError:
        found["torch"] = (None, "MISSING: PyTorch (no SDPA column)")
    try:
        import numba

        found["numba"] = (numba, f"Numba {numba.__version__}")
    except ImportError:
        found["numba"] = (None, "MISSING: Numba (the CPU backends it compiles cannot be compared)")
    return found


# --- the problems -------------------------------------------------------------------


def _positions(n: int) -> dict:
    return dict(q_positions=np.arange(n), k_positions=np.arange(n))


def _scaled(rng, shape: tuple, fan_in: int) -> np.ndarray:
    """Standard normal entries divided by sqrt(fan_in): a projection that keeps O(1) inputs O(1)."""
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def _qkv(n: int, rng) -> dict:
    """q, k, v as gpu_check's ``qkv`` draws them (B, H, N, D)."""
    return {key: rng.standard_normal((BATCH, HEADS, n, HEAD_DIM)) for key in "qkv"}


def _multilevel(n: int, rng) -> dict:
    """HAN's two levels over tokens of the model width: sentences of 64 tokens, then one document over
    the sentences; attention pooling (W, b and the context vector u of width D) at each level."""
    segments = np.stack([np.arange(n) // 64, np.zeros(n, np.int64)])  # (L = 2, N)
    return dict(segments=segments, wq=_scaled(rng, (2, WIDTH, HEAD_DIM), WIDTH),
                wk=_scaled(rng, (2, WIDTH, HEAD_DIM), WIDTH), wv=_scaled(rng, (2, WIDTH, WIDTH), WIDTH),
                aggregate="attention_pool", pool_w=_scaled(rng, (2, WIDTH, HEAD_DIM), WIDTH),
                pool_b=rng.standard_normal((2, HEAD_DIM)), context=_scaled(rng, (2, HEAD_DIM), HEAD_DIM))  # fmt: skip


#: Each mechanism's own arguments for the benchmark problem (q, k, v are added), by N and a generator.
PROBLEMS = {
    "dense": lambda n, rng: {},
    "sliding_window": lambda n, rng: dict(window_size=1024, convention="mistral"),
    "alibi": lambda n, rng: _positions(n),
    "rope": lambda n, rng: _positions(n),
    "logn": lambda n, rng: dict(training_length=4096),
    "t5": lambda n, rng: dict(table=rng.standard_normal((32, HEADS)), **_positions(n)),
    # scale_base 8192 (512 by default): the keys' factor ζ^(−n / scale_base) then stays within float32 at 64K.
    "xpos": lambda n, rng: dict(scale_base=8192.0, **_positions(n)),
    "ssmax": lambda n, rng: dict(s=np.full(HEADS, 0.4)),
    "shaw": lambda n, rng: dict(rel_k=rng.standard_normal((129, HEAD_DIM)), rel_v=rng.standard_normal((129, HEAD_DIM)),
                                max_relative_position=64, **_positions(n)),  # fmt: skip
    "transformer_xl": lambda n, rng: dict(r=rng.standard_normal((HEADS, n, HEAD_DIM)) / 8, u=rng.standard_normal((HEADS, HEAD_DIM)),
                                          v_bias=rng.standard_normal((HEADS, HEAD_DIM)), causal=True, **_positions(n)),  # fmt: skip
    "differential": lambda n, rng: dict({f"lambda_{name}": rng.standard_normal(HEAD_DIM) / 8
                                         for name in ("q1", "k1", "q2", "k2")}, depth=0),  # fmt: skip
    # N = 64 · 2**k at every size (N / 2 at small N): the paper's hierarchy, log2(N / 64) levels.
    "h1d": lambda n, rng: dict(block_size=min(64, n // 2)),
    # Block-sparse family: a band of 512 (and a global token per 4K), BigBird's 64-blocks (N / 8 at
    # small N) with 3 random blocks per row block, 256-token windows and segments.
    "longformer": lambda n, rng: dict(attention_window=512, global_tokens=(np.arange(n) % 4096 == 0)[None]),
    "bigbird": lambda n, rng: _bigbird(min(64, n // 8), n, rng),
    "local": lambda n, rng: dict(window_size=min(256, n), causal=True),
    "segmented": lambda n, rng: dict(segment_len=min(256, n), causal=True, integration="lse_merge"),
    # Reformer's 4 rounds of 64 buckets in chunks of 64; routing's N / 256 clusters of 256.
    "lsh": lambda n, rng: dict(rotations=rng.standard_normal((HEADS, 4, HEAD_DIM, 32)), num_buckets=64, num_hashes=4,
                               chunk_len=64),  # fmt: skip
    "routing": lambda n, rng: dict(centroids=rng.standard_normal((HEADS, max(n // 256, 1), HEAD_DIM)),
                                   cluster_size=min(256, n)),  # fmt: skip
    # Low-rank family: Linformer's k = 256 projections, E and F each shared by the heads (entries
    # N(0, 1 / N): E K stays O(1) at any N); Performer's M = 256 orthogonal features, bidirectional;
    # Nyström's 64 landmarks (N at small N), 6 pseudo-inverse iterations and the 33-tap convolution
    # of V; rank-256 positive factors for the generic form (OWN_ARRAYS).
    "linformer": lambda n, rng: dict(e=_scaled(rng, (256, n), n), f=_scaled(rng, (256, n), n)),
    "performer": lambda n, rng: dict(omega=orthogonal_features(rng, 256, HEAD_DIM)),
    "nystrom": lambda n, rng: dict(num_landmarks=min(64, n), pinv_iterations=6,
                                   conv_kernel=_scaled(rng, (HEADS, 33), 33)),
    "lowrank": lambda n, rng: dict(normalized=True),
    # Memory family, causal streams: segments of 512 with a memory of 512 (Transformer-XL, with its
    # relative scores over the 1024 distances a step sees), and a compressed memory of 512 filled at
    # rate 4 by the 1D convolution (Compressive); Infini-attention's segments of 2048; RMT's 10 memory
    # tokens (OWN_ARRAYS) around segments of 512 (N at small N: they must divide N); StreamingLLM's 4
    # sinks and 2000 recent tokens, the stream fed in steps of 512 (token by token is N host round trips).
    "xl_recurrence": lambda n, rng: dict(segment_len=512, mem_len=512,
                                         r=rng.standard_normal((HEADS, 1024, HEAD_DIM)) / 8,
                                         u=rng.standard_normal((HEADS, HEAD_DIM)),
                                         v_bias=rng.standard_normal((HEADS, HEAD_DIM))),  # fmt: skip
    "compressive": lambda n, rng: dict(segment_len=512, mem_len=512, compressed_len=512, rate=4, compression="conv",
                                       conv_weight_k=_scaled(rng, (HEAD_DIM, HEAD_DIM, 4), 4 * HEAD_DIM),
                                       conv_weight_v=_scaled(rng, (HEAD_DIM, HEAD_DIM, 4), 4 * HEAD_DIM)),  # fmt: skip
    "infini": lambda n, rng: dict(segment_len=2048, beta=rng.standard_normal(HEADS)),
    "memory_tokens": lambda n, rng: dict(segment_len=min(512, n)),
    "sinks": lambda n, rng: dict(sink_count=4, recent_size=2000, segment_len=512),
    # Routing family, as routing's problem: N / 256 centroids, clusters of 256. The hybrid layer has 4
    # local heads (a causal window of 256) and 4 routing heads; the centroid update is one step of the
    # canonical VQ moving average (decay 0.999) over the queries and keys; soft routing mixes a causal
    # path and a causal window of 512, routed by the tokens' H · D features (OWN_ARRAYS).
    "routing_hybrid": lambda n, rng: dict(num_local_heads=HEADS // 2, cluster_size=min(256, n),
                                          centroids=rng.standard_normal((HEADS // 2, max(n // 256, 1), HEAD_DIM)),
                                          local_window=(255, 0), causal=True),  # fmt: skip
    "centroid_ema": lambda n, rng: dict(centroids=rng.standard_normal((HEADS, max(n // 256, 1), HEAD_DIM))),
    "soft_routing": lambda n, rng: dict(routing_weights=_scaled(rng, (WIDTH, 2), WIDTH), path_causal=[True, True],
                                        path_window=[None, (511, 0)]),  # fmt: skip
    # Hierarchical: HAN's sentences of 64 tokens under one document (OWN_ARRAYS: token vectors).
    "multilevel": _multilevel,
}


def _bigbird(block_size: int, n: int, rng) -> dict:
    """BigBird's blocks and 3 random key blocks per middle query block, drawn from the blocks 1 ... nb − 2."""
    blocks = n // block_size
    return dict(block_size=block_size, random_blocks=rng.integers(1, blocks - 1, (HEADS, blocks - 2, 3)))


#: The arrays that replace :func:`qkv`'s q, k, v (cast to the problem's dtype with them), for mechanisms whose
#: data are not only q, k, v (B, H, N, D).
OWN_ARRAYS = {
    # U (B, H, N, r) and W (B, H, r, N) in (0, 1): every row sum of U W is positive (normalized=True);
    # W / N keeps W V O(1) at any N.
    "lowrank": lambda n, rng: dict(u=rng.random((BATCH, HEADS, n, 256)), w=rng.random((BATCH, HEADS, 256, n)) / n,
                                   v=rng.standard_normal((BATCH, HEADS, n, HEAD_DIM))),  # fmt: skip
    # HAN reads token vectors x (B, N, C), C = H · D, no heads.
    "multilevel": lambda n, rng: dict(x=rng.standard_normal((BATCH, n, WIDTH))),
    # q, k, v, and the router's features x (B, N, H · D): data, in the problem's dtype.
    "soft_routing": lambda n, rng: dict(_qkv(n, rng), x=rng.standard_normal((BATCH, n, WIDTH))),
    # q, k, v, RMT's initial memory (B, m = 10, H · D) (a previous segment's outputs) and its projections
    # W_q, W_k, W_v (H · D, H, D): all in the problem's dtype, since the wrapped segment's q, k, v take
    # the dtype of memory · W (NumPy's promotion: float64 weights would make a float32 problem float64).
    "memory_tokens": lambda n, rng: dict(_qkv(n, rng), memory=rng.standard_normal((BATCH, 10, WIDTH)),
                                         **{name: _scaled(rng, (WIDTH, HEADS, HEAD_DIM), WIDTH)
                                            for name in ("w_q", "w_k", "w_v")}),  # fmt: skip
}


def qkv(name: str, n: int, rng) -> dict:
    """q, k, v of the benchmark shape (differential: 2H query and key heads, values 2D wide), or the
    mechanism's :data:`OWN_ARRAYS`."""
    if name in OWN_ARRAYS:
        return OWN_ARRAYS[name](n, rng)
    if name == "differential":
        shapes = (2 * HEADS, HEAD_DIM), (2 * HEADS, HEAD_DIM), (HEADS, 2 * HEAD_DIM)
    else:
        shapes = (HEADS, HEAD_DIM), (HEADS, HEAD_DIM), (HEADS, HEAD_DIM)
    arrays = {key: rng.standard_normal((BATCH, heads, n, dim)) for key, (heads, dim) in zip("qkv", shapes)}
    return {"qk": arrays["q"], "v": arrays["v"]} if name == "lsh" else arrays  # LSH shares queries and keys


def arguments(name: str, dtype: str, n: int, seed: int = 0, overrides: dict | None = None) -> dict:
    """The keyword arguments of the mechanism's public function for the benchmark problem, arrays in
    ``dtype``; ``overrides`` replace some of the problem's own after its random draws (a smaller window)."""
    rng = np.random.default_rng(seed)
    given = {key: value.astype(dtype) for key, value in qkv(name, n, rng).items()}
    given.update(PROBLEMS[name](n, rng))
    given.update(overrides or {})
    return given


def checked(name: str, dtype: str, n: int, seed: int = 0, overrides: dict | None = None):
    """The mechanism's checked inputs for the benchmark problem, arrays in ``dtype``."""
    mechanism = registry.get(name)
    bound = inspect.signature(mechanism.forward).bind_partial(**arguments(name, dtype, n, seed, overrides))
    bound.apply_defaults()
    return mechanism.check_inputs(**{k: v for k, v in bound.arguments.items() if k not in ("precision", "backend")})


def on_device(x, xp):
    """Checked inputs ``x`` with every floating-point array in them (q, k, v, projections, tables...) moved to
    the device, as a kernel author's are: the timed calls then move nothing from the host. Integer and
    boolean arrays (positions, masks, assignments) stay, as the checks made them."""
    return core_xp.map_leaves(x, lambda leaf: xp.asarray(leaf) if isinstance(leaf, np.ndarray)
                              and leaf.dtype.kind == "f" else leaf)  # fmt: skip


# --- step 1: verify -----------------------------------------------------------------


def verify_all(names: list[str], dtypes: list[str], deadline: float) -> list[dict]:
    """One row per (mechanism, dtype): the cupy backend against every case, forward and gradients; none
    starts after ``deadline`` (a ``time.perf_counter()`` value): those rows say so and count as failed."""
    rows = []
    for name in names:
        for dtype in dtypes:
            start = time.perf_counter()
            if start > deadline:
                rows.append(dict(mechanism=name, dtype=dtype, ok=False, counts={}, seconds=0.0,
                                 failures="not run: time budget of the verification"))  # fmt: skip
                continue
            report = refattn.verify(mechanism=name, backend="cupy", dtype=dtype, grad=True)
            counts = report.counts()
            rows.append(dict(mechanism=name, dtype=dtype, ok=bool(report.ok), counts=counts,
                             seconds=round(time.perf_counter() - start, 1),
                             failures="" if report.ok else report.format()[-2000:]))  # fmt: skip
            print(f"verify {name:16s} {dtype}: {'ok' if report.ok else 'FAILED'} {counts}", flush=True)
    return rows


# --- step 2: FlexAttention's expressions ---------------------------------------------
#
# FlexAttention: pytorch/pytorch, torch/nn/attention/flex_attention.py, flex_attention and
# create_block_mask (commit c98133c32fecc80f5cdea0af129d21337211d7bf; PyTorch 2.13 here).
# Each builder states a benchmark problem for torch.nn.attention.flex_attention from the mechanism's
# checked inputs (the problem's own arguments), so that the timed Flex call computes refattn's function.
# score_mod(score, b, h, q_idx, kv_idx) changes one score (score = scale · q · k); mask_mod(b, h, q_idx,
# kv_idx) keeps a key or drops it (b batch row, h head, q_idx query, kv_idx key). What a builder
# captures is a tensor or a constant that does not grow with N (no (N, N) array).


class FlexProblem(NamedTuple):
    """One problem as Flex takes it: q, k (B, H, N, D), v (B, H, N, Dv) torch tensors, the scale, the score
    and mask changes (None: none)."""

    q: object
    k: object
    v: object
    scale: float
    score_mod: object = None
    mask_mod: object = None


def _tensor(torch, device: str, array: np.ndarray):
    """``array`` as a torch tensor on ``device`` (its dtype kept)."""
    return torch.as_tensor(np.ascontiguousarray(array), device=device)


def _dense_flex(d: DenseInputs, torch, device: str, score_mod=None) -> FlexProblem:
    """Dense attention's part of a problem: q, k, v, the scale and the causal/window mask, with
    ``score_mod``. The problems give no user mask, bias, soft-cap or dropout; a problem that did is refused."""
    given = [name for name, value in (("mask", d.mask), ("bias", d.bias), ("dropout_keep", d.dropout_keep),
                                      ("softcap", d.softcap or None)) if value is not None]  # fmt: skip
    if given:
        raise NotImplementedError(f"no Flex expression written for the dense arguments {given}")
    q, k, v = (_tensor(torch, device, array) for array in (d.q, d.k, d.v))
    return FlexProblem(q, k, v, d.scale, score_mod, _position_mask_mod(d))


def _position_mask_mod(d: DenseInputs):
    """Keys ``j <= i'`` (causal) and ``i' - left <= j <= i' + right`` (window), ``i'`` the query's position
    on the key axis (``i + Nk - Nq`` bottom-right aligned); None when neither restricts."""
    causal, (left, right) = d.causal, d.window or (None, None)
    if not causal and left is None and right is None:
        return None
    offset = d.shape.kv_len - d.shape.q_len if d.causal_alignment == "bottom_right" else 0

    def mask_mod(b, h, q_idx, kv_idx):
        aligned = q_idx + offset
        keep = kv_idx >= 0
        if causal:
            keep = keep & (kv_idx <= aligned)
        if left is not None:
            keep = keep & (kv_idx >= aligned - left)
        if right is not None:
            keep = keep & (kv_idx <= aligned + right)
        return keep

    return mask_mod


def flex_dense(x: DenseInputs, torch, device: str) -> FlexProblem:
    """Dense attention, and sliding windows (their checked inputs are dense's with a window and causality)."""
    return _dense_flex(x, torch, device)


def flex_local(x, torch, device: str) -> FlexProblem:
    """local-attention's pattern (step 3 of refattn.segmented.local): query block ``i // ws`` sees key blocks
    ``i // ws - look_backward ... i // ws + look_forward``, ``j <= i`` when causal, trimmed to
    ``i - ws lb <= j <= i + ws lf`` with exact_windowsize. Its other steps change q, k or add a key: refused."""
    if x.shared_qk or x.rotary or x.padded_len != x.shape.q_len:
        raise NotImplementedError("no Flex expression written for shared_qk, rotary or padding")
    ws, lb, lf, causal, exact = x.window_size, x.look_backward, x.look_forward, x.causal, x.exact_windowsize

    def mask_mod(b, h, q_idx, kv_idx):
        q_block, kv_block = q_idx // ws, kv_idx // ws
        keep = (kv_block >= q_block - lb) & (kv_block <= q_block + lf)
        if causal:
            keep = keep & (kv_idx <= q_idx)
        if exact:
            keep = keep & (kv_idx >= q_idx - ws * lb)
            if not causal:
                keep = keep & (kv_idx <= q_idx + ws * lf)
        return keep

    q, k, v = (_tensor(torch, device, array) for array in (x.q, x.k, x.v))
    return FlexProblem(q, k, v, x.scale, mask_mod=mask_mod)


def flex_alibi(x, torch, device: str) -> FlexProblem:
    """ALiBi's (A1)-(A2): the score plus ``m_h · (p_j − p_i)`` (form "causal") or ``−m_h · |p_j − p_i|``."""
    slopes = _tensor(torch, device, x.slopes.astype(x.dense.q.dtype))  # (H,)
    q_positions, k_positions = _tensor(torch, device, x.q_positions), _tensor(torch, device, x.k_positions)
    symmetric = x.form == "symmetric"

    def score_mod(score, b, h, q_idx, kv_idx):
        distance = k_positions[kv_idx] - q_positions[q_idx]
        if symmetric:
            distance = -distance.abs()
        return score + slopes[h] * distance

    return _dense_flex(x.dense, torch, device, score_mod)


def flex_t5(x, torch, device: str) -> FlexProblem:
    """T5's (T1)-(T3): the score plus ``table[bucket(p_j − p_i), h]``. The bias of every distance that
    occurs is gathered once, (H, R) by distance from the smallest, R <= Nq + Nk − 1."""
    smallest = int(x.k_positions.min() - x.q_positions.max())
    distances = np.arange(smallest, int(x.k_positions.max() - x.q_positions.min()) + 1)  # (R,)
    rule = x.bucketing
    buckets = t5_reference.relative_position_bucket(distances, rule.bidirectional, rule.num_buckets, rule.max_distance)
    by_distance = _tensor(torch, device, x.table[buckets].T.astype(x.dense.q.dtype))  # (H, R)
    q_positions = _tensor(torch, device, x.q_positions)
    k_from_smallest = _tensor(torch, device, x.k_positions - smallest)  # p_j − smallest: the distance's index + p_i

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + by_distance[h, k_from_smallest[kv_idx] - q_positions[q_idx]]

    return _dense_flex(x.dense, torch, device, score_mod)


def flex_logn(x, torch, device: str) -> FlexProblem:
    """Log-n's (L1)-(L2): the score times ``log n``, or with ``training_length`` L, row i at position
    ``p_i = i + Nk − Nq`` times ``log(p_i + 1) / log L`` where ``p_i + 1 > L`` (1 elsewhere)."""
    shape = x.dense.shape
    if x.training_length is None:
        factor = np.full(shape.q_len, np.log(x.n))
    else:
        count = np.arange(shape.q_len) + shape.kv_len - shape.q_len + 1  # (Nq,) p_i + 1
        factor = np.where(count > x.training_length, np.log(count) / np.log(x.training_length), 1.0)
    factor = _tensor(torch, device, factor.astype(x.dense.q.dtype))  # (Nq,)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * factor[q_idx]

    return _dense_flex(x.dense, torch, device, score_mod)


def flex_ssmax(x, torch, device: str) -> FlexProblem:
    """SSMax's (S1)-(S3) where every row attends to all Nk keys (nothing masked, or n_rule "axis_length"):
    the score times the head's ``s_h · log Nk + s_bias_h``. Counts that vary by row are refused."""
    d = x.dense
    if x.n_rule == "attended" and (d.causal or d.window is not None or d.mask is not None):
        raise NotImplementedError("no Flex expression written for SSMax's per-row counts under a mask")
    heads = d.shape.q_heads
    s, s_bias = (np.broadcast_to(np.asarray(value, dtype=np.float64), (heads,)) for value in (x.s, x.s_bias))
    factor = _tensor(torch, device, (s * np.log(d.shape.kv_len) + s_bias).astype(d.q.dtype))  # (H,)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * factor[h]

    return _dense_flex(d, torch, device, score_mod)


def flex_longformer(x, torch, device: str) -> FlexProblem:
    """Longformer without global projections: the band ``|i − j| <= w / 2``, every global key, and every
    key for a global query (steps 1-3 of refattn.segmented.longformer, one q, k, v)."""
    if x.projections or x.padded_len != x.shape.q_len:
        raise NotImplementedError("no Flex expression written for global projections or padding")
    one_sided = x.one_sided
    is_global = _tensor(torch, device, x.global_tokens)  # (B, N)

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= one_sided) | is_global[b, kv_idx] | is_global[b, q_idx]

    q, k, v = (_tensor(torch, device, array) for array in (x.q, x.k, x.v))
    return FlexProblem(q, k, v, x.scale, mask_mod=mask_mod)


def flex_bigbird(x, torch, device: str) -> FlexProblem:
    """BigBird ITC, each listed block once (steps 1-4 of refattn.segmented.bigbird): query block t sees key
    block s where ``|t − s| <= 1``, s or t is 0 or nb − 1, or s is one of t's random blocks; a per-head
    (H, nb, nb) table of the listed blocks, looked up by ``(h, q_idx // bs, kv_idx // bs)``."""
    if x.extra_global_tokens or x.count_repeated_blocks or x.full_attention:
        raise NotImplementedError("no Flex expression written for ETC, repeated blocks or the short-sequence rule")
    nb, bs = x.num_blocks, x.block_size
    blocks = np.arange(nb)
    listed = np.abs(blocks[:, None] - blocks[None, :]) <= 1  # (t, s) sliding
    listed |= np.isin(blocks, (0, nb - 1))[:, None] | np.isin(blocks, (0, nb - 1))[None, :]  # global rows, columns
    listed = np.repeat(listed[None], x.shape.q_heads, axis=0)  # (H, nb, nb)
    heads, rows, _ = np.indices(x.random_blocks.shape)
    listed[heads, rows + 1, x.random_blocks] = True  # ITC: row t − 1 holds middle block t's random blocks
    listed = _tensor(torch, device, listed)

    def mask_mod(b, h, q_idx, kv_idx):
        return listed[h, q_idx // bs, kv_idx // bs]

    q, k, v = (_tensor(torch, device, array) for array in (x.q, x.k, x.v))
    return FlexProblem(q, k, v, x.scale, mask_mod=mask_mod)


#: Mechanism -> builder of its FlexProblem from its checked inputs.
FLEX = {"dense": flex_dense, "sliding_window": flex_dense, "local": flex_local, "alibi": flex_alibi, "t5": flex_t5,
        "logn": flex_logn, "ssmax": flex_ssmax, "longformer": flex_longformer, "bigbird": flex_bigbird}  # fmt: skip
#: Why Flex does not express the other problems' functions: a score_mod sees one score and its indices,
#: a mask_mod keeps or drops one key.
FLEX_NOT_EXPRESSED = {
    "rope": "rotates q and k: not a mask/score change",
    "xpos": "rotates and scales q and k: not a mask/score change",
    "shaw": "adds rel_v to the output: not a mask/score change",
    "transformer_xl": "adds q · r_(i−j), an (N, N) term: not a mask/score change",
    "differential": "subtracts two softmaxes: not one attention",
    "h1d": "attends to coarsened keys: not a mask/score change",
    "segmented": "merges segment-summary keys: not a mask/score change",
    "lsh": "hashes, sorts and chunks by the data: not a fixed mask",
    "routing": "clusters by the data: not a fixed mask",
    "routing_hybrid": "clusters its routing heads by the data: not a fixed mask",
    "soft_routing": "mixes attention paths by the data: not one attention",
    "centroid_ema": "updates centroids: not attention",
    "linformer": "projects keys and values along the sequence: not a mask/score change",
    "nystrom": "approximates the softmax through landmarks: not a mask/score change",
    "performer": "replaces the softmax with random features: not a mask/score change",
    "lowrank": "factored weights, no scores: not a mask/score change",
    "xl_recurrence": "carries a memory between segments: not one attention",
    "compressive": "carries compressed memories between segments: not one attention",
    "infini": "adds a linear-attention memory: not one attention",
    "memory_tokens": "wraps segments in memory tokens: not one attention",
    "sinks": "evicts from a cache between steps: not one attention",
    "multilevel": "pools sentences, then attends over them: not one attention",
}
#: The check's problems at small N: windows and blocks scaled down to fit N = 24 and 40.
FLEX_CHECK_OVERRIDES = {"sliding_window": dict(window_size=5), "local": dict(window_size=8),
                        "logn": dict(training_length=16), "longformer": dict(attention_window=6)}  # fmt: skip
FLEX_CHECK_SIZES = (24, 40)
#: Seconds predicted for compiling Flex's forward and backward before one is measured (a guess, on the safe side).
FLEX_COMPILE_GUESS_S = 30.0
#: Largest accepted |Flex − refattn| of out and lse (relative above 1), by dtype.
FLEX_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


def flex_call(flex, problem: FlexProblem, block_mask, **options):
    """``flex(q, k, v)`` with the problem's changes, block mask and scale."""
    grouped = problem.q.shape[1] != problem.k.shape[1]
    return flex(problem.q, problem.k, problem.v, score_mod=problem.score_mod, block_mask=block_mask,
                scale=problem.scale, enable_gqa=grouped, **options)  # fmt: skip


def block_mask_of(torch, problem: FlexProblem, n: int, device: str):
    """The problem's BlockMask (N = Nq = Nk), per batch row and head (BigBird's differs by head), or None."""
    if problem.mask_mod is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    # On CUDA the mask is built compiled, without an (N, N) intermediate.
    batch, heads = problem.q.shape[:2]
    return create_block_mask(problem.mask_mod, batch, heads, n, n, device=device, _compile=device == "cuda")


def eager_flex(*args, **kwargs):
    """``flex_attention`` uncompiled (it then materialises the scores: tiny N only), without its warning saying so."""
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def flex_check(names: list[str], torch) -> list[dict]:
    """One row per (mechanism, dtype, N): its Flex expression, eager on the CPU, against refattn's reference
    (the public function, backend "reference") on the same inputs at small N; ``matches`` when out and lse
    agree within :data:`FLEX_TOLERANCE`."""
    from torch.nn.attention.flex_attention import AuxRequest

    rows = []
    for name in (name for name in names if name in FLEX):
        for dtype in ("float64", "float32"):
            for n in FLEX_CHECK_SIZES:
                overrides = FLEX_CHECK_OVERRIDES.get(name)
                expected = registry.get(name).forward(**arguments(name, dtype, n, overrides=overrides))
                problem = FLEX[name](checked(name, dtype, n, overrides=overrides), torch, "cpu")
                out, aux = flex_call(eager_flex, problem, block_mask_of(torch, problem, n, "cpu"),
                                     return_aux=AuxRequest(lse=True))  # fmt: skip
                error = max(_relative_error(out.numpy(), expected.out), _relative_error(aux.lse.numpy(), expected.lse))
                mods = [mod for mod in ("score_mod", "mask_mod") if getattr(problem, mod) is not None]
                rows.append(dict(mechanism=name, dtype=dtype, n=n, mods=mods, error=error,
                                 matches=bool(error <= FLEX_TOLERANCE[dtype])))  # fmt: skip
        print(f"flex   {name:16s} matches refattn: {all(row['matches'] for row in rows if row['mechanism'] == name)}",
              flush=True)  # fmt: skip
    return rows


def _relative_error(ours, expected, xp=np) -> float:
    """Largest ``|ours − expected| / max(1, |expected|)`` of two arrays of namespace ``xp``."""
    return float(xp.max(xp.abs(ours - expected) / xp.maximum(1.0, xp.abs(expected))))


def flex_matches(check_rows: list[dict]) -> dict:
    """``{mechanism: every check row matched}``."""
    matches = {}
    for row in check_rows:
        matches[row["mechanism"]] = matches.get(row["mechanism"], True) and row["matches"]
    return matches


# --- step 3: time -------------------------------------------------------------------


def fastest(call, sync, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` synchronised calls, after one warm-up call."""
    call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def xp_problem(name: str, dtype: str, n: int, xp):
    """The mechanism's xp module and its checked inputs for the benchmark problem, q, k, v on the device (on
    the host for a module whose streaming steps run there, ``STEPS_ON_HOST``: refattn/core/xp.py)."""
    module, x = importlib.import_module(f"{registry.get(name).package}.xp"), checked(name, dtype, n)
    return module, x if getattr(module, "STEPS_ON_HOST", False) else on_device(x, xp)


def time_xp(name: str, dtype: str, n: int, xp, sync, repeats: int) -> dict:
    """Forward and backward seconds of the mechanism's xp algorithm, inputs and results on the device."""
    module, x = xp_problem(name, dtype, n, xp)
    saved = module.forward(x, xp)
    dout = xp.asarray(np.random.default_rng(1).standard_normal(saved.out.shape).astype(dtype))
    cotangents = Cotangents(dout, None)
    forward = fastest(lambda: module.forward(x, xp), sync, repeats)
    if name in FORWARD_ONLY:
        return dict(forward=forward)
    return dict(forward=forward, backward=fastest(lambda: module.vjp(x, cotangents, xp, saved), sync, repeats))


def time_sdpa(torch, dtype: str, n: int, device: str, repeats: int) -> dict:
    """Forward and backward seconds of PyTorch's SDPA (B, H, N, D) on ``device``; "OOM" when it does not fit."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, dtype=getattr(torch, dtype), device=device,
                           generator=generator, requires_grad=True) for _ in range(3))  # fmt: skip
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        forward = fastest(lambda: sdpa(q, k, v), sync, repeats)
        out = sdpa(q, k, v)
        dout = torch.randn_like(out)
        backward = fastest(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), sync, repeats)
    except torch.cuda.OutOfMemoryError:
        return dict(forward="OOM", backward="OOM")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return dict(forward=forward, backward=backward)


def time_flex(name: str, dtype: str, n: int, torch, flex, device: str, repeats: int, xp) -> dict:
    """Seconds of the mechanism's Flex expression on ``device``: ``compile`` (the block mask and the first
    forward and backward calls, which compile), ``forward`` and ``backward``; "OOM" when it does not fit,
    the error's first line as the note when Flex refuses (a dtype its kernels lack). On the dry run's CPU
    ``flex`` is eager and has no backward. ``xp_difference``: the largest relative difference of Flex's
    output from the xp algorithm's on the same inputs (not where the xp rows skip N: a host aux)."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    problem = FLEX[name](checked(name, dtype, n), torch, device)
    problem = problem._replace(**{key: getattr(problem, key).requires_grad_(cuda) for key in "qkv"})
    try:
        begin = time.perf_counter()
        block_mask = block_mask_of(torch, problem, n, device)
        out = flex_call(flex, problem, block_mask)
        generator = torch.Generator(device=device).manual_seed(1)
        dout = torch.randn(out.shape, dtype=out.dtype, device=device, generator=generator)

        def backward():
            return torch.autograd.grad(out, (problem.q, problem.k, problem.v), dout, retain_graph=True)

        if cuda:
            backward()
        sync()
        result = dict(compile=time.perf_counter() - begin)
        result["forward"] = fastest(lambda: flex_call(flex, problem, block_mask), sync, repeats)
        result["backward"] = fastest(backward, sync, repeats) if cuda else None
        result["note"] = "" if cuda else "no backward: FlexAttention has none on the CPU"
        if n <= HOST_AUX_MAX_N.get(name, n):
            module, x = xp_problem(name, dtype, n, xp)
            result["xp_difference"] = _relative_error(xp.asarray(out.detach()), module.forward(x, xp).out, xp)
    except torch.cuda.OutOfMemoryError:
        result = dict(forward="OOM", backward="OOM")
    except Exception as error:  # noqa: BLE001 (whatever Flex raises for what it does not support is the row's note)
        first_line = (str(error).strip().splitlines() or [""])[0]
        result = dict(note=f"{type(error).__name__}: {first_line[:160]}")
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return result


def compiled_flex(torch, device: str):
    """``torch.compile(flex_attention)`` on CUDA, with room for one compilation per (mechanism, dtype, N);
    eager ``flex_attention`` on the CPU (the dry run)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device != "cuda":
        return eager_flex
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 256))
    return torch.compile(flex_attention, dynamic=False)


def time_numba(name: str, dtype: str, n: int, repeats: int) -> dict:
    """Forward seconds of the mechanism's Numba backend on this machine's CPU (the first call compiles)."""
    module = registry.get(name).backend("numba")
    x = checked(name, dtype, n)
    return dict(numba_forward=fastest(lambda: module.forward(x), lambda: None, repeats))


class Budget:
    """Skips a measurement whose predicted time (its fixed part, such as compiling, plus the same row's time
    at the previous N times (N / N_prev)²) would end after ``deadline`` (a ``time.perf_counter()`` value)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.last = {}  # row's key -> (N, seconds) of its latest measurement, compiling excluded

    def measure(self, row: dict, key: tuple, timer, fixed: float = 0.0) -> None:
        """``row.update(timer())``, or the note "skipped: time budget"."""
        n_last, seconds = self.last.get(key, (row["n"], 0.0))
        if time.perf_counter() + fixed + seconds * (row["n"] / n_last) ** 2 > self.deadline:
            row["note"] = "skipped: time budget"
            return
        begin = time.perf_counter()
        row.update(timer())
        self.last[key] = (row["n"], time.perf_counter() - begin - row.get("compile", 0.0))


def time_all(names, dtypes, sizes, xp, sync, torch, device, repeats, budget: Budget,
             numba_sizes=()) -> tuple[list, list]:  # fmt: skip
    """The xp rows and the SDPA rows, size by size (every mechanism at 4K, then at 16K...), so that the
    budget cuts the largest sizes, not the last mechanisms. At ``numba_sizes``, each mechanism's Numba
    forward is timed too."""
    xp_rows, sdpa_rows = [], []
    for n in sizes:
        for dtype in dtypes:
            row = dict(dtype=dtype, n=n, forward=None, backward=None, note="")
            if torch is None:
                row["note"] = "PyTorch missing"
            else:
                budget.measure(row, ("sdpa", dtype), lambda: time_sdpa(torch, dtype, n, device, repeats))
            sdpa_rows.append(row)
        for name in names:
            for dtype in dtypes:
                row = dict(mechanism=name, dtype=dtype, n=n, forward=None, backward=None, note="")
                if name not in PROBLEMS:
                    row["note"] = "no benchmark problem written for it"
                elif n > HOST_AUX_MAX_N.get(name, n):
                    row["note"] = "skipped: its aux is (Nq, Nk) on the host"
                else:
                    budget.measure(row, (name, dtype), lambda: time_xp(name, dtype, n, xp, sync, repeats))
                    if n in numba_sizes and "numba" in registry.get(name).backends:
                        budget.measure(row, (name, dtype, "numba"), lambda: time_numba(name, dtype, n, repeats))
                print(f"time {name:16s} {dtype} N={n}: {row['forward']} {row['backward']} {row['note']}", flush=True)
                xp_rows.append(row)
    xp_rows.sort(key=lambda row: (names.index(row["mechanism"]), row["dtype"], row["n"]))
    sdpa_rows.sort(key=lambda row: (row["dtype"], row["n"]))
    return xp_rows, sdpa_rows


def time_all_flex(names, dtypes, sizes, xp, torch, device, repeats, budget: Budget, matches: dict) -> list:
    """The Flex rows, size by size, after every xp row (the budget cuts Flex before the xp algorithm): each
    mechanism's Flex expression that ``matches`` refattn (``{mechanism: bool}``, :func:`flex_matches`). The
    prediction of a row's compile time is the latest one of its dtype (:data:`FLEX_COMPILE_GUESS_S` before
    the first); a (mechanism, dtype) whose Flex call raised is not tried again at larger N."""
    flex = compiled_flex(torch, device)
    rows, compile_seconds, refused = [], {}, {}  # dtype -> compile seconds; (mechanism, dtype) -> N where it raised
    for n in sizes:
        for name in (name for name in names if name in matches):
            for dtype in dtypes:
                row = dict(mechanism=name, dtype=dtype, n=n, forward=None, backward=None, note="")
                if not matches[name]:
                    row["note"] = "not timed: its Flex expression does not match refattn"
                elif (name, dtype) in refused:
                    row["note"] = f"not timed: Flex raised at N = {refused[name, dtype]}"
                else:
                    budget.measure(row, (name, dtype, "flex"),
                                   lambda: time_flex(name, dtype, n, torch, flex, device, repeats, xp),
                                   fixed=compile_seconds.get(dtype, FLEX_COMPILE_GUESS_S))  # fmt: skip
                    if "compile" in row:
                        compile_seconds[dtype] = row["compile"]
                    if row["forward"] is None and not row["note"].startswith("skipped"):
                        refused[name, dtype] = n
                print(f"flex {name:16s} {dtype} N={n}: {row['forward']} {row['backward']} {row['note']}", flush=True)
                rows.append(row)
    rows.sort(key=lambda row: (names.index(row["mechanism"]), row["dtype"], row["n"]))
    return rows


# --- the report ---------------------------------------------------------------------


def _ms(seconds) -> str:
    return seconds if isinstance(seconds, str) else "" if seconds is None else f"{1e3 * seconds:.4g}"


def _ratio(ours, theirs) -> str:
    if not isinstance(ours, float) or not isinstance(theirs, float):
        return ""
    return f"{ours / theirs:.3g}"


def markdown(found: dict, verify_rows: list, xp_rows: list, sdpa_rows: list, settings: dict, flex_checks=(),
             flex_rows=()) -> str:  # fmt: skip
    """The report: what was found, the verification, the Flex expressions' check, SDPA's times and each
    mechanism's, with Flex's beside them and the ratios."""
    lines = ["# GPU check", "", f"Settings: {json.dumps(settings)}", ""]
    lines += [f"* {name}: {line}" for name, (_, line) in found.items()]
    lines += ["", "## Verification (cupy backend, every conformance case, forward and gradients)", "",
              "| mechanism | dtype | result | pass | fail | seconds |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in verify_rows:
        counts = row["counts"]
        result = "ok" if row["ok"] else "FAILED" if counts else "not run (time budget)"
        lines.append(f"| {row['mechanism']} | {row['dtype']} | {result} | "
                     f"{counts.get('pass', 0)} | {counts.get('fail', 0)} | {row['seconds']} |")  # fmt: skip
    lines += flex_check_lines(flex_checks)
    lines += ["", f"## PyTorch SDPA (B={BATCH}, H={HEADS}, D={HEAD_DIM}, N = Nq = Nk)", "",
              "| dtype | N | forward ms | backward ms | note |", "|---|---|---|---|---|"]  # fmt: skip
    sdpa = {}
    for row in sdpa_rows:
        sdpa[row["dtype"], row["n"]] = row
        lines.append(f"| {row['dtype']} | {row['n']} | {_ms(row['forward'])} | {_ms(row['backward'])} | {row['note']} |")
    flex = {(row["mechanism"], row["dtype"], row["n"]): row for row in flex_rows}
    lines += ["", "## refattn's xp algorithm under CuPy (inputs and results on the device), and the mechanism's "
              "FlexAttention expression (torch.compile'd on the GPU; eager on the CPU in the dry run)", "",
              "| mechanism | dtype | N | forward ms | x SDPA | Flex forward ms | x Flex | backward ms | x SDPA | "
              "Flex backward ms | x Flex | Numba forward ms (CPU) | Numba / xp | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in xp_rows:
        theirs = sdpa.get((row["dtype"], row["n"]), {})
        flexed = flex.get((row["mechanism"], row["dtype"], row["n"]), {})
        compiled = "compile" in flexed and f"Flex compiled in {flexed['compile']:.1f} s"
        difference = "xp_difference" in flexed and f"Flex vs xp {flexed['xp_difference']:.1e}"
        flex_note = flexed.get("note") and f"Flex: {flexed['note']}"
        note = "; ".join(filter(None, (row["note"], compiled, difference, flex_note)))
        lines.append(
            f"| {row['mechanism']} | {row['dtype']} | {row['n']} | {_ms(row['forward'])} | "
            f"{_ratio(row['forward'], theirs.get('forward'))} | {_ms(flexed.get('forward'))} | "
            f"{_ratio(row['forward'], flexed.get('forward'))} | {_ms(row['backward'])} | "
            f"{_ratio(row['backward'], theirs.get('backward'))} | {_ms(flexed.get('backward'))} | "
            f"{_ratio(row['backward'], flexed.get('backward'))} | {_ms(row.get('numba_forward'))} | "
            f"{_ratio(row.get('numba_forward'), row['forward'])} | {note} |"
        )
    return "\n".join(lines) + "\n"


def flex_check_lines(flex_checks: list) -> list[str]:
    """The Flex section: each expression's check against refattn, then why the others have none."""
    if not flex_checks:
        return []
    lines = ["", f"## FlexAttention expressions against refattn's reference (eager on the CPU, N = "
             f"{', '.join(map(str, FLEX_CHECK_SIZES))}; only a matching one is timed)", "",
             "| mechanism | stated by | flex_matches | largest error float64 | largest error float32 |",
             "|---|---|---|---|---|"]  # fmt: skip
    matches = flex_matches(flex_checks)
    for name, matched in matches.items():
        rows = [row for row in flex_checks if row["mechanism"] == name]
        errors = {dtype: max(row["error"] for row in rows if row["dtype"] == dtype) for dtype in ("float64", "float32")}
        stated_by = " and ".join(rows[0]["mods"]) or "neither (plain attention)"
        lines.append(f"| {name} | {stated_by} | {matched} | {errors['float64']:.1e} | {errors['float32']:.1e} |")
    reasons = "; ".join(f"{name} ({why})" for name, why in FLEX_NOT_EXPRESSED.items())
    return lines + ["", f"No Flex expression: {reasons}."]


# --- the run ------------------------------------------------------------------------


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="NumPy for CuPy and CPU SDPA, at tiny N: checks the script")
    parser.add_argument("--sizes", type=lambda s: [int(n) for n in s.split(",")], default=None,
                        help="comma-separated N (default 4096,16384,65536; dry run 32,64)")  # fmt: skip
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "float64"])
    parser.add_argument("--mechanisms", type=lambda s: s.split(","), default=None,
                        help="comma-separated names (default: every mechanism with a cupy backend, dense first)")  # fmt: skip
    parser.add_argument("--blocks", type=lambda s: tuple(int(n) for n in s.split(",")), default=(1024, 1024),
                        help="query rows, key columns of a tile (default 1024,1024: fewer launches on a GPU)")  # fmt: skip
    parser.add_argument("--verify-blocks", type=lambda s: tuple(int(n) for n in s.split(",")), default=(16, 32),
                        help="tile of the verification (default 16,32: the cases, N <= 80, cross tile edges)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--verify-budget-s", type=float, default=240.0,
                        help="seconds from the start after which no verification starts")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="seconds from the start after which no measurement starts (gpu_check.sh stops it at 470)")  # fmt: skip
    parser.add_argument("--numba-sizes", type=lambda s: [int(n) for n in s.split(",")], default=[],
                        help="N at which each mechanism's Numba forward is also timed on the CPU (default none: "
                             "compiling takes minutes)")  # fmt: skip
    parser.add_argument("--flex-sizes", type=lambda s: [int(n) for n in s.split(",")], default=None,
                        help="N at which each Flex expression is timed (default every size; compiling each "
                             "(mechanism, dtype, N) counts against the budget)")  # fmt: skip
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [32, 64] if args.dry_run else [4096, 16384, 65536]
    if args.flex_sizes is None:
        args.flex_sizes = args.sizes
    return args


def gpu_mechanisms(selected) -> list[str]:
    """Every registered mechanism with a cupy backend (or the selected ones), dense first."""
    names = [name for name in registry.names() if "cupy" in registry.get(name).backends]
    if selected is not None:
        unknown = sorted(set(selected) - set(names))
        if unknown:
            raise SystemExit(f"no cupy backend: {', '.join(unknown)} (have: {', '.join(names)})")
        names = [name for name in names if name in selected]
    return sorted(names, key=lambda name: (name != "dense", name))


def set_blocks(names, blocks: tuple[int, int]) -> None:
    """Every selected xp module's tile size (each reads its own BLOCK_Q, BLOCK_K)."""
    for name in names:
        module = importlib.import_module(f"{registry.get(name).package}.xp")
        module.BLOCK_Q, module.BLOCK_K = blocks


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse(argv)
    found = tools(args.dry_run)
    for name, (_, line) in found.items():
        print(f"{name}: {line}", flush=True)
    if args.dry_run:
        xp, sync, device = np, (lambda: None), "cpu"
        core_xp.cupy_namespace = lambda: np  # the registered cupy backends then run their xp code under NumPy
    elif found["cupy"][0] is None:
        print("gpu_check: CuPy with a CUDA device is required (or pass --dry-run)", file=sys.stderr)
        return 2
    else:
        xp, device = found["cupy"][0], "cuda"
        sync = xp.cuda.Device().synchronize
    names = gpu_mechanisms(args.mechanisms)
    set_blocks(names, args.verify_blocks)
    settings = dict(dry_run=args.dry_run, sizes=args.sizes, dtypes=args.dtypes, blocks=list(args.blocks),
                    verify_blocks=list(args.verify_blocks), repeats=args.repeats,
                    verify_budget_s=args.verify_budget_s, budget_s=args.budget_s, numba_sizes=args.numba_sizes,
                    flex_sizes=args.flex_sizes)  # fmt: skip
    verify_rows = [] if args.skip_verify else verify_all(names, args.dtypes, started + args.verify_budget_s)
    torch = found["torch"][0]
    flex_checks = [] if torch is None else flex_check(names, torch)
    write(args.out, found, verify_rows, [], [], settings, flex_checks)  # what is checked survives a run stopped later
    set_blocks(names, args.blocks)
    budget = Budget(started + args.budget_s)
    xp_rows, sdpa_rows = time_all(names, args.dtypes, args.sizes, xp, sync, torch, device, args.repeats, budget,
                                  args.numba_sizes)  # fmt: skip
    flex_sizes = [n for n in args.sizes if n in args.flex_sizes]
    flex_rows = [] if torch is None else time_all_flex(names, args.dtypes, flex_sizes, xp, torch, device, args.repeats,
                                                       budget, flex_matches(flex_checks))  # fmt: skip
    write(args.out, found, verify_rows, xp_rows, sdpa_rows, settings, flex_checks, flex_rows)
    return 0 if all(row["ok"] for row in verify_rows) else 1


def write(out: Path, found: dict, verify_rows: list, xp_rows: list, sdpa_rows: list, settings: dict, flex_checks=(),
          flex_rows=()) -> None:  # fmt: skip
    """``gpu_check.md`` and ``gpu_check.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(found, verify_rows, xp_rows, sdpa_rows, settings, flex_checks, flex_rows)
    (out / "gpu_check.md").write_text(report)
    flex = dict(flex_matches=flex_matches(flex_checks), checks=list(flex_checks), not_expressed=FLEX_NOT_EXPRESSED,
                timings=list(flex_rows))  # fmt: skip
    results = dict(settings=settings, tools={name: line for name, (_, line) in found.items()},
                   verify=verify_rows, xp=xp_rows, sdpa=sdpa_rows, flex=flex)  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out / 'gpu_check.md'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
