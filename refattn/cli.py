"""The ``refattn`` command.

::

    refattn verify --mechanism M (--impl MODULE:FUNCTION|FILE.py:FUNCTION [--vjp ...] | --backend NAME)
                   [--suite DIR] [--require-official] [--case ID ...]
                   [--dtype float64|float32|float16|bfloat16] [--layout bhnd|bnhd]
                   [--grad] [--timeout SECONDS] [--json FILE] [--junit FILE] [--xfail FILE]
                   [--strict] [--require-aux] [--quiet]
    refattn export [--out DIR] [--mechanism M ...] [--large] [--check] [--quiet]
    refattn suite [--suite DIR]
    refattn show CASE_ID [--suite DIR]
    refattn plot (CASE_ID | --mechanism M [--n N] [--param NAME=VALUE ...]) -o FILE.png [--head H] [--batch B]
    refattn mechanisms [--names | --backends M | --contract [M ...]]
    refattn dilution [--sigma S] [--margin D] [--lengths N ...] [--samples M] [--seed K]
                     [--ssmax-s S] [--lam L] [--plot FILE]

Exit status: 0 when everything passed, 1 when a case failed, errored or
timed out (or, for ``export --check``, the folder has drifted), 2 for usage
errors, an implementation that cannot be imported, or a suite that cannot be
loaded, is custom under ``--require-official``, or has no case selected. A
status-2 error is one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .conformance.text import printable
from .core.precision import PRECISIONS

USAGE_ERROR = 2


class UsageError(Exception):
    """A problem with the command line or its files; printed, exit status 2."""


def main(argv=None) -> int:
    """Run the ``refattn`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        return args.run(args)
    except UsageError as exc:
        print(printable(f"refattn {args.command}: {' '.join(str(exc).split())}"), file=sys.stderr)
        return USAGE_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refattn", description="The golden oracle for attention mechanisms.")
    commands = parser.add_subparsers(dest="command", metavar="command")

    verify = commands.add_parser("verify", help="check an implementation against the conformance vectors")
    tested = verify.add_mutually_exclusive_group(required=True)
    tested.add_argument(
        "--impl", metavar="MODULE:FUNCTION", help="the implementation, impl(q, k, v, **kwargs): module:function or file.py:function"
    )
    tested.add_argument("--backend", metavar="NAME", help="a bundled backend of --mechanism (see refattn mechanisms)")
    verify.add_argument("--vjp", metavar="MODULE:FUNCTION", help="its gradients, vjp(dout, q, k, v, dlse=..., **kwargs)")
    verify.add_argument("--suite", metavar="DIR", help="suite folder (default: the published one)")
    verify.add_argument("--require-official", action="store_true", help="refuse a suite other than the published one")
    verify.add_argument("--mechanism", nargs="+", metavar="M", help="only these mechanisms")
    verify.add_argument("--case", nargs="+", metavar="ID", help="only these case ids (patterns like 'dense/causal*' too)")
    verify.add_argument("--dtype", choices=PRECISIONS, default="float64", help="precision of the inputs (default float64)")
    verify.add_argument("--layout", choices=("bhnd", "bnhd"), default="bhnd", help="layout of q, k, v, out (default bhnd)")
    verify.add_argument("--grad", action="store_true", help="also check gradients (needs --vjp or impl.vjp)")
    verify.add_argument("--timeout", type=float, metavar="SECONDS", help="per case, in a worker process; a hang is a timeout")
    verify.add_argument("--json", metavar="FILE", help="write the report as JSON")
    verify.add_argument("--junit", metavar="FILE", help="write the report as JUnit XML")
    verify.add_argument("--xfail", metavar="FILE", help="known bugs: a case id per line, its reason after # or in a comment above")
    verify.add_argument("--strict", action="store_true", help="unsupported cases (NotImplementedError) fail the run")
    verify.add_argument("--require-aux", action="store_true", help="partial cases (outputs not returned) fail the run")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(run=_verify)

    export = commands.add_parser("export", help="write the conformance vectors (or check them with --check)")
    export.add_argument("--out", default="conformance", metavar="DIR", help="suite folder (default ./conformance)")
    export.add_argument("--mechanism", nargs="+", metavar="M", help="only these mechanisms")
    export.add_argument("--large", action="store_true", help="also the long-sequence cases")
    export.add_argument("--check", action="store_true", help="compare DIR with a fresh export; exit 1 on drift")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(run=_export)

    suite = commands.add_parser("suite", help="where the suite in use lives, its format, version and manifest hash")
    suite.add_argument("--suite", metavar="DIR", help="suite folder (default: the published one)")
    suite.set_defaults(run=_suite)

    show = commands.add_parser("show", help="one case: description, flags, parameters, shapes, budgets")
    show.add_argument("case", metavar="CASE_ID")
    show.add_argument("--suite", metavar="DIR", help="suite folder (default: the published one)")
    show.set_defaults(run=_show)

    plot = commands.add_parser("plot", help="draw a case's attention pattern (needs matplotlib: the plot extra)")
    plot.add_argument("case", metavar="CASE_ID", nargs="?", help="a case of the suite")
    plot.add_argument("--mechanism", metavar="M", help="instead of a case: mechanism M on random inputs")
    plot.add_argument("--n", type=int, default=64, metavar="N", help="with --mechanism: sequence length (default 64)")
    plot.add_argument("--d", type=int, default=16, metavar="D", help="with --mechanism: head dim (default 16)")
    plot.add_argument("--seed", type=int, default=0, metavar="K", help="with --mechanism: seed of the inputs (default 0)")
    plot.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE",
        help="with --mechanism: a parameter, VALUE as JSON (causal=true, window=[4,0], n_hashes=2); repeatable",
    )  # fmt: skip
    plot.add_argument("--head", type=int, default=0, metavar="H", help="which query head (default 0)")
    plot.add_argument("--batch", type=int, default=0, metavar="B", help="which batch element (default 0)")
    plot.add_argument("--suite", metavar="DIR", help="suite folder (default: the published one)")
    plot.add_argument("-o", "--out", required=True, metavar="FILE", help="the image to write (.png, .svg, .pdf)")
    plot.set_defaults(run=_plot)

    mechanisms = commands.add_parser("mechanisms", help="list the registered mechanisms: backends, VJP, spec, cases")
    query = mechanisms.add_mutually_exclusive_group()
    query.add_argument("--names", action="store_true", help="only the names, one per line (for scripts)")
    query.add_argument("--backends", metavar="M",
                       help="only M's backends that can run here, one per line, reference first (for scripts)")  # fmt: skip
    query.add_argument("--contract", nargs="*", metavar="M",
                       help="the contract tables (inputs, parameters, outputs, aux; how each is compared) of M "
                            "(default: every mechanism), as conformance/README.md carries them")  # fmt: skip
    mechanisms.set_defaults(run=_mechanisms)

    dilution = commands.add_parser(
        "dilution", help="relevant-key mass and entropy against n: closed form, exact and measured (spec: dilution)"
    )
    dilution.add_argument("--sigma", type=float, default=1.0, metavar="S", help="noise logits' std σ (default 1)")
    dilution.add_argument("--margin", type=float, default=4.0, metavar="D", help="the relevant key's logit Δ (default 4)")
    dilution.add_argument(
        "--lengths", type=int, nargs="+", default=[16, 64, 256, 1024, 4096, 16384, 65536], metavar="N",
        help="numbers of keys n (default 16 64 ... 65536)",
    )  # fmt: skip
    dilution.add_argument("--samples", type=int, default=1000, metavar="M", help="sampled rows per n (default 1000)")
    dilution.add_argument("--seed", type=int, default=0, metavar="K", help="seed of the sampled noise (default 0)")
    dilution.add_argument("--ssmax-s", type=float, metavar="S", help="SSMax's s (default 1/margin, the critical value)")
    dilution.add_argument("--lam", type=float, default=0.8, metavar="L", help="differential attention's λ (default 0.8)")
    dilution.add_argument("--plot", metavar="FILE", help="also draw the figure (needs matplotlib: the plot extra)")
    dilution.set_defaults(run=_dilution)

    from . import fuzz
    from .lowrank import distance

    fuzzing = commands.add_parser("fuzz", help="fuzz an implementation against the oracle; shrink and save counterexamples")
    fuzz.add_arguments(fuzzing)
    fuzzing.set_defaults(run=fuzz.run)

    low_rank = commands.add_parser("low-rank", help="distance of low-rank attention from the best rank-r approximation")
    distance.add_arguments(low_rank)
    low_rank.set_defaults(run=distance.run)
    return parser


def _verify(args) -> int:
    from .conformance import verify as v
    from .conformance.suite import SuiteError, load_suite, mechanisms_named
    from .core.errors import SpecError

    if args.backend is not None and (args.mechanism is None or len(args.mechanism) != 1):
        raise UsageError("--backend needs --mechanism with one mechanism name")
    if args.backend is not None and args.vjp:
        raise UsageError("--vjp goes with --impl; --backend brings its own VJP")
    impl = _load("--impl", args.impl) if args.impl else None
    vjp = _load("--vjp", args.vjp) if args.vjp else getattr(impl, "vjp", None)
    if args.grad and impl is not None and vjp is None:
        raise UsageError("--grad needs --vjp MODULE:FUNCTION (or an implementation with a .vjp attribute)")
    try:
        suite = load_suite(args.suite or v.default_suite_folder(), args.mechanism or mechanisms_named(args.case))
        xfail = v.read_xfail(args.xfail) if args.xfail else {}
        mechanism = args.mechanism[0] if args.backend is not None else args.mechanism
        report = v.verify(
            impl, suite=suite, mechanism=mechanism, ids=args.case, dtype=args.dtype, layout=args.layout,
            grad=args.grad, vjp=vjp, xfail=xfail, name=args.impl, backend=args.backend, timeout=args.timeout,
            require_official=args.require_official, strict=args.strict, require_aux=args.require_aux,
            progress=False if args.quiet else None,
        )  # fmt: skip
    except (OSError, ValueError) as exc:  # no suite, an unreadable file, a selection matching nothing, a bad xfail file
        raise UsageError(str(exc)) from exc
    print(report.format())
    if args.json:
        Path(args.json).write_text(report.to_json(), encoding="utf-8")
    if args.junit:
        Path(args.junit).write_text(report.to_junit(), encoding="utf-8")
    return 0 if report.ok else 1


def _load(option: str, spec: str):
    """Import ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION``, looking in the current directory first (as ``python -m`` does)."""
    from .conformance.verify import load_callable

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return load_callable(spec)
    except Exception as exc:  # noqa: BLE001 -- importing someone's module may raise anything: one line, exit 2
        raise UsageError(f"cannot load {option} {spec}: {type(exc).__name__}: {exc}") from exc


def _export(args) -> int:
    from .conformance import export

    if args.check:
        drift = export.check(args.out, mechanisms=args.mechanism, large=args.large, progress=False if args.quiet else None)
        for message in drift:
            print(message)
        print(f"{args.out}: {'drifted' if drift else 'current'}")
        return 1 if drift else 0
    export.export(args.out, mechanisms=args.mechanism, large=args.large, progress=False if args.quiet else None)
    print(f"wrote {args.out}")
    return 0


def _loaded_suite(folder: str | None, mechanisms=None):
    """The suite in ``folder`` (default: the published one), or a UsageError saying why not."""
    from .conformance.suite import load_suite
    from .conformance.verify import default_suite_folder

    try:
        return load_suite(folder or default_suite_folder(), mechanisms)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _suite(args) -> int:
    """Where the suite in use lives, its format and refattn versions, its manifest hash and its origin."""
    suite = _loaded_suite(args.suite)
    print(f"suite: {Path(suite.folder).resolve()}")
    print(f"origin: {suite.origin.describe()}")
    print(f"format_version: {suite.manifest['format_version']}")
    print(f"refattn_version: {suite.manifest['refattn_version']} (exported it)")
    print(f"manifest_sha256: {suite.origin.manifest_sha256}")
    mechanisms = sorted({case.mechanism for case in suite.cases})
    print(f"cases: {len(suite.cases)} of {len(mechanisms)} mechanisms")
    return 0


def _show(args) -> int:
    from .conformance.show import describe_case

    suite = _loaded_suite(args.suite, _mechanism_of(args.case))
    case = _one_case(suite, args.case)
    print(describe_case(case, suite.manifest["flags"]))
    return 0


def _mechanism_of(case_id: str):
    """The mechanism a case id names (``dense/causal`` -> ``dense``), to load only its cases; None if unclear."""
    prefix = case_id.split("/", 1)[0]
    return (prefix,) if "/" in case_id and not set(prefix) & set("*?[") else None


def _one_case(suite, case_id: str):
    matches = [case for case in suite.cases if case.id == case_id]
    if not matches:
        raise UsageError(f"no case {case_id!r} in {suite.folder} (ids look like 'dense/causal_mask'; `refattn show` takes one)")
    return matches[0]


def _plot(args) -> int:
    import json

    from .core.errors import SpecError

    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("plot needs matplotlib: pip install 'refattn[plot]'") from exc
    from .conformance import plot

    if (args.case is None) == (args.mechanism is None):
        raise UsageError("give a CASE_ID or --mechanism M (one of them)")
    try:
        if args.case is not None:
            suite = _loaded_suite(args.suite, _mechanism_of(args.case))
            picture = plot.case_picture(_one_case(suite, args.case), batch=args.batch, head=args.head)
        else:
            params = {}
            for item in args.param:
                name, sep, value = item.partition("=")
                if not sep:
                    raise UsageError(f"--param {item!r}: expected NAME=VALUE")
                try:
                    params[name] = plot.json_parameter(json.loads(value))
                except json.JSONDecodeError:
                    params[name] = value  # a bare word: a string (preset=hf)
            picture = plot.mechanism_picture(args.mechanism, n=args.n, d=args.d, seed=args.seed, params=params,
                                             head=args.head)  # fmt: skip
        plot.draw(picture, args.out)
    except (SpecError, TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc}") from exc
    print(f"wrote {args.out}")
    return 0


def _mechanisms(args) -> int:
    """The contract's view of every mechanism, or bare names (``--names``) or backends (``--backends M``)."""
    from .core import registry
    from .core.errors import SpecError

    if args.names:
        print("\n".join(registry.names()))
        return 0
    if args.backends is not None:
        try:
            print("\n".join(registry.get(args.backends).available_backends()))
        except SpecError as exc:
            raise UsageError(str(exc)) from exc
        return 0
    if args.contract is not None:
        from .conformance.contract import contract_tables
        from .conformance.verify import default_suite_folder

        try:
            print(contract_tables(default_suite_folder(), [registry.get(name).name for name in args.contract] or None), end="")
        except SpecError as exc:
            raise UsageError(str(exc)) from exc
        return 0
    rows = [("mechanism", "backends", "vjp", "cases", "spec")]
    for name in registry.names():
        mechanism = registry.get(name)
        has_vjp = "yes" if mechanism.vjp is not None else "no"
        backends = [b if b in mechanism.available_backends() else f"{b} (no device)" for b in mechanism.backends]
        rows.append((name, ", ".join(backends), has_vjp, str(len(mechanism.cases())), mechanism.spec))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _dilution(args) -> int:
    from .core.errors import SpecError
    from .dilution import analysis

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise UsageError("--plot needs matplotlib: pip install 'refattn[plot]'") from exc
    try:
        setting = analysis.Setting(margin=args.margin, sigma=args.sigma, ssmax_s=args.ssmax_s, lam=args.lam)
        rows = analysis.dilution_table(args.lengths, setting, samples=args.samples, seed=args.seed)
    except SpecError as exc:
        raise UsageError(str(exc)) from exc
    print(analysis.format_table(rows, setting, samples=args.samples, seed=args.seed))
    if args.plot:
        try:
            analysis.plot_dilution(rows, setting, args.plot, samples=args.samples)
        except OSError as exc:
            raise UsageError(f"cannot write --plot {args.plot}: {exc}") from exc
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
