"""Low-rank attention, forward (and backward): refattn's numba kernels vs the libraries on CPU.

B = 1, H = 8, D = Dv = 64, float32, N = Nq = Nk, not causal, no mask. The
sizes are the libraries' defaults: Linformer P = 256 projected positions
(lucidrains' ``k=256``), Nyström m = 256 landmarks (lucidrains'
``num_landmarks=256``), 6 iterations, a depthwise residual convolution of
width 33 (lucidrains' ``residual_conv_kernel=33``; HF's config gets the same
width), Performer m = int(D ln D) = 266 features (performer-pytorch's
default ``nb_features``).

For each (mechanism, backend, N, direction) a fresh subprocess builds the
inputs, warms up (compiles) on a small problem, then times ``--repeats``
calls and keeps the fastest. It reports

* time (wall clock, seconds, fastest of the repeats);
* peak memory growth: the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs just before the call) minus its resident set before
  it, less the bytes of the call's outputs (RSS, not tracemalloc, which does
  not see Numba's allocations).

Backends:

* ``numba``: refattn's public function with ``backend="numba"`` on float32
  inputs (it validates them, then computes in float32; "backward" is the
  public VJP, which recomputes the forward);
* ``lucidrains``: ``linformer.LinformerSelfAttention``,
  ``nystrom_attention.NystromAttention`` (dim = H·D, dim_head = D) and
  ``performer_pytorch.FastAttention``; refattn gets the modules' own q, k,
  v, projections, convolution and features (the adapters in examples/),
  computed before the measurement. The modules' times include their input
  and output projections (``to_q``/``to_k``/``to_v``/``to_out``,
  ``to_qkv``/``to_out``), which are timed apart in the same child and printed
  as "projections alone"; ``FastAttention`` takes q, k, v and has none;
* ``hf``: transformers' ``NystromformerSelfAttention`` (m = 256,
  ``segment_means_seq_len = N``, conv width 33), with its query/key/value
  projections timed apart likewise.

"backward" for the libraries is ``out.backward(dout)`` after an autograd
forward that is not timed. Below the table: the ratios library / numba of the
same run, and each backend's growth exponent of time with N (least-squares
slope of log t against log N).

Usage::

    PYTHONPATH=. python benchmarks/bench_lowrank.py --lengths 4096 16384 65536 --repeats 2 --threads 2
    PYTHONPATH=. python benchmarks/bench_lowrank.py --mechanisms performer --lengths 4096 --directions forward backward
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

from harness import measure  # benchmarks/harness.py, beside this script

BATCH, HEADS, HEAD_DIM = 1, 8, 64
PROJECTED = 256  # Linformer P
LANDMARKS = 256  # Nyström m
ITERATIONS = 6
CONV_WIDTH = 33
FEATURES = int(HEAD_DIM * math.log(HEAD_DIM))  # 266, performer-pytorch's default
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = {"linformer": ("lucidrains",), "nystrom": ("lucidrains", "hf"), "performer": ("lucidrains",)}


# --------------------------------------------------------------------------
# Inside the measuring subprocess.
# --------------------------------------------------------------------------


def _example(name: str):
    if os.path.join(REPO, "examples") not in sys.path:  # the adapters import their neighbours (the gallery entry)
        sys.path.insert(0, os.path.join(REPO, "examples"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _library(mechanism: str, backend: str, n: int):
    """``(module, run(x_or_qkv) -> out, inputs, projections(inputs) or None, refattn (q, k, v, params))``."""
    import torch

    torch.manual_seed(0)
    dim = HEADS * HEAD_DIM
    x = torch.randn(BATCH, n, dim)
    if mechanism == "linformer":
        from linformer import LinformerSelfAttention

        module = LinformerSelfAttention(dim=dim, seq_len=n, k=PROJECTED, heads=HEADS).eval()
        q, k, v, params = _example("linformer_lucidrains").refattn_inputs(module, x)
        projections = lambda x: module.to_out(torch.cat([module.to_q(x), module.to_k(x), module.to_v(x)], -1)[..., :dim])  # noqa: E731
        return module, module, (x,), projections, (q, k, v, params)
    if mechanism == "nystrom" and backend == "lucidrains":
        from nystrom_attention import NystromAttention

        module = NystromAttention(dim=dim, dim_head=HEAD_DIM, heads=HEADS, num_landmarks=LANDMARKS,
                                  pinv_iterations=ITERATIONS, residual_conv_kernel=CONV_WIDTH).eval()  # fmt: skip
        q, k, v, params = _example("nystrom_lucidrains").refattn_inputs(module, x)
        projections = lambda x: module.to_out(module.to_qkv(x)[..., :dim])  # noqa: E731
        return module, module, (x,), projections, (q, k, v, params)
    if mechanism == "nystrom":
        from transformers import NystromformerConfig
        from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention

        config = NystromformerConfig(hidden_size=dim, num_attention_heads=HEADS, num_landmarks=LANDMARKS, segment_means_seq_len=n,
                                     conv_kernel_size=CONV_WIDTH, attention_probs_dropout_prob=0.0)  # fmt: skip
        module = NystromformerSelfAttention(config).eval()
        q, k, v, params = _example("nystrom_hf").refattn_inputs(module, x)
        projections = lambda x: torch.cat([module.query(x), module.key(x), module.value(x)], -1)  # noqa: E731
        return module, lambda x: module(x)[0], (x,), projections, (q, k, v, params)
    from performer_pytorch import FastAttention

    module = FastAttention(dim_heads=HEAD_DIM, nb_features=FEATURES)
    q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM) for _ in range(3))
    params = _example("performer_lucidrains").refattn_params(module)
    return module, module, (q, k, v), None, tuple(t.numpy() for t in (q, k, v)) + (params,)


def _numba_call(mechanism: str, arrays, direction: str):
    """The public function (or VJP) with backend="numba" on float32 inputs: a call returning its outputs' bytes."""
    import numpy as np

    from refattn import lowrank

    q, k, v, params = arrays
    q, k, v = (np.ascontiguousarray(a, np.float32) for a in (q, k, v))
    params = {n: p.astype(np.float32) if isinstance(p, np.ndarray) and p.dtype.kind == "f" else p for n, p in params.items()}
    forward = getattr(lowrank, f"{mechanism}_attention")
    if direction == "forward":
        return lambda: forward(q, k, v, backend="numba", **params).out.nbytes
    vjp = getattr(lowrank, f"{mechanism}_attention_vjp")
    dout = np.random.default_rng(1).standard_normal(q.shape[:3] + v.shape[3:]).astype(np.float32)
    dlse = np.zeros(q.shape[:3], np.float32) if mechanism == "linformer" else None
    extra = {"dlse": dlse} if dlse is not None else {}
    return lambda: sum(g.nbytes for g in vjp(dout, q, k, v, backend="numba", **extra, **params).values())


def _torch_forward(run, inputs):
    """The library's forward without autograd: a call returning its output's bytes."""
    import torch

    def call():
        with torch.no_grad():
            return _nbytes_of(run(*inputs))

    return call


def _nbytes_of(t) -> int:
    return t.element_size() * t.nelement()


def child(mechanism: str, backend: str, n: int, direction: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    if backend == "numba":
        # Compile on a small problem first, then build the real one (from the lucidrains module's weights).
        measure(_numba_call(mechanism, _library(mechanism, "lucidrains", 512)[4], direction), 1)
        return measure(_numba_call(mechanism, _library(mechanism, "lucidrains", n)[4], direction), repeats)
    module, run, inputs, projections, _ = _library(mechanism, backend, n)
    if direction == "forward":
        result = measure(_torch_forward(run, inputs), repeats)
    else:  # time the backward alone: forward outside the timed region
        leaves = [t.detach().requires_grad_() for t in inputs]
        times, peaks = [], []
        for _ in range(repeats):
            out = run(*leaves)
            result = measure(lambda: (out.backward(torch.ones_like(out)), sum(_nbytes_of(t.grad) for t in leaves))[1], 1)
            times.append(result["time"])
            for t in leaves:
                t.grad = None
        result["time"] = min(times)
    if projections is not None:
        x = inputs[0]
        if direction == "forward":
            with torch.no_grad():
                result["projection_time"] = measure(lambda: _nbytes_of(projections(x)), repeats)["time"]
        else:
            leaf = x.detach().requires_grad_()
            out = projections(leaf)
            result["projection_time"] = measure(lambda: (out.backward(torch.ones_like(out), retain_graph=True), 0)[1], 1)["time"]
    return result


# --------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------


def _run_child(args, mechanism, backend, n, direction) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BENCH_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mechanism, backend, str(n), direction, "--repeats", str(args.repeats)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over --timeout {args.timeout} s (killed after {time.perf_counter() - start:.0f} s)"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(x: float) -> str:
    # Below 1 MiB, or negative: the outputs' pages were partly memory the process already held.
    return "<1" if x < 1 else f"{x:.0f}"


def growth_exponent(lengths, times) -> float:
    """Least-squares slope of log t against log N."""
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in times]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def _summaries(rows, lengths, directions, plan) -> list[str]:
    """Ratios library / numba per mechanism, N and direction, and each backend's growth exponent."""
    timed = {(r["mechanism"], r["backend"], r["n"], r["direction"]): r for r in rows if "error" not in r}
    lines = ["", "| mechanism | N | direction | library | library / numba | library's projections alone (s) |",
             "|---|---|---|---|---:|---:|"]  # fmt: skip
    for mechanism, backends in plan:
        for n in lengths:
            for direction in directions:
                nb = timed.get((mechanism, "numba", n, direction))
                for backend in backends:
                    lib = timed.get((mechanism, backend, n, direction))
                    if lib and nb and backend != "numba":
                        alone = f"{lib['projection_time']:.3f}" if "projection_time" in lib else "none"
                        lines.append(f"| {mechanism} | {n} | {direction} | {backend} | {lib['time'] / nb['time']:.2f} | {alone} |")
    lines += ["", "| mechanism | backend | direction | lengths | growth exponent of time |", "|---|---|---|---|---:|"]
    for mechanism, backends in plan:
        for backend in backends:
            for direction in directions:
                measured = [(n, timed[(mechanism, backend, n, direction)]["time"]) for n in lengths
                            if (mechanism, backend, n, direction) in timed]  # fmt: skip
                if len(measured) >= 2:
                    ns, ts = zip(*measured)
                    lines.append(f"| {mechanism} | {backend} | {direction} | {', '.join(map(str, ns))} | {growth_exponent(ns, ts):.2f} |")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--mechanisms", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--backends", nargs="+", default=["numba", "lucidrains", "hf"], choices=["numba", "lucidrains", "hf"])
    parser.add_argument("--directions", nargs="+", default=["forward"], choices=["forward", "backward"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--child", nargs=4, metavar=("MECHANISM", "BACKEND", "N", "DIRECTION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        mechanism, backend, n, direction = args.child
        print(json.dumps(child(mechanism, backend, int(n), direction, args.repeats)))
        return

    plan = [(m, [b for b in ("numba",) + PEERS[m] if b in args.backends]) for m in args.mechanisms]
    print(f"# low-rank attention, B={BATCH} H={HEADS} D={HEAD_DIM} float32, not causal; P={PROJECTED}, m={LANDMARKS} "
          f"landmarks ({ITERATIONS} iterations, conv {CONV_WIDTH}), {FEATURES} features; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    print("| mechanism | N | direction | backend | time (s) | peak growth beyond outputs (MiB) |")
    print("|---|---|---|---|---:|---:|", flush=True)
    rows = []
    for mechanism, backends in plan:
        for n in args.lengths:
            for direction in args.directions:
                for backend in backends:
                    res = _run_child(args, mechanism, backend, n, direction)
                    res.update(mechanism=mechanism, n=n, direction=direction, backend=backend)
                    rows.append(res)
                    shown = f"error: {res['error']} |" if "error" in res else f"{res['time']:.3f} | {_mib(res['beyond_outputs_mib'])}"
                    print(f"| {mechanism} | {n} | {direction} | {backend} | {shown} |", flush=True)
    print("\n".join(_summaries(rows, args.lengths, args.directions, plan)))
    print(f"\nload average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
