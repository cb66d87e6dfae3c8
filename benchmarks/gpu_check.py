"""The device check of the GPU path (issue 19): verify every ``cupy`` backend, then time it against SDPA.

One run, on one GPU, in under 8 minutes: no verification starts after ``--verify-budget-s`` (240)
seconds, no measurement is started that its prediction says would end after ``--budget-s`` (360),
and gpu_check.sh stops the run at 470 seconds.

1. **Verify**: every registered mechanism whose backends include ``"cupy"`` runs
   :func:`refattn.verify` through that backend against every conformance case, in float64 and
   float32, with gradients (what ``python -m pytest -q -m gpu tests/test_xp_path.py`` checks), in
   tiles of 16 x 32 so that the cases (N <= 80) cross tile edges.
2. **Time**: size by size (4K, 16K, 64K: ``--sizes``), PyTorch's CUDA ``scaled_dot_product_attention``
   and then each of those mechanisms (dense first) with a problem in :data:`PROBLEMS`, B = 1, H = 8,
   D = 64, N = Nq = Nk, float32 and float64: the forward and the backward of its tiled xp algorithm
   under CuPy in tiles of 1024 x 1024, with q, k, v already on the device (as a kernel author's are)
   and results left there. The backward is given the forward's result (``saved``), as autograd gives
   SDPA its own. Each time is the fastest of ``--repeats`` calls after one warm-up call, synchronised.
   ``--numba-sizes`` adds each mechanism's Numba forward on the machine's CPU.

It writes ``gpu_check.md`` (the tables) and ``gpu_check.json`` to ``$OUT`` (or ``./gpu_check_out``).
It installs nothing: CuPy, PyTorch and Numba are expected, and each missing one is named at the start
(and in the output); without CuPy and a device only ``--dry-run`` can run.

``--dry-run`` runs the same steps on the CPU with NumPy standing in for CuPy (the xp algorithm's
tested form) and PyTorch's CPU SDPA, at tiny N: it checks the script, not the GPU.

    bash benchmarks/gpu_check.sh                      # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --sizes 32 --mechanisms dense
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import refattn
from refattn.core import registry
from refattn.core import xp as core_xp
from refattn.core.results import Cotangents
from refattn.dense.inputs import DenseInputs

BATCH, HEADS, HEAD_DIM = 1, 8, 64
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
    # N = 64 · 2**k at every size: the paper's hierarchy, log2(N / 64) levels.
    "h1d": lambda n, rng: dict(block_size=64),
    # Block-sparse family: a band of 512 (and a global token per 4K), BigBird's 64-blocks with 3 random
    # blocks per row block, 256-token windows and segments.
    "longformer": lambda n, rng: dict(attention_window=512, global_tokens=(np.arange(n) % 4096 == 0)[None]),
    "bigbird": lambda n, rng: dict(block_size=64, random_blocks=rng.integers(1, n // 64 - 1, (HEADS, n // 64 - 2, 3))),
    "local": lambda n, rng: dict(window_size=min(256, n), causal=True),
    "segmented": lambda n, rng: dict(segment_len=min(256, n), causal=True, integration="lse_merge"),
    # Reformer's 4 rounds of 64 buckets in chunks of 64; routing's N / 256 clusters of 256.
    "lsh": lambda n, rng: dict(rotations=rng.standard_normal((HEADS, 4, HEAD_DIM, 32)), num_buckets=64, num_hashes=4,
                               chunk_len=64),  # fmt: skip
    "routing": lambda n, rng: dict(centroids=rng.standard_normal((HEADS, max(n // 256, 1), HEAD_DIM)),
                                   cluster_size=min(256, n)),  # fmt: skip
}


def qkv(name: str, n: int, rng) -> dict:
    """q, k, v of the benchmark shape (differential: 2H query and key heads, values 2D wide)."""
    if name == "differential":
        shapes = (2 * HEADS, HEAD_DIM), (2 * HEADS, HEAD_DIM), (HEADS, 2 * HEAD_DIM)
    else:
        shapes = (HEADS, HEAD_DIM), (HEADS, HEAD_DIM), (HEADS, HEAD_DIM)
    arrays = {key: rng.standard_normal((BATCH, heads, n, dim)) for key, (heads, dim) in zip("qkv", shapes)}
    return {"qk": arrays["q"], "v": arrays["v"]} if name == "lsh" else arrays  # LSH shares queries and keys


def checked(name: str, dtype: str, n: int, seed: int = 0):
    """The mechanism's checked inputs for the benchmark problem, arrays in ``dtype``."""
    rng = np.random.default_rng(seed)
    mechanism = registry.get(name)
    arguments = {key: value.astype(dtype) for key, value in qkv(name, n, rng).items()}
    arguments.update(PROBLEMS[name](n, rng))
    bound = inspect.signature(mechanism.forward).bind_partial(**arguments)
    bound.apply_defaults()
    return mechanism.check_inputs(**{k: v for k, v in bound.arguments.items() if k not in ("precision", "backend")})


def on_device(x, xp):
    """``x`` with the q, k, v of every dense problem in it moved to the device (other fields as they are)."""
    if isinstance(x, DenseInputs):
        return dataclasses.replace(x, q=xp.asarray(x.q), k=xp.asarray(x.k), v=xp.asarray(x.v))
    if isinstance(x, tuple):
        return tuple(on_device(item, xp) for item in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        changes = {f.name: on_device(getattr(x, f.name), xp) for f in dataclasses.fields(x)}
        return dataclasses.replace(x, **{k: v for k, v in changes.items() if v is not getattr(x, k)})
    return x


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


# --- step 2: time -------------------------------------------------------------------


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


def time_xp(name: str, dtype: str, n: int, xp, sync, repeats: int) -> dict:
    """Forward and backward seconds of the mechanism's xp algorithm, inputs and results on the device."""
    module = importlib.import_module(f"{registry.get(name).package}.xp")
    x = on_device(checked(name, dtype, n), xp)
    saved = module.forward(x, xp)
    dout = xp.asarray(np.random.default_rng(1).standard_normal(saved.out.shape).astype(dtype))
    cotangents = Cotangents(dout, None)
    return dict(forward=fastest(lambda: module.forward(x, xp), sync, repeats),
                backward=fastest(lambda: module.vjp(x, cotangents, xp, saved), sync, repeats))  # fmt: skip


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


def time_numba(name: str, dtype: str, n: int, repeats: int) -> dict:
    """Forward seconds of the mechanism's Numba backend on this machine's CPU (the first call compiles)."""
    module = registry.get(name).backend("numba")
    x = checked(name, dtype, n)
    return dict(numba_forward=fastest(lambda: module.forward(x), lambda: None, repeats))


def time_all(names, dtypes, sizes, xp, sync, torch, device, repeats, deadline, numba_sizes=()) -> tuple[list, list]:
    """The xp rows and the SDPA rows, size by size (every mechanism at 4K, then at 16K...), so that the
    budget cuts the largest sizes, not the last mechanisms. A measurement whose predicted time (the same
    row at the previous N, times (N / N_prev)²) would end after ``deadline`` (a ``time.perf_counter()``
    value) is skipped and says so. At ``numba_sizes``, each mechanism's Numba forward is timed too."""
    xp_rows, sdpa_rows, last = [], [], {}  # last[row's key] = (N, seconds) of its latest measurement

    def measure(row: dict, key: tuple, timer) -> None:
        n_last, seconds = last.get(key, (row["n"], 0.0))
        if time.perf_counter() + seconds * (row["n"] / n_last) ** 2 > deadline:
            row["note"] = "skipped: time budget"
            return
        begin = time.perf_counter()
        row.update(timer())
        last[key] = (row["n"], time.perf_counter() - begin)

    for n in sizes:
        for dtype in dtypes:
            row = dict(dtype=dtype, n=n, forward=None, backward=None, note="")
            if torch is None:
                row["note"] = "PyTorch missing"
            else:
                measure(row, ("sdpa", dtype), lambda: time_sdpa(torch, dtype, n, device, repeats))
            sdpa_rows.append(row)
        for name in names:
            for dtype in dtypes:
                row = dict(mechanism=name, dtype=dtype, n=n, forward=None, backward=None, note="")
                if name not in PROBLEMS:
                    row["note"] = "no benchmark problem written for it"
                elif n > HOST_AUX_MAX_N.get(name, n):
                    row["note"] = "skipped: its aux is (Nq, Nk) on the host"
                else:
                    measure(row, (name, dtype), lambda: time_xp(name, dtype, n, xp, sync, repeats))
                    if n in numba_sizes and "numba" in registry.get(name).backends:
                        measure(row, (name, dtype, "numba"), lambda: time_numba(name, dtype, n, repeats))
                print(f"time {name:16s} {dtype} N={n}: {row['forward']} {row['backward']} {row['note']}", flush=True)
                xp_rows.append(row)
    order = {name: i for i, name in enumerate(names)}
    xp_rows.sort(key=lambda row: (order[row["mechanism"]], row["dtype"], row["n"]))
    sdpa_rows.sort(key=lambda row: (row["dtype"], row["n"]))
    return xp_rows, sdpa_rows


# --- the report ---------------------------------------------------------------------


def _ms(seconds) -> str:
    return seconds if isinstance(seconds, str) else "" if seconds is None else f"{1e3 * seconds:.4g}"


def _ratio(ours, theirs) -> str:
    if not isinstance(ours, float) or not isinstance(theirs, float):
        return ""
    return f"{ours / theirs:.3g}"


def markdown(found: dict, verify_rows: list, xp_rows: list, sdpa_rows: list, settings: dict) -> str:
    """The report: what was found, the verification, SDPA's times and each mechanism's, with ratios."""
    lines = ["# GPU check", "", f"Settings: {json.dumps(settings)}", ""]
    lines += [f"* {name}: {line}" for name, (_, line) in found.items()]
    lines += ["", "## Verification (cupy backend, every conformance case, forward and gradients)", "",
              "| mechanism | dtype | result | pass | fail | seconds |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in verify_rows:
        counts = row["counts"]
        result = "ok" if row["ok"] else "FAILED" if counts else "not run (time budget)"
        lines.append(f"| {row['mechanism']} | {row['dtype']} | {result} | "
                     f"{counts.get('pass', 0)} | {counts.get('fail', 0)} | {row['seconds']} |")  # fmt: skip
    lines += ["", f"## PyTorch SDPA (B={BATCH}, H={HEADS}, D={HEAD_DIM}, N = Nq = Nk)", "",
              "| dtype | N | forward ms | backward ms | note |", "|---|---|---|---|---|"]  # fmt: skip
    sdpa = {}
    for row in sdpa_rows:
        sdpa[row["dtype"], row["n"]] = row
        lines.append(f"| {row['dtype']} | {row['n']} | {_ms(row['forward'])} | {_ms(row['backward'])} | {row['note']} |")
    lines += ["", "## refattn's xp algorithm under CuPy (inputs and results on the device)", "",
              "| mechanism | dtype | N | forward ms | x SDPA | backward ms | x SDPA | Numba forward ms (CPU) | "
              "Numba / xp | note |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in xp_rows:
        theirs = sdpa.get((row["dtype"], row["n"]), {})
        lines.append(
            f"| {row['mechanism']} | {row['dtype']} | {row['n']} | {_ms(row['forward'])} | "
            f"{_ratio(row['forward'], theirs.get('forward'))} | {_ms(row['backward'])} | "
            f"{_ratio(row['backward'], theirs.get('backward'))} | {_ms(row.get('numba_forward'))} | "
            f"{_ratio(row.get('numba_forward'), row['forward'])} | {row['note']} |"
        )
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [32, 64] if args.dry_run else [4096, 16384, 65536]
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
                    verify_budget_s=args.verify_budget_s, budget_s=args.budget_s, numba_sizes=args.numba_sizes)  # fmt: skip
    verify_rows = [] if args.skip_verify else verify_all(names, args.dtypes, started + args.verify_budget_s)
    write(args.out, found, verify_rows, [], [], settings)  # the verification survives a run stopped later
    set_blocks(names, args.blocks)
    xp_rows, sdpa_rows = time_all(names, args.dtypes, args.sizes, xp, sync, found["torch"][0], device,
                                  args.repeats, started + args.budget_s, args.numba_sizes)  # fmt: skip
    write(args.out, found, verify_rows, xp_rows, sdpa_rows, settings)
    return 0 if all(row["ok"] for row in verify_rows) else 1


def write(out: Path, found: dict, verify_rows: list, xp_rows: list, sdpa_rows: list, settings: dict) -> None:
    """``gpu_check.md`` and ``gpu_check.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(markdown(found, verify_rows, xp_rows, sdpa_rows, settings))
    results = dict(settings=settings, tools={name: line for name, (_, line) in found.items()},
                   verify=verify_rows, xp=xp_rows, sdpa=sdpa_rows)  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out / 'gpu_check.md'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
