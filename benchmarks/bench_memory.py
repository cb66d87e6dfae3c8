"""Streaming a long sequence through Transformer-XL recurrence (Numba) vs dense sliding-window attention.

B = 1, H = 8, D = 64, float32, segments of L = 512 tokens, memory M = 2048.
For each requested length a fresh subprocess streams the sequence through the
Numba backend of ``xl_recurrence_attention`` (``backend="numba"``), one chunk
of ``--chunk`` segments per call, the final memory (``aux``) of a call starting
the next, drawing each chunk's q, k, v as it goes: the stream is never held
whole, so the process's memory is a chunk's, the memory's and the kernel's
tiles. (``--chunk 1`` is ``xl_recurrence_step``; each call checks its inputs
whole, memory included, which costs about as much as a 512-token step's
attention, so longer chunks amortise it.) It reports

* tokens per second (wall clock, after a warm-up call that compiles);
* peak resident set (VmHWM) of the subprocess, in MiB: flat in the length.

The baseline, in the same run, is the Numba dense kernel with a causal window
over the same number of keys per query on average (left = M + (L - 1) / 2, i.e.
M + (L + 1) / 2 keys), on one pass over min(N, 65536) tokens held whole; its
tokens per second do not depend on N. The ratio stream / window is the
issue's target (within 1.5x).

Usage::

    PYTHONPATH=. python benchmarks/bench_memory.py                      # 65536 tokens
    PYTHONPATH=. python benchmarks/bench_memory.py --tokens 65536 1048576
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BATCH, HEADS, HEAD_DIM = 1, 8, 64
SEGMENT, MEMORY = 512, 2048
BASELINE_TOKENS = 65536
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _segment(rng, n: int):
    import numpy as np

    shape = (BATCH, HEADS, n, HEAD_DIM)
    return tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(3))


def measure_stream(tokens: int, chunk: int) -> dict:
    """Stream ``tokens`` tokens through the Numba backend, ``chunk`` segments per call; tokens/s and peak RSS."""
    import numpy as np

    from refattn.memory import xl_recurrence_attention

    rng = np.random.default_rng(0)
    options = dict(segment_len=SEGMENT, mem_len=MEMORY, backend="numba")
    xl_recurrence_attention(*_segment(rng, 2 * SEGMENT), **options)  # warm-up: compiles the kernels
    state = {}
    start = time.perf_counter()
    for _ in range(tokens // (chunk * SEGMENT)):
        state = xl_recurrence_attention(*_segment(rng, chunk * SEGMENT), **options, **state).aux
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "peak_mib": _peak_mib()}


def measure_window(tokens: int) -> dict:
    """One causal sliding-window pass of the dense Numba kernel over ``tokens`` tokens."""
    import numpy as np

    from refattn import dense_attention

    rng = np.random.default_rng(0)
    window = (MEMORY + (SEGMENT - 1) // 2, 0)
    small = _segment(rng, 256)
    dense_attention(*small, causal=True, window=window, backend="numba")  # compiles
    q, k, v = _segment(rng, tokens)
    start = time.perf_counter()
    dense_attention(q, k, v, causal=True, window=window, backend="numba")
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "peak_mib": _peak_mib()}


def _run(kind: str, tokens: int, chunk: int) -> dict:
    command = [sys.executable, __file__, "--measure", kind, str(tokens), "--chunk", str(chunk)]
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[65536])
    parser.add_argument("--chunk", type=int, default=8, help="segments per call (default 8)")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, tokens = args.measure[0], int(args.measure[1])
        print(json.dumps(measure_stream(tokens, args.chunk) if kind == "stream" else measure_window(tokens)))
        return
    baseline = _run("window", min(max(args.tokens), BASELINE_TOKENS), args.chunk)
    print(f"B={BATCH}, H={HEADS}, D={HEAD_DIM}, float32, segment {SEGMENT}, memory {MEMORY}, {args.chunk} segments "
          "per call; "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| tokens | stream tokens/s | window tokens/s | stream / window | stream peak RSS (MiB) | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        stream = _run("stream", tokens, args.chunk)
        print(f"| {tokens} | {stream['tokens_per_s']:,.0f} | {baseline['tokens_per_s']:,.0f} | "
              f"{stream['tokens_per_s'] / baseline['tokens_per_s']:.2f} | {stream['peak_mib']:.0f} | "
              f"{stream['seconds']:.1f} |", flush=True)  # fmt: skip
    print(f"window baseline: {min(max(args.tokens), BASELINE_TOKENS)} tokens held whole, peak RSS "
          f"{baseline['peak_mib']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
