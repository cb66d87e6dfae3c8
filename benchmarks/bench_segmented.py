"""Local and Longformer attention, forward: refattn's numba kernels vs lucidrains' local-attention and HF's
LongformerSelfAttention on CPU.

B = 1, H = 8, D = 64, float32. ``local``: windows of 256 tokens looking one block back and one forward
(3 x 256 keys per query), refattn ``local_attention(backend="numba")`` against ``local_attention.LocalAttention``
(when installed). ``longformer``: ``attention_window`` 512 (256 keys per side) with one global token, refattn
``longformer_attention(backend="numba")`` against ``transformers``' ``LongformerSelfAttention`` fed the same
q, k, v through identity-row projections (examples/hf_longformer.py).

Each (backend, N) runs in a fresh subprocess that warms up (compiles) on a small problem, times ``--repeats``
calls keeping the fastest, and reports the peak RSS growth of the first call beyond its outputs
(benchmarks/bench_dense.py's probe). After the table, the growth exponent of each backend: the least-squares
slope of log time against log N (1 for O(N * window)).

The numba kernels call BLAS on (block x list) tiles from Numba's threads, so the subprocesses run OpenBLAS
single-threaded (``OPENBLAS_NUM_THREADS=1``; refattn/segmented/blocksparse.py).

Usage::

    PYTHONPATH=. python benchmarks/bench_segmented.py --lengths 4096 16384 65536 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from bench_dense import _mib, _nbytes  # beside this script
from harness import measure  # benchmarks/harness.py, beside this script

BATCH, HEADS, HEAD_DIM = 1, 8, 64
WINDOW, ATTENTION_WINDOW = 256, 512
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("local:numba", "local:lucidrains", "longformer:numba", "longformer:hf")


def _inputs(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.standard_normal((BATCH, HEADS, n, HEAD_DIM), dtype=np.float32) for _ in range(3)]


def _call(backend: str, n: int):
    """A zero-argument function running ``backend`` on N tokens and returning its output's byte count."""
    import numpy as np

    q, k, v = _inputs(n)
    mechanism, name = backend.split(":")
    global_tokens = np.zeros((BATCH, n), dtype=bool)
    global_tokens[:, 0] = True
    if name == "numba":
        from refattn.segmented import local_attention, longformer_attention

        if mechanism == "local":
            return lambda: _nbytes(local_attention(q, k, v, window_size=WINDOW, backend="numba").out)
        return lambda: _nbytes(longformer_attention(q, k, v, attention_window=ATTENTION_WINDOW,
                                                    global_tokens=global_tokens, backend="numba").out)  # fmt: skip
    import torch

    if name == "lucidrains":
        from local_attention import LocalAttention

        module = LocalAttention(window_size=WINDOW, look_backward=1, look_forward=1)
        tq, tk, tv = (torch.tensor(x) for x in (q, k, v))

        def run():
            with torch.no_grad():
                return module(tq, tk, tv).numel() * 4

        return run
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import hf_longformer

    tensors = {name: torch.tensor(x) for name, x in zip("qkv", (q, k, v))}

    def run_hf():
        with torch.no_grad():
            return hf_longformer._forward(tensors, ATTENTION_WINDOW, global_tokens).numel() * 4

    return run_hf


def child(backend: str, n: int, repeats: int) -> dict:
    _call(backend, 2 * ATTENTION_WINDOW)()  # warm-up: compile, load
    return measure(_call(backend, n), repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child[0], int(args.child[1]), args.repeats)))
        return
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO, os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    results = {}
    print(f"{'backend':20s} {'N':>7s} {'time (s)':>10s} {'peak growth':>12s} {'beyond outputs':>15s}")
    for backend in args.backends:
        for n in args.lengths:
            run = subprocess.run([sys.executable, __file__, "--child", backend, str(n), "--repeats", str(args.repeats),
                                  "--threads", str(args.threads)], capture_output=True, text=True, env=env)  # fmt: skip
            if run.returncode != 0:
                print(f"{backend:20s} {n:7d} failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
            result = json.loads(run.stdout.strip().splitlines()[-1])
            results[backend, n] = result["time"]
            print(f"{backend:20s} {n:7d} {result['time']:10.3f} {_mib(result['peak_growth_mib']):>12s} "
                  f"{_mib(result['beyond_outputs_mib']):>15s}")  # fmt: skip
    for backend in args.backends:
        points = [(math.log(n), math.log(t)) for (b, n), t in results.items() if b == backend]
        if len(points) >= 2:
            mean_x = sum(x for x, _ in points) / len(points)
            mean_y = sum(y for _, y in points) / len(points)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
            print(f"growth exponent {backend}: {slope:.2f}")


if __name__ == "__main__":
    main()
