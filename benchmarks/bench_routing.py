"""Routing attention, forward and backward: reference vs numba vs lucidrains' KmeansAttention on CPU.

B = 1, H = 8, D = 64, float32, K = round(√N) clusters of cluster_size W = N // K
tokens (the Routing Transformer's O(N^1.5 · D) setting), non-causal, separate
query and key routing, the ``"lucidrains"`` preset (L2 routing vectors, raw
q/k attended with 1/√D, members by descending similarity, scatter eps 1e-5),
which is the function lucidrains' ``KmeansAttention`` computes in eval mode
with the same centroids (its ``Kmeans.means``; no memory key/values, no
k-means update). ``--check`` first compares the numba output with the
module's at the smallest length.

For each (backend, N, direction) a fresh subprocess builds the inputs, warms
up (compiles) on a small problem, then times ``--repeats`` calls and keeps the
fastest, and reports the peak memory growth of the first call beyond its
outputs (VmHWM reset through /proc/self/clear_refs, as benchmarks/bench_dense.py
does: RSS, because Numba's allocations are invisible to tracemalloc).

* ``reference``: refattn's NumPy float64 specification; it holds
  (B, H, K, W, W) float64 arrays, 8·H·N·W bytes each (1 GiB at N = 64K), so
  it runs only up to ``--reference-max``.
* ``numba``: refattn/routing/numba.py, float32 in, float32 compute.
* ``lucidrains``: ``routing_transformer.KmeansAttention`` (PyTorch, CPU),
  when the package is installed (``pip install routing_transformer``).

"backward" is the public VJP for reference and numba, which are stateless
(they recompute the routing and the forward); for lucidrains it is
``out.backward(dout)`` after an autograd forward that is not timed.

After the table, the growth exponent of each (backend, direction): the
least-squares slope of log time against log N (1.5 for the O(N^1.5) claim).

``--threads`` sets NUMBA_NUM_THREADS and torch.set_num_threads, and
OpenBLAS's threads for the reference. The numba kernels call BLAS from
inside Numba's threads, so their subprocess runs OpenBLAS single-threaded
(refattn/routing/numba.py).

Usage::

    PYTHONPATH=. python benchmarks/bench_routing.py --lengths 4096 16384 65536 --repeats 2 --threads 2 --check
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
PRESET = "lucidrains"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sizes(n: int) -> tuple[int, int]:
    """(clusters, cluster_size) for N tokens: K = round(√N), W = N // K."""
    clusters = max(1, round(math.sqrt(n)))
    return clusters, n // clusters


# --------------------------------------------------------------------------
# Inside the measuring subprocess.
# --------------------------------------------------------------------------


def _inputs(n: int, seed: int = 0):
    """q, k, v, dout (B, H, N, D) and centroids (H, K, D), float32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (BATCH, HEADS, n, HEAD_DIM)
    tensors = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    centroids = rng.standard_normal((HEADS, sizes(n)[0], HEAD_DIM), dtype=np.float32)
    return tensors, centroids


def _refattn_calls(backend: str, n: int):
    """forward(q, k, v) and backward(q, k, v, dout) of refattn's routing on ``backend``, each returning output bytes."""
    from refattn.routing import routing_attention, routing_attention_vjp

    _, cluster_size = sizes(n)

    def forward(q, k, v, centroids):
        r = routing_attention(q, k, v, centroids=centroids, cluster_size=cluster_size, preset=PRESET, backend=backend)
        return _nbytes(r.out, r.aux["slot_lse"])

    def backward(q, k, v, dout, centroids):
        g = routing_attention_vjp(dout, q, k, v, centroids=centroids, cluster_size=cluster_size, preset=PRESET,
                                  backend=backend)  # fmt: skip
        return _nbytes(*g.values())

    return forward, backward


def _lucidrains_module(centroids, window_size: int):
    """KmeansAttention in eval mode whose k-means means are ``centroids`` (H, K, D)."""
    import torch
    from routing_transformer.routing_transformer import KmeansAttention

    heads, clusters, dim = centroids.shape
    module = KmeansAttention(clusters, window_size, heads, dim).eval()  # its window_size is our cluster_size
    module.kmeans.means.copy_(torch.from_numpy(centroids))
    module.kmeans.initted.fill_(True)
    return module


def child(backend: str, n: int, direction: str, repeats: int) -> dict:
    (q, k, v, dout), centroids = _inputs(n)
    (sq, sk, sv, sdout), small_centroids = _inputs(256, seed=1)
    if backend in ("reference", "numba"):
        forward, backward = _refattn_calls(backend, n)
        small_forward, small_backward = _refattn_calls(backend, 256)
        # Compile / warm up on a small problem.
        small_forward(sq, sk, sv, small_centroids) if direction == "forward" else small_backward(sq, sk, sv, sdout, small_centroids)
        if direction == "forward":
            return measure(lambda: forward(q, k, v, centroids), repeats)
        return measure(lambda: backward(q, k, v, dout, centroids), repeats)
    if backend == "lucidrains":
        import torch

        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        module = _lucidrains_module(centroids, sizes(n)[1])
        tq, tk, tv, tdout = (torch.from_numpy(x) for x in (q, k, v, dout))
        if direction == "forward":

            def forward():
                with torch.no_grad():
                    out, _ = module(tq, tk, tv)
                return out.numel() * out.element_size()

            return measure(forward, repeats)
        state = {}

        def backward():
            leaves, out = state["prepared"]
            out.backward(tdout)
            return sum(x.grad.numel() * x.grad.element_size() for x in leaves)

        # The forward (with autograd) runs outside the timed and measured region.
        runs = []
        for _ in range(repeats):
            leaves = [x.detach().clone().requires_grad_() for x in (tq, tk, tv)]
            state["prepared"] = (leaves, module(*leaves)[0])
            runs.append(measure(backward, 1))
            del state["prepared"]
        return {"time": min(r["time"] for r in runs), "peak_growth_mib": runs[0]["peak_growth_mib"],
                "beyond_outputs_mib": runs[0]["beyond_outputs_mib"]}  # fmt: skip
    raise SystemExit(f"unknown backend {backend!r}")


def check(n: int) -> dict:
    """The numba output against lucidrains' module on the same inputs and centroids."""
    import numpy as np
    import torch

    from refattn.routing import routing_attention

    (q, k, v, _), centroids = _inputs(n)
    module = _lucidrains_module(centroids, sizes(n)[1])
    with torch.no_grad():
        theirs = module(*(torch.from_numpy(x) for x in (q, k, v)))[0].numpy()
    ours = routing_attention(q, k, v, centroids=centroids, cluster_size=sizes(n)[1], preset=PRESET,
                             backend="numba").out  # fmt: skip
    return {"max_abs_difference": float(np.max(np.abs(ours - theirs))), "max_abs_output": float(np.max(np.abs(theirs)))}


# --------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------


def _run_child(args, backend, n, direction, extra=()) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BENCH_THREADS"):
        env[var] = str(args.threads)
    if backend == "numba":
        env["OPENBLAS_NUM_THREADS"] = "1"  # BLAS inside Numba's threads
    cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, str(n), direction,
           "--repeats", str(args.repeats), *extra]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def growth_exponent(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(time) against log(N)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["reference", "numba", "lucidrains"])
    parser.add_argument("--directions", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reference-max", type=int, default=16384,
                        help="longest N for the reference backend, whose (B, H, K, W, W) float64 intermediates "
                             "take 8·H·N·W bytes each (128 MiB at N = 16K, 1 GiB at 64K)")  # fmt: skip
    parser.add_argument("--check", action="store_true", help="compare numba with lucidrains at the smallest length")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "N", "DIRECTION"), help=argparse.SUPPRESS)
    parser.add_argument("--check-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        backend, n, direction = args.child
        print(json.dumps(child(backend, int(n), direction, args.repeats)))
        return
    if args.check_child:
        print(json.dumps(check(args.check_child)))
        return

    backends = list(args.backends)
    if "lucidrains" in backends:
        try:
            import routing_transformer  # noqa: F401
        except ImportError:
            print("routing_transformer is not installed: skipping the lucidrains column", file=sys.stderr)
            backends.remove("lucidrains")

    print(f"# routing attention, B={BATCH} H={HEADS} D={HEAD_DIM} float32, K = round(sqrt(N)), cluster_size W = N // K, "
          f"preset {PRESET!r}, {args.threads} threads", flush=True)  # fmt: skip
    if args.check and "lucidrains" in backends:
        n = min(args.lengths)
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OPENBLAS_NUM_THREADS="1")
        found = json.loads(subprocess.run([sys.executable, os.path.abspath(__file__), "--check-child", str(n)], env=env,
                                          capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])  # fmt: skip
        print(f"# check at N={n}: max |numba - lucidrains| = {found['max_abs_difference']:.2e} "
              f"(max |out| {found['max_abs_output']:.2f})", flush=True)  # fmt: skip
    print("| N | K x W | direction | backend | time (s) | peak growth beyond outputs (MiB) |")
    print("|---|---|---|---|---:|---:|", flush=True)
    rows = []
    for n in args.lengths:
        clusters, cluster_size = sizes(n)
        for direction in args.directions:
            for backend in backends:
                cells = [n, f"{clusters} x {cluster_size}", direction, backend]
                if backend == "reference" and n > args.reference_max:
                    print("| " + " | ".join(map(str, cells)) + f" | skipped: N > --reference-max {args.reference_max} | |")
                    continue
                res = _run_child(args, backend, n, direction)
                res.update(n=n, direction=direction, backend=backend)
                rows.append(res)
                if "error" in res:
                    print("| " + " | ".join(map(str, cells)) + f" | error: {res['error']} | |", flush=True)
                    continue
                cells += [f"{res['time']:.3f}", _mib(res["beyond_outputs_mib"])]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    print("\n| backend | direction | growth exponent (slope of log t vs log N) | over N |")
    print("|---|---|---:|---|")
    for backend in backends:
        for direction in args.directions:
            points = [(r["n"], r["time"]) for r in rows if r["backend"] == backend and r["direction"] == direction
                      and "time" in r]  # fmt: skip
            if len(points) >= 2:
                lengths = ", ".join(str(n) for n, _ in points)
                print(f"| {backend} | {direction} | {growth_exponent(points):.2f} | {lengths} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
