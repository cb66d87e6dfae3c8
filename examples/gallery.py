"""The compatibility gallery: real libraries verified against refattn's vectors.

::

    python examples/gallery.py            # run every entry, write docs/compatibility.md
    python examples/gallery.py --check    # run them, exit 1 if the result differs from the committed table

Every adapter file in this folder declares its rows: a module-level
``GALLERY = (Entry(...), ...)`` (:class:`_gallery_entry.Entry`: the library,
the adapter function, mechanism, dtype, gradients) and
``EXPLANATIONS = {FLAG: "why"}``, which explains, citing the library's own
source, why a case with that flag does not pass against that library. Each
entry is run by :func:`refattn.verify` on the published suite. The table
gives, per library and version, the cases passed, partial (an output not
returned), unsupported (the library cannot express the case) and failed;
below it every case that did not pass is listed with its flags and the flag
that explains it. A failure that no flag of the file explains makes the run
fail: the gallery explains every non-pass.

Files are visited in name order and their entries in the order they list
them, so the table is the same from run to run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

from refattn.conformance.manifest import SuiteError
from refattn.conformance.verify import verify

HERE = Path(__file__).resolve().parent
TABLE = HERE.parent / "docs" / "compatibility.md"
HEADER = """\
# Compatibility gallery

Real libraries verified against refattn's conformance vectors, produced by `python examples/gallery.py`
from a real run (CI reruns it with `--check` and fails when a result differs from this table). Each adapter
in `examples/` declares its rows (`GALLERY`) and explains its non-passing cases by flag, citing the
library's source (`EXPLANATIONS`). "partial": passed, but the library does not return an output the case
checks (usually the log-sum-exp; gradients are then checked for `dout` alone). "unsupported": the adapter
raised `NotImplementedError` because the library cannot express the case (the reason is listed).

| library | function | adapter | mechanism | dtype | gradients | passed | partial | unsupported | failed |
|---|---|---|---|---|---|---|---|---|---|"""


def _keep_peers_first() -> None:
    """Put this folder last on ``sys.path``: adapter files named like their library must not shadow it."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]


def adapters() -> list[ModuleType]:
    """Every adapter module of this folder (``_*.py`` are helpers), in file-name order.

    Raises
    ------
    ValueError
        For an adapter without ``GALLERY`` or ``EXPLANATIONS``: every peer library is in the gallery.
    """
    _keep_peers_first()
    found = []
    for path in sorted(HERE.glob("*.py")):
        if path.name.startswith("_") or path.stem == "gallery":
            continue
        spec = importlib.util.spec_from_file_location(f"gallery_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "GALLERY") or not hasattr(module, "EXPLANATIONS"):
            raise ValueError(f"{path}: an adapter declares GALLERY = (Entry(...), ...) and EXPLANATIONS = {{FLAG: why}}")
        found.append(module)
    return found


def run_entry(module: ModuleType, entry):
    """The verify() report of one entry."""
    impl = getattr(module, entry.impl)
    vjp = getattr(module, entry.vjp) if entry.vjp else None
    return verify(impl, vjp=vjp, mechanism=entry.mechanism, dtype=entry.dtype, layout=entry.layout, grad=entry.grad,
                  name=f"{Path(module.__file__).name}:{entry.impl}")  # fmt: skip


def explaining_flag(module: ModuleType, entry, case) -> str | None:
    """The dtype (``FLOAT64``...) if the adapter explains it, else the first of the case's flags it explains, or None.

    A precision explanation covers every case of its rows: a library that computes in float32 misses a float64
    budget whatever else the case checks; the float32 rows show the rest.
    """
    for flag in (entry.dtype.upper(), *case.flags):
        if flag in module.EXPLANATIONS:
            return flag
    return None


def section(module: ModuleType, entry, report, version: str, unexplained: list[str]) -> list[str]:
    """The markdown listing one entry's non-passing cases and the explanations they use."""
    lines, used = [], []
    for case in report.cases:
        if case.status == "pass":
            continue
        if case.status == "unsupported":
            why = f"unsupported: {case.message}"
        elif case.status == "partial":
            why = f"partial: not returned {', '.join(case.missing)}"
        else:
            flag = explaining_flag(module, entry, case)
            if flag is None:
                unexplained.append(f"{Path(module.__file__).name} {entry.impl} {entry.dtype}: {case.id} ({case.status})")
            elif flag not in used:
                used.append(flag)
            why = f"{case.status} at {case.first_stage or 'the call'}: {flag or 'UNEXPLAINED'}"
        lines.append(f"- `{case.id}` ({', '.join(case.flags)}): {why}")
    if not lines:
        return []
    title = f"### {entry.library} {version}: {entry.what}, {entry.dtype}{', gradients' if entry.grad else ''}"
    notes = [f"- **{flag}**: {module.EXPLANATIONS[flag]}" for flag in used]
    return [title, "", *lines, *(["", "Why:", "", *notes] if notes else []), ""]


def table() -> tuple[str, list[str]]:
    """The gallery's markdown, and the failures it cannot explain; prints each entry's time on stderr."""
    rows, details, unexplained = [], [], []
    for module in adapters():
        for entry in module.GALLERY:
            start = time.perf_counter()
            name = f"{Path(module.__file__).name}:{entry.impl}"
            try:
                report = run_entry(module, entry)
            except SuiteError as error:  # the published suite itself is broken: no row can be trusted
                unexplained.append(f"{name} {entry.dtype}: the suite does not load: {error}")
                continue
            print(f"{name} {entry.dtype}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
            counts = report.counts()
            version = importlib.metadata.version(entry.library)
            failed = counts["fail"] + counts["error"] + counts["timeout"]
            rows.append(f"| {entry.library} {version} | {entry.what} | `{name}` | "
                        f"{entry.mechanism} | {entry.dtype} | {'yes' if entry.grad else 'no'} | {counts['pass']} | "
                        f"{counts['partial']} | {counts['unsupported']} | {failed} |")  # fmt: skip
            details += section(module, entry, report, version, unexplained)
    text = "\n".join([HEADER, *rows, "", "## Every case that did not pass, and why", "", *details])
    return text.rstrip("\n") + "\n", unexplained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the result differs from the committed table")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    text, unexplained = table()
    print(f"gallery: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for line in unexplained:
        print(f"unexplained failure: {line}", file=sys.stderr)
    if args.check:
        same = TABLE.is_file() and TABLE.read_text(encoding="utf-8") == text
        print(f"{TABLE}: {'matches the run' if same else 'differs from the run'}")
        return 0 if same and not unexplained else 1
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text(text, encoding="utf-8")
    print(f"wrote {TABLE}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
