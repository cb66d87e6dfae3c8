"""H-Transformer-1D, forward and backward: refattn's Numba kernel vs lucidrains' h-transformer-1d on CPU.

B = 1, H = 8, D = Dv = 64, float32, block 64, not causal. Backends:

* ``numba``: refattn/hierarchical/h1d/numba.py with the ``lucidrains`` preset
  (the function the library computes), float32 in and float32 compute;
  "backward" is the public VJP (it recomputes the forward's per-level results);
* ``numba-paper``: the same kernel with the paper's normalisation and level count;
* ``library``: h-transformer-1d 0.1.9's ``HAttention1D`` with an identity
  ``to_qkv`` and no ``to_out`` (examples/h_transformer_1d_lucidrains.py), so it gets the
  same q, k, v; "backward" is ``out.backward(dout)`` after an untimed forward.

Each (backend, N, direction) is timed in the same process after a warm-up
(compilation) on a small problem; the median of ``--repeats`` calls is kept
(the machine is shared: a median resists one disturbed call). Below the table:
the library / numba ratio and each backend's growth exponent (least-squares
slope of log t against log N), and the load average before and after. The
numba rows also give the time of the public call's input checks
(the mechanism's ``check_inputs``, NumPy) and the call less them (the kernel).

Usage::

    PYTHONPATH=. python benchmarks/bench_hierarchical.py --lengths 4096 16384 65536 --repeats 3 --threads 2 \
        --directions forward
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
import time

import numpy as np

BATCH, HEADS, HEAD_DIM, BLOCK = 1, 8, 64, 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library():
    if os.path.join(REPO, "examples") not in sys.path:  # the example imports its gallery helper from there
        sys.path.append(os.path.join(REPO, "examples"))
    spec = importlib.util.spec_from_file_location("h_transformer_1d_example", os.path.join(REPO, "examples", "h_transformer_1d_lucidrains.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _numba_calls(q, k, v, dout, params):
    from refattn.core import registry
    from refattn.hierarchical import h1d_attention, h1d_attention_vjp

    forward = lambda: h1d_attention(q, k, v, block_size=BLOCK, backend="numba", **params)  # noqa: E731
    backward = lambda: h1d_attention_vjp(dout, q, k, v, block_size=BLOCK, backend="numba", **params)  # noqa: E731
    signature = inspect.signature(h1d_attention).parameters.items()
    arguments = {name: p.default for name, p in signature if name not in ("precision", "backend")}
    arguments.update(q=q, k=k, v=v, block_size=BLOCK, **params)
    checks = lambda: registry.get("h1d").check_inputs(**arguments)  # noqa: E731
    return forward, backward, checks


def _library_calls(q, k, v, dout):
    import torch

    attention = _library().attention
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    td = torch.from_numpy(dout)

    def forward():
        with torch.no_grad():
            attention(tq, tk, tv, block_size=BLOCK)

    def backward():
        leaves = [x.clone().requires_grad_() for x in (tq, tk, tv)]
        out = attention(*leaves, block_size=BLOCK)
        start = time.perf_counter()
        out.backward(td)
        return time.perf_counter() - start

    return forward, backward


def measure(backend: str, n: int, repeats: int, directions) -> dict:
    rng = np.random.default_rng(n)
    q, k, v, dout = (rng.standard_normal((BATCH, HEADS, n, HEAD_DIM)).astype(np.float32) for _ in range(4))
    if backend == "library":
        forward, backward = _library_calls(q, k, v, dout)
        timers = {"forward": lambda: _median(forward, repeats),
                  "backward": lambda: float(np.median([backward() for _ in range(repeats)]))}  # fmt: skip
    else:
        params = {"preset": "lucidrains"} if backend == "numba" else {}
        forward, backward, checks = _numba_calls(q, k, v, dout, params)
        timers = {"forward": lambda: _median(forward, repeats), "backward": lambda: _median(backward, repeats),
                  "checks": lambda: _median(checks, repeats)}  # fmt: skip
        directions = (*directions, "checks")
    return {direction: timers[direction]() for direction in directions}


def exponent(lengths, times) -> float:
    x, y = np.log(lengths), np.log(times)
    return float(np.polyfit(x, y, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--backends", nargs="+", default=["numba", "numba-paper", "library"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--directions", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    args = parser.parse_args()
    import numba
    import torch

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    for backend in args.backends:  # warm-up: compile the kernels, load the library
        measure(backend, 4 * BLOCK, 1, args.directions)
    results = {(b, n): measure(b, n, args.repeats, args.directions) for b in args.backends for n in args.lengths}
    load_after = os.getloadavg()
    print(f"B={BATCH} H={HEADS} D={HEAD_DIM} float32, block {BLOCK}, non-causal; {args.threads} threads; "
          f"median of {args.repeats}, seconds; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print("| backend | direction | " + " | ".join(f"N={n}" for n in args.lengths) + " | growth exponent |")
    print("|---|---|" + "---|" * len(args.lengths) + "---|")
    for b in args.backends:
        for direction in args.directions:
            times = [results[b, n][direction] for n in args.lengths]
            print(f"| {b} | {direction} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {exponent(args.lengths, times):.2f} |")
            if b != "library":  # the public call = the input checks (registry, NumPy) + the Numba kernel
                checks = [results[b, n]["checks"] for n in args.lengths]
                kernel = [t - c for t, c in zip(times, checks)]
                print(f"| {b} | of which input checks | " + " | ".join(f"{c:.3f}" for c in checks) + " | |")
                print(f"| {b} | {direction} less the checks | " + " | ".join(f"{t:.3f}" for t in kernel)
                      + f" | {exponent(args.lengths, kernel):.2f} |")  # fmt: skip
    if "library" in args.backends and "numba" in args.backends:
        print("\nlibrary / numba (same function):")
        for direction in args.directions:
            ratios = [results["library", n][direction] / results["numba", n][direction] for n in args.lengths]
            print(f"  {direction}: " + ", ".join(f"N={n}: {r:.2f}x" for n, r in zip(args.lengths, ratios)))


if __name__ == "__main__":
    main()
