"""Dense attention, forward and backward: reference vs numba vs PyTorch SDPA on CPU.

B = 1, H = 8, D = 64, float32, N = Nq = Nk. For each (backend, N, direction)
a fresh subprocess builds the inputs, warms up (compiles) on a small problem,
then times ``--repeats`` calls and keeps the fastest. It reports

* time (wall clock, seconds, fastest of the repeats);
* achieved GFLOP/s, counting the forward as 4·B·H·Nq·Nk·D FLOPs (two
  matrix products) -- halved under ``--causal`` -- and the backward as 2.5x
  the forward (FlashAttention's convention: five matrix products), whatever
  the implementation really does (see "backward" below);
* peak memory growth: the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs just before the call) minus its resident set before
  it, less the bytes of the call's outputs. RSS, not tracemalloc, because
  Numba's allocations inside compiled code are invisible to tracemalloc.
  For numba two numbers: the public call (which first validates its inputs
  into float64 copies, refattn/dense/inputs.py) and the kernels alone
  (inputs validated and cast before the measurement starts).

"backward" is the public VJP for reference and numba; numba's is given the
result of a forward run outside the timed region (``saved=``, its out and
lse), or, with ``--stateless``, not, and then runs the forward again; the
reference ignores ``saved``. For torch it is ``out.backward(dout)`` after a
forward with autograd (SDPA saves its logsumexp), also outside the timed region.

The machine's float32 matmul rate (numpy, 2048^3, same threads) is printed
beside the table. ``--threads`` sets NUMBA_NUM_THREADS, OMP/OpenBLAS threads
and torch.set_num_threads alike (default: all cores).

Usage::

    PYTHONPATH=. python benchmarks/bench_dense.py --lengths 1024 2048 4096 --repeats 3
    PYTHONPATH=. python benchmarks/bench_dense.py --lengths 65536 --backends numba --directions forward
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from harness import measure  # benchmarks/harness.py, beside this script

BATCH, HEADS, HEAD_DIM = 1, 8, 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Inside the measuring subprocess.
# --------------------------------------------------------------------------


def _inputs(n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (BATCH, HEADS, n, HEAD_DIM)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]  # q, k, v, dout


def _nbytes(*arrays) -> int:
    return sum(int(a.nbytes) for a in arrays)


def child(backend: str, n: int, direction: str, causal: bool, repeats: int, stateless: bool = False) -> dict:
    import numpy as np

    q, k, v, dout = _inputs(n)
    small = [x[:, :, :128] for x in _inputs(128, seed=1)]
    result = {}
    if backend in ("reference", "numba"):
        import refattn

        def forward(q, k, v):
            r = refattn.dense_attention(q, k, v, causal=causal, backend=backend)
            return _nbytes(r.out, r.lse)

        def backward(q, k, v, dout, saved):
            g = refattn.dense_attention_vjp(dout, q, k, v, causal=causal, saved=saved, backend=backend)
            return _nbytes(*g.values())

        def saved_forward(q, k, v):
            # The forward's result, as autograd saves it for torch (the reference ignores it).
            if backend == "reference" or stateless:
                return None
            return refattn.dense_attention(q, k, v, causal=causal, backend=backend)

        if direction == "forward":
            forward(*small[:3])  # compile / warm up
            result = measure(lambda: forward(q, k, v), repeats)
        else:
            backward(*small, saved_forward(*small[:3]))  # compile / warm up
            saved = saved_forward(q, k, v)  # outside the timed and measured region
            result = measure(lambda: backward(q, k, v, dout, saved), repeats)
        if backend == "numba":
            result["kernel_beyond_outputs_mib"] = _kernel_only(q, k, v, dout, direction, causal)
    elif backend == "torch":
        import torch

        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        tq, tk, tv, tdout = (torch.from_numpy(x) for x in (q, k, v, dout))

        def forward(q, k, v):
            with torch.no_grad():
                out = sdpa(q, k, v, is_causal=causal)
            return out.numel() * out.element_size()

        def backward_prepared(q, k, v, dout):
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            out = sdpa(*leaves, is_causal=causal)
            return leaves, out

        small_t = [torch.from_numpy(np.ascontiguousarray(x)) for x in small]
        if direction == "forward":
            forward(*small_t[:3])
            result = measure(lambda: forward(tq, tk, tv), repeats)
        else:
            leaves, out = backward_prepared(*small_t)
            out.backward(small_t[3])
            state = {}

            def backward():
                leaves, out = state["prepared"]
                out.backward(tdout)
                return sum(x.grad.numel() * x.grad.element_size() for x in leaves)

            # The forward (with autograd) runs outside the timed and measured region.
            times, growths, beyond = [], [], []
            for _ in range(repeats):
                state["prepared"] = backward_prepared(tq, tk, tv, tdout)
                one = measure(backward, 1)
                times.append(one["time"])
                growths.append(one["peak_growth_mib"])
                beyond.append(one["beyond_outputs_mib"])
                del state["prepared"]
            result = {"time": min(times), "peak_growth_mib": growths[0], "beyond_outputs_mib": beyond[0]}
    else:
        raise SystemExit(f"unknown backend {backend!r}")
    return result


def _kernel_only(q, k, v, dout, direction: str, causal: bool) -> float:
    """Peak growth of the numba backend alone, beyond its outputs (MiB): inputs checked
    before the measurement starts; the backward is given the forward's ``saved`` result."""
    from refattn.core.results import Cotangents
    from refattn.dense import numba as kernels
    from refattn.dense.inputs import check_dense_inputs

    params = dict(mask=None, bias=None, causal=causal, causal_alignment="bottom_right", window=None, scale=None,
                  softcap=0.0, dropout_keep=None, dropout_p=0.0)  # fmt: skip
    x = check_dense_inputs(q, k, v, **params)

    def forward():
        result = kernels.forward(x)
        return _nbytes(result.out, result.lse)

    if direction == "forward":
        return measure(forward, 1)["beyond_outputs_mib"]
    saved = kernels.forward(x)
    cotangents = Cotangents(dout=dout, dlse=None)
    return measure(lambda: _nbytes(*kernels.vjp(x, cotangents, saved).values()), 1)["beyond_outputs_mib"]


def matmul_gflops() -> float:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# --------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------


def _run_child(args, backend, n, direction) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BENCH_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, str(n), direction,
           "--repeats", str(args.repeats)] + (["--causal"] if args.causal else [])  # fmt: skip
    cmd += ["--stateless"] if args.stateless else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(x: float) -> str:
    # Below 1 MiB, or negative: the outputs' pages were partly memory the
    # process already held (RSS counts pages, not allocations).
    return "<1" if x < 1 else f"{x:.0f}"


def _flops(n: int, direction: str, causal: bool) -> float:
    forward = 4 * BATCH * HEADS * n * n * HEAD_DIM / (2 if causal else 1)
    return forward if direction == "forward" else 2.5 * forward


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["reference", "numba", "torch"])
    parser.add_argument("--directions", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--stateless", action="store_true",
                        help="numba backward without the forward's saved result (it runs the forward again)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reference-max", type=int, default=4096,
                        help="longest N for the reference backend, whose (B, H, N, N) float64 intermediates "
                             "take 8·H·N² bytes each (1 GiB at N = 4096; its backward peaks at ~5 GiB)")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per measurement")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "N", "DIRECTION"), help=argparse.SUPPRESS)
    parser.add_argument("--matmul-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.matmul_child:
        print(json.dumps(matmul_gflops()))
        return
    if args.child:
        backend, n, direction = args.child
        print(json.dumps(child(backend, int(n), direction, args.causal, args.repeats, args.stateless)))
        return

    backends = list(args.backends)
    if "torch" in backends:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: skipping the torch backend", file=sys.stderr)
            backends.remove("torch")

    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    mm = json.loads(subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--matmul-child"], capture_output=True, text=True, check=True
    ).stdout)  # in a subprocess, so that the thread settings above apply
    print(f"# dense attention, B={BATCH} H={HEADS} D={HEAD_DIM} float32, causal={args.causal}, "
          f"{'stateless numba backward, ' if args.stateless else ''}{args.threads} threads; numpy float32 matmul 2048^3: {mm:.0f} GFLOP/s", flush=True)  # fmt: skip
    header = "| N | direction | backend | time (s) | GFLOP/s | % of matmul | peak growth beyond outputs (MiB) |"
    print(header)
    print("|---|---|---|---:|---:|---:|---|", flush=True)
    rows = []
    for n in args.lengths:
        for direction in args.directions:
            for backend in backends:
                if backend == "reference" and n > args.reference_max:
                    skipped = f"skipped: its N×N buffers (N > --reference-max {args.reference_max})"
                    print(f"| {n} | {direction} | reference | {skipped} | | | |", flush=True)
                    continue
                res = _run_child(args, backend, n, direction)
                res.update(n=n, direction=direction, backend=backend)
                rows.append(res)
                if "error" in res:
                    print(f"| {n} | {direction} | {backend} | error: {res['error']} | | | |", flush=True)
                    continue
                gflops = _flops(n, direction, args.causal) / res["time"] / 1e9
                memory = _mib(res["beyond_outputs_mib"])
                if "kernel_beyond_outputs_mib" in res:
                    memory += f" (kernels alone: {_mib(res['kernel_beyond_outputs_mib'])})"
                share = f"{100 * gflops / mm:.0f}%"
                cells = [n, direction, backend, f"{res['time']:.3f}", f"{gflops:.1f}", share, memory]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": mm, "threads": args.threads, "causal": args.causal, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
