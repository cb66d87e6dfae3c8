"""LSH attention (Reformer), forward and backward: reference vs numba vs HF's LSHSelfAttention on CPU.

B = 1, H = 8, D = Dv = 64, float32, 4 hashing rounds, chunks of 64 with one
chunk of look-back (the Reformer / HF defaults), no mask, not causal.
``num_buckets`` follows HF's own rule when ``config.num_buckets`` is unset
(``ReformerConfig._set_num_buckets``, with HF's default
``max_position_embeddings = 4096``): ``2^⌊log2(2N / L)⌋`` buckets, factorised
into two powers of two when that exceeds ``2·max(√(4096 / L), L) = 128``:
N = 4096 -> 128, 16384 -> [16, 32], 65536 -> [32, 64]. Every backend gets
the same value (without factorisation the hashing alone would grow as N²).

For each (backend, N, direction) a fresh subprocess builds the inputs, warms
up (compiles) on a small problem, then times ``--repeats`` calls and keeps
the fastest. It reports

* time (wall clock, seconds, fastest of the repeats);
* peak memory growth: the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs just before the call) minus its resident set before
  it, less the bytes of the call's outputs. RSS, not tracemalloc, because
  Numba's allocations inside compiled code are invisible to tracemalloc.

Backends:

* ``reference``: refattn's NumPy specification (float64 inside), up to
  ``--reference-max``;
* ``numba``: refattn/lsh/numba.py, float32 in and float32 compute;
  "backward" is the public VJP without ``saved=``, so it hashes, sorts and
  runs the forward again (as it did before ``saved`` existed, so that the
  times compare with earlier runs);
* ``hf``: transformers' ``LSHSelfAttention`` built from a ``ReformerConfig``
  with the same sizes (``hash_seed`` fixed, dropout 0), fed hidden states
  ``X`` (B, N, H·D). refattn's backends get HF's own ``qk = X W_qkᵀ`` and
  ``v = X W_vᵀ``, computed before the measurement; HF's times include those
  two projections (and, backward, their weights' gradients), which are
  timed apart in the same child and printed below the table. "backward" is ``out.backward(dout)`` after an autograd
  forward that is not timed (HF saves what its backward needs). HF draws
  its own rotations (same shape, other values): the buckets differ, the
  work does not.

Below the table: the ratios HF / numba of the same run, and the growth
exponent of each backend's time with N, the least-squares slope of log t
against log N over the lengths measured.

Usage::

    PYTHONPATH=. python benchmarks/bench_lsh.py --lengths 4096 16384 65536 --repeats 2 --threads 2
    PYTHONPATH=. python benchmarks/bench_lsh.py --lengths 4096 --backends numba hf --directions forward
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

from harness import measure  # benchmarks/harness.py, beside this script

BATCH, HEADS, HEAD_DIM = 1, 8, 64
NUM_HASHES, CHUNK_LEN = 4, 64
HF_MAX_POSITION_EMBEDDINGS = 4096  # ReformerConfig's default, which _set_num_buckets reads
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_num_buckets(n: int, chunk_len: int = CHUNK_LEN, max_positions: int = HF_MAX_POSITION_EMBEDDINGS):
    """HF's ``LSHSelfAttention._set_num_buckets`` (transformers 5.23.0), as a function of N."""
    power = (2 * (n // chunk_len)).bit_length() - 1
    limit = 2 * max(int((max_positions // chunk_len) ** 0.5), chunk_len)
    return 2**power if 2**power <= limit else [2 ** (power // 2), 2 ** (power - power // 2)]


# --------------------------------------------------------------------------
# Inside the measuring subprocess.
# --------------------------------------------------------------------------


def _nbytes(*arrays) -> int:
    return sum(int(a.nbytes) for a in arrays)


def _hf_module(n: int, weights=None):
    """HF's LSHSelfAttention for N tokens, in float32, eval mode (no dropout), with the given projection weights."""
    import torch
    from transformers import ReformerConfig
    from transformers.models.reformer import modeling_reformer

    config = ReformerConfig(
        attention_head_size=HEAD_DIM, num_attention_heads=HEADS, hidden_size=HEADS * HEAD_DIM, attn_layers=["lsh"],
        lsh_attn_chunk_length=CHUNK_LEN, num_hashes=NUM_HASHES, num_buckets=hf_num_buckets(n), lsh_num_chunks_before=1,
        lsh_num_chunks_after=0, is_decoder=False, lsh_attention_probs_dropout_prob=0.0, hash_seed=0,
    )  # fmt: skip
    module = modeling_reformer.LSHSelfAttention(config, layer_idx=0).eval()
    if weights is not None:
        with torch.no_grad():
            module.query_key.weight.copy_(torch.from_numpy(weights[0]))
            module.value.weight.copy_(torch.from_numpy(weights[1]))
    return module


def _problem(n: int, seed: int = 0):
    """Hidden states X and dout (B, N, H·D), projection weights W_qk, W_v (H·D, H·D), and what refattn is given:
    ``qk = X W_qkᵀ``, ``v = X W_vᵀ``, dout as (B, H, N, D), and rotations (H, R, D, P)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    width = HEADS * HEAD_DIM
    hidden = rng.standard_normal((BATCH, n, width), dtype=np.float32)
    dout = rng.standard_normal((BATCH, n, width), dtype=np.float32)
    weights = [rng.standard_normal((width, width), dtype=np.float32) / np.float32(math.sqrt(width)) for _ in range(2)]

    def heads(t):  # (B, N, H·D) -> (B, H, N, D)
        return np.ascontiguousarray(t.reshape(BATCH, n, HEADS, HEAD_DIM).transpose(0, 2, 1, 3))

    buckets = hf_num_buckets(n)
    half = sum(buckets if isinstance(buckets, list) else [buckets]) // 2
    rotations = rng.standard_normal((HEADS, NUM_HASHES, HEAD_DIM, half), dtype=np.float32)
    qk, v = heads(hidden @ weights[0].T), heads(hidden @ weights[1].T)
    return hidden, dout, weights, qk, v, heads(dout), rotations


def child(backend: str, n: int, direction: str, repeats: int) -> dict:
    hidden, dout, weights, qk, v, dout_heads, rotations = _problem(n)
    if backend in ("reference", "numba"):
        from refattn.lsh import lsh_attention, lsh_attention_vjp

        params = dict(rotations=rotations, num_buckets=hf_num_buckets(n), num_hashes=NUM_HASHES, chunk_len=CHUNK_LEN)

        def forward(qk, v):
            r = lsh_attention(qk, v, **params, backend=backend)
            return _nbytes(r.out, r.lse)

        def backward(qk, v, d):
            g = lsh_attention_vjp(d, qk, v, **params, backend=backend)
            return _nbytes(*g.values())

        small = [x[:, :, :256] for x in (qk, v, dout_heads)]
        forward(*small[:2]) if direction == "forward" else backward(*small)  # compile / warm up
        if direction == "forward":
            return measure(lambda: forward(qk, v), repeats)
        return measure(lambda: backward(qk, v, dout_heads), repeats)
    if backend == "hf":
        import torch

        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        module = _hf_module(n, weights)
        x, d = torch.from_numpy(hidden), torch.from_numpy(dout)
        result = {"projection_time": _projection_time(module, x, d, direction, repeats)}
        small = _hf_module(256)
        if direction == "forward":

            def forward(module, x):
                with torch.no_grad():
                    out = module(x, num_hashes=NUM_HASHES).hidden_states
                return out.numel() * out.element_size()

            forward(small, x[:, :256])
            return result | measure(lambda: forward(module, x), repeats)

        def prepared(module, x):
            """The leaves that get gradients (input, projection weights), reset, and an autograd forward."""
            leaf = x.detach().clone().requires_grad_()
            leaves = [leaf, *module.parameters()]
            for p in leaves:
                p.grad = None
            return leaves, module(leaf, num_hashes=NUM_HASHES).hidden_states

        _, out = prepared(small, x[:, :256])
        out.backward(d[:, :256])
        state = {}

        def backward():
            leaves, out = state["prepared"]
            out.backward(d)
            return sum(p.grad.numel() * p.grad.element_size() for p in leaves)

        # The forward (with autograd) runs outside the timed and measured region.
        times, growths, beyond = [], [], []
        for _ in range(repeats):
            state["prepared"] = prepared(module, x)
            one = measure(backward, 1)
            times.append(one["time"])
            growths.append(one["peak_growth_mib"])
            beyond.append(one["beyond_outputs_mib"])
            del state["prepared"]
        return result | {"time": min(times), "peak_growth_mib": growths[0], "beyond_outputs_mib": beyond[0]}
    raise SystemExit(f"unknown backend {backend!r}")


def _projection_time(module, x, d, direction: str, repeats: int) -> float:
    """Seconds of HF's two input projections alone (forward, or their backward), fastest of ``repeats``."""
    import torch

    times = []
    for _ in range(repeats):
        if direction == "forward":
            with torch.no_grad():
                start = time.perf_counter()
                module.query_key(x), module.value(x)
                times.append(time.perf_counter() - start)
            continue
        leaf = x.detach().clone().requires_grad_()
        projected = module.query_key(leaf) + module.value(leaf)
        start = time.perf_counter()
        projected.backward(d)
        times.append(time.perf_counter() - start)
    return min(times)


# --------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------


def _run_child(args, backend, n, direction) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BENCH_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, str(n), direction, "--repeats", str(args.repeats)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over --timeout {args.timeout} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(x: float) -> str:
    # Below 1 MiB, or negative: the outputs' pages were partly memory the
    # process already held (RSS counts pages, not allocations).
    return "<1" if x < 1 else f"{x:.0f}"


def growth_exponent(lengths, times) -> float:
    """Least-squares slope of log t against log N."""
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in times]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def _summaries(rows, lengths, directions, backends) -> list[str]:
    """Ratios HF / numba per N and direction, and each backend's growth exponent."""
    timed = {(r["backend"], r["n"], r["direction"]): r for r in rows if "error" not in r}
    lines = ["", "| N | direction | hf / numba | hf projections alone (s) |", "|---|---|---:|---:|"]
    for n in lengths:
        for direction in directions:
            hf, nb = timed.get(("hf", n, direction)), timed.get(("numba", n, direction))
            if hf and nb:
                lines.append(f"| {n} | {direction} | {hf['time'] / nb['time']:.1f} | {hf['projection_time']:.3f} |")
    lines += ["", "| backend | direction | lengths | growth exponent of time |", "|---|---|---|---:|"]
    for backend in backends:
        for direction in directions:
            measured = [(n, timed[(backend, n, direction)]["time"]) for n in lengths if (backend, n, direction) in timed]
            if len(measured) >= 2:
                ns, ts = zip(*measured)
                lines.append(f"| {backend} | {direction} | {', '.join(map(str, ns))} | {growth_exponent(ns, ts):.2f} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["reference", "numba", "hf"], choices=["reference", "numba", "hf"])
    parser.add_argument("--directions", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reference-max", type=int, default=16384,
                        help="longest N for the reference, which keeps every chunk's float64 logits, weights and gathered "
                             "vectors (about 1 GiB at N = 4096, 4 GiB at 16384)")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "N", "DIRECTION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        backend, n, direction = args.child
        print(json.dumps(child(backend, int(n), direction, args.repeats)))
        return

    backends = list(args.backends)
    if "hf" in backends:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print("torch or transformers is not installed: skipping the hf backend", file=sys.stderr)
            backends.remove("hf")

    buckets = ", ".join(f"{n}: {hf_num_buckets(n)}" for n in args.lengths)
    print(f"# LSH attention, B={BATCH} H={HEADS} D={HEAD_DIM} float32, {NUM_HASHES} rounds, chunk {CHUNK_LEN}, "
          f"one chunk before; num_buckets (HF's rule) {buckets}; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    print("| N | direction | backend | time (s) | peak growth beyond outputs (MiB) |")
    print("|---|---|---|---:|---:|", flush=True)
    rows = []
    for n in args.lengths:
        for direction in args.directions:
            for backend in backends:
                if backend == "reference" and n > args.reference_max:
                    print(f"| {n} | {direction} | reference | skipped: N > --reference-max {args.reference_max} | |", flush=True)
                    continue
                res = _run_child(args, backend, n, direction)
                res.update(n=n, direction=direction, backend=backend)
                rows.append(res)
                if "error" in res:
                    print(f"| {n} | {direction} | {backend} | error: {res['error']} | |", flush=True)
                    continue
                print(f"| {n} | {direction} | {backend} | {res['time']:.3f} | {_mib(res['beyond_outputs_mib'])} |", flush=True)
    print("\n".join(_summaries(rows, args.lengths, args.directions, backends)))
    print(f"\nload average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
