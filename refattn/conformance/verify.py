"""Run someone else's attention implementation against the conformance vectors.

An implementation is a plain callable ``impl(q, k, v, **kwargs)``. For each
case it receives the case's inputs: ``q``, ``k``, ``v`` positionally (``qk``,
``v`` for mechanisms with shared queries and keys, such as LSH: see
:data:`POSITIONAL`), and by keyword the other differentiable inputs (``bias``,
position tables), the array parameters
(``mask``, ``dropout_keep``) and the JSON parameters (``causal``, ``scale``,
``window`` as a tuple...). It returns

* the output array ``out``, or
* a pair ``(out, lse)``, or
* any object with an ``.out`` attribute and optionally ``.lse`` and ``.aux``
  (a refattn :class:`~refattn.core.results.Result`).

Floating-point arrays are cast to the precision under test (bfloat16 through
``ml_dtypes``); boolean and integer arrays are passed unchanged. With
``layout="bnhd"``, ``q``, ``k``, ``v`` are given as (B, N, H, D) and ``out``
(B, N, H, Dv) and ``lse`` (B, N, H) are read back in that layout; masks,
biases and intermediates keep the manifest's layout.

With ``grad=True`` gradients come from ``vjp(dout, q, k, v, dlse=dlse,
**kwargs)``, returning a mapping from input name to gradient; every
differentiable input of the case (``q``, ``k``, ``v``, ``bias``...) must have
one. ``dout`` and ``dlse`` are the case's stored cotangents, cast and laid
out like ``out`` and ``lse``.

Every output is compared with the stored expected value by the normwise
error of :func:`refattn.conformance.tolerance.error`; the case
passes when each error is at most the budget stored for that output and
precision. Integer intermediates (``aux``) must match exactly. Outputs an
implementation does not return (``lse``, intermediates) are reported as
"not provided" and do not fail the case; missing gradients do.

Cases listed in ``xfail`` are expected to fail: a failure or error there is
reported as ``xfail`` and a pass as ``xpass``. Neither fails the run
(non-strict, as pytest's ``xfail(strict=False)`` and array-api-tests' xfail
files): an ``xpass`` is a hint to remove the id from the list.
"""

from __future__ import annotations

import importlib
import json
import math
import textwrap
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from ..core import registry
from ..core.precision import PRECISIONS, STORAGE_DTYPES
from .suite import LoadedCase, Suite, load_suite, require_one_mechanism
from .tolerance import TINY, error as output_error

LAYOUTS = ("bhnd", "bnhd")
STATUSES = ("pass", "fail", "error", "xfail", "xpass")
# Arrays whose axes 1 and 2 (heads, sequence) are swapped in the "bnhd" layout.
SEQUENCE_MAJOR = ("q", "k", "v", "qk", "out", "lse")
#: Name of the check of ``out`` against what the implementation's own
#: intermediates imply (``Mechanism.implied_output``), run when they differ.
IMPLIED_OUT = "out|own_aux"
#: The inputs passed positionally, in this order, when a case has them; every
#: other input and parameter is passed by keyword.
POSITIONAL = ("q", "qk", "k", "v")


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Difference:
    """The first element (C order) that is off by more than the budget allows."""

    index: tuple[int, ...]
    got: float
    expected: float

    def describe(self) -> str:
        return f"first difference at index {self.index}: got {self.got!r}, expected {self.expected!r}"


@dataclass(frozen=True)
class OutputCheck:
    """One output, gradient or intermediate of one case, compared with its expected value.

    Attributes
    ----------
    name : str
        ``"out"``, ``"lse"``, ``"grad.q"``, ... or ``"aux.<name>"``.
    status : {"pass", "fail", "not provided"}
    error : float or None
        Normwise relative error (0 or inf for intermediates, which must match exactly).
    budget : float or None
        The largest error allowed (0 for integer intermediates).
    detail : str
        Why a check failed when the numbers alone do not say (shape, dtype).
    difference : Difference or None
        The first differing element of a failed check.
    """

    name: str
    status: str
    error: float | None = None
    budget: float | None = None
    detail: str = ""
    difference: Difference | None = None

    @property
    def ratio(self) -> float | None:
        """``error / budget``: at most 1 passes."""
        if self.error is None or self.budget is None:
            return None
        if self.budget == 0:
            return 0.0 if self.error == 0 else math.inf
        return self.error / self.budget

    def describe(self) -> str:
        """One line for a failed check: what differs and where."""
        parts = [f"{self.name}:"]
        if self.detail:
            parts.append(self.detail)
        if self.error is not None:
            parts.append(f"error {self.error:.3e} > budget {self.budget:.3e}")
        text = " ".join(parts)
        return f"{text}; {self.difference.describe()}" if self.difference else text


@dataclass(frozen=True)
class CaseReport:
    """The verdict on one case.

    Attributes
    ----------
    id, mechanism : str
    flags : tuple of str
        Bug classes the case is built to catch.
    status : {"pass", "fail", "error", "xfail", "xpass"}
    checks : list of OutputCheck
        In stage order: intermediates (in the case's order), then outputs, then gradients.
    message : str
        For an error: the exception the implementation raised.
    seconds : float
        Time spent in the implementation and the comparison.
    """

    id: str
    mechanism: str
    flags: tuple[str, ...]
    status: str
    checks: list[OutputCheck] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0

    @property
    def failed_checks(self) -> list[OutputCheck]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def first_stage(self) -> str | None:
        """The first stage (intermediate, output or gradient) that differs."""
        failed = self.failed_checks
        return failed[0].name if failed else None

    @property
    def worst_ratio(self) -> float | None:
        ratios = [c.ratio for c in self.checks if c.ratio is not None]
        return max(ratios) if ratios else None

    def format(self, flag_descriptions: Mapping[str, str] | None = None) -> str:
        """A readable account of this case: every check, what differs, and what its flags catch.

        ``flag_descriptions`` (the manifest's ``flags``) adds, for a case
        that did not pass, a line describing each of its flags.
        """
        head = f"{self.id} [{self.status}]"
        if self.flags:
            head += f"  flags: {', '.join(self.flags)}"
        lines = [head]
        if self.message:
            lines.append(f"  implementation raised {self.message}")
        if self.first_stage:
            lines.append(f"  first differing stage: {self.first_stage}")
        if self.checks:
            lines.append(f"  {'output':<12} {'error':>10} {'budget':>10} {'ratio':>10}  result")
            for c in self.checks:
                lines.append(f"  {c.name:<12} {_num(c.error):>10} {_num(c.budget):>10} {_num(c.ratio):>10}  {c.status}")
        lines.extend(f"  {c.describe()}" for c in self.failed_checks)
        lines.extend(f"  {c.name}: {c.detail}" for c in self.checks if c.name == IMPLIED_OUT and c.status == "pass")
        if flag_descriptions and self.status != "pass":
            for flag in (f for f in self.flags if f in flag_descriptions):
                lines.append(textwrap.fill(f"{flag}: {flag_descriptions[flag]}", 100, initial_indent="  ", subsequent_indent="    "))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "mechanism": self.mechanism,
            "flags": list(self.flags),
            "status": self.status,
            "message": self.message,
            "first_stage": self.first_stage,
            "worst_ratio": _json_float(self.worst_ratio),
            "seconds": round(self.seconds, 6),
            "checks": [_check_dict(c) for c in self.checks],
        }


@dataclass(frozen=True)
class Report:
    """The verdict on a whole run of :func:`verify`.

    ``ok`` is True when no case failed or errored (``xfail`` and ``xpass`` are
    fine). ``flag_descriptions`` are the manifest's descriptions of the flags,
    quoted under each failing case.
    """

    impl: str
    suite: str
    dtype: str
    layout: str
    grad: bool
    cases: list[CaseReport]
    unknown_xfail: tuple[str, ...] = ()
    flag_descriptions: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.status not in ("fail", "error") for c in self.cases)

    def counts(self) -> dict[str, int]:
        """Number of cases in each status (every status present, zeros included)."""
        return {s: sum(c.status == s for c in self.cases) for s in STATUSES}

    def summary(self) -> str:
        """``"12 passed, 2 failed, 1 xfailed"``."""
        words = {"pass": "passed", "fail": "failed", "error": "error", "xfail": "xfailed", "xpass": "xpassed"}
        counts = self.counts()
        parts = [f"{n} {words[s]}{'s' if s == 'error' and n > 1 else ''}" for s, n in counts.items() if n]
        return ", ".join(parts) or "no cases"

    def to_json(self, indent: int | None = 2) -> str:
        """The report as strict JSON (non-finite numbers as the strings "inf", "-inf", "nan")."""
        document = {
            "impl": self.impl,
            "suite": self.suite,
            "dtype": self.dtype,
            "layout": self.layout,
            "grad": self.grad,
            "ok": self.ok,
            "counts": self.counts(),
            "unknown_xfail": list(self.unknown_xfail),
            "cases": [c.to_dict() for c in self.cases],
        }
        return json.dumps(document, indent=indent, allow_nan=False)

    def to_junit(self) -> str:
        """The report as JUnit XML: one ``testcase`` per case.

        A failure is a ``failure`` element, an implementation's exception an
        ``error`` element, an expected failure ``skipped`` (as pytest writes
        xfail); the readable per-case report is the element's text.
        """
        counts = self.counts()
        suite = ET.Element(
            "testsuite",
            name=f"refattn conformance ({self.dtype}, {self.layout}{', grad' if self.grad else ''})",
            tests=str(len(self.cases)),
            failures=str(counts["fail"]),
            errors=str(counts["error"]),
            skipped=str(counts["xfail"]),
            time=f"{sum(c.seconds for c in self.cases):.3f}",
        )
        for case in self.cases:
            element = ET.SubElement(
                suite, "testcase", classname=f"refattn.{case.mechanism}", name=case.id, time=f"{case.seconds:.3f}"
            )
            tag = {"fail": "failure", "error": "error", "xfail": "skipped"}.get(case.status)
            if tag:
                first = case.message or (case.failed_checks[0].describe() if case.failed_checks else case.status)
                child = ET.SubElement(element, tag, message=f"{case.status}: {first}")
                child.text = case.format(self.flag_descriptions)
        root = ET.Element("testsuites")
        root.append(suite)
        ET.indent(root)
        return ET.tostring(root, encoding="unicode", xml_declaration=True)

    def format(self) -> str:
        """A readable table (case, status, worst ratio, flags) with failure details below it."""
        grad = "yes" if self.grad else "no"
        lines = [
            f"refattn verify: {self.impl}  dtype={self.dtype}  layout={self.layout}  grad={grad}",
            f"suite: {self.suite} ({len(self.cases)} case{'' if len(self.cases) == 1 else 's'})",
            "",
        ]
        width = max([len("case")] + [len(c.id) for c in self.cases])
        lines.append(f"{'case':<{width}}  {'status':<6}  {'worst ratio':>11}  flags")
        for c in self.cases:
            status = c.status.upper() if c.status in ("fail", "error") else c.status
            lines.append(f"{c.id:<{width}}  {status:<6}  {_num(c.worst_ratio):>11}  {' '.join(c.flags)}")
        details = [c for c in self.cases if c.status in ("fail", "error", "xfail")]
        if details:
            lines += ["", "Details", "-------"]
            for c in details:
                lines += [c.format(self.flag_descriptions), ""]
        if self.unknown_xfail:
            lines.append(f"note: xfail ids not in the suite: {', '.join(self.unknown_xfail)}")
        lines.append(f"{self.summary()}  ({'OK' if self.ok else 'FAILED'})")
        return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if math.isfinite(x) else str(x)


def _json_float(x):
    """A number JSON can hold: ints stay ints, non-finite floats become "inf", "-inf" or "nan"."""
    if x is None:
        return None
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else str(x)


def _check_dict(c: OutputCheck) -> dict:
    difference = None
    if c.difference is not None:
        d = c.difference
        difference = {"index": list(d.index), "got": _json_float(d.got), "expected": _json_float(d.expected)}
    return {
        "name": c.name,
        "status": c.status,
        "error": _json_float(c.error),
        "budget": _json_float(c.budget),
        "ratio": _json_float(c.ratio),
        "detail": c.detail,
        "first_difference": difference,
    }


# --------------------------------------------------------------------------
# Running an implementation on one case


@dataclass(frozen=True)
class _Returned:
    """What an implementation returned, as float64 arrays in the manifest's layout."""

    out: np.ndarray
    lse: np.ndarray | None
    aux: Mapping[str, np.ndarray]


def check_case(
    impl: Callable, case: LoadedCase, *, dtype: str = "float64", layout: str = "bhnd", grad: bool = False, vjp=None
) -> CaseReport:
    """Run ``impl`` (and ``vjp`` when ``grad``) on one case and compare every output.

    Parameters are those of :func:`verify`; ``xfail`` is applied by the caller.
    """
    _check_choice(dtype, "dtype", PRECISIONS)
    _check_choice(layout, "layout", LAYOUTS)
    start = time.perf_counter()
    positional, keywords = _call_arguments(case, dtype, layout)
    checks: list[OutputCheck] = []
    try:
        returned = _read_returned(impl(*positional, **keywords), layout)
        checks += _check_forward(case, returned, dtype)
        if grad and any(name.startswith("grad.") for name in case.expected):
            cotangents = _cotangents(case, dtype, layout)
            positional, keywords = _call_arguments(case, dtype, layout)  # fresh copies: impl may have written to its own
            grads = vjp(cotangents["dout"], *positional, dlse=cotangents.get("dlse"), **keywords)
            checks += _check_grads(case, grads, dtype, layout)
    except Exception as exc:  # an implementation may raise anything: it is reported, not raised
        return CaseReport(case.id, case.mechanism, tuple(case.flags), "error", checks, _exception(exc), time.perf_counter() - start)
    if any(c.name.startswith("aux.") and c.status == "fail" for c in checks):  # refattn's own check, outside the try
        checks += _check_implied(case, returned, dtype)
    status = "fail" if any(c.status == "fail" for c in checks) else "pass"
    return CaseReport(case.id, case.mechanism, tuple(case.flags), status, checks, "", time.perf_counter() - start)


def _exception(exc: BaseException) -> str:
    """``"ValueError: message (at file.py:12 in fn)"``: the exception and where it was raised."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno} in {frame.name})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _check_choice(value, name: str, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, not {value!r}")


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """A fresh, writable copy: floating-point arrays in the precision under test, others unchanged."""
    return x.astype(STORAGE_DTYPES[dtype]) if x.dtype.kind == "f" else x.copy()


def _swap_layout(name: str, x: np.ndarray, layout: str) -> np.ndarray:
    """(B, H, N, ...) <-> (B, N, H, ...) for the sequence-major arrays in the "bnhd" layout (its own inverse)."""
    if layout == "bnhd" and name in SEQUENCE_MAJOR:
        return np.ascontiguousarray(np.swapaxes(x, 1, 2))
    return x


def _json_param(value):
    """JSON lists become tuples (``window=[2, None]`` -> ``(2, None)``)."""
    return tuple(value) if isinstance(value, list) else value


def _call_arguments(case: LoadedCase, dtype: str, layout: str) -> tuple[tuple, dict]:
    """``(q, k, v)`` (or ``(qk, v)``) and the keyword arguments of one call, cast and laid out."""
    arrays = {**case.inputs, **case.array_params}
    arrays = {name: _swap_layout(name, _cast(x, dtype), layout) for name, x in arrays.items()}
    positional = tuple(arrays.pop(name) for name in POSITIONAL if name in case.inputs)
    keywords = {**{name: _json_param(value) for name, value in case.params.items()}, **arrays}
    return positional, keywords


def _cotangents(case: LoadedCase, dtype: str, layout: str) -> dict:
    """``dout`` and ``dlse`` cast and laid out like ``out`` and ``lse``."""
    named = {"dout": "out", "dlse": "lse"}
    return {name: _swap_layout(named.get(name, name), _cast(x, dtype), layout) for name, x in case.cotangents.items()}


def _as_float64(x, name: str) -> np.ndarray:
    try:
        return np.asarray(x).astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the implementation's `{name}` is not a real array: {type(x).__name__}") from exc


def _read_returned(value, layout: str) -> _Returned:
    """Accept ``out``, ``(out, lse)`` or an object with ``.out`` / ``.lse`` / ``.aux``."""
    if hasattr(value, "out"):
        out, lse, aux = value.out, getattr(value, "lse", None), getattr(value, "aux", None) or {}
    elif isinstance(value, tuple):
        if len(value) != 2:
            raise TypeError(f"the implementation returned a tuple of {len(value)} items; expected (out, lse)")
        (out, lse), aux = value, {}
    else:
        out, lse, aux = value, None, {}
    out = _swap_layout("out", _as_float64(out, "out"), layout)
    lse = None if lse is None else _swap_layout("lse", _as_float64(lse, "lse"), layout)
    return _Returned(out, lse, {name: np.asarray(x) for name, x in aux.items()})


def _check_forward(case: LoadedCase, returned: _Returned, dtype: str) -> list[OutputCheck]:
    """Intermediates (exactly, in the case's order), then ``out``, ``lse`` and any other output (within budget)."""
    checks = [_check_exact(f"aux.{name}", returned.aux.get(name), want) for name, want in case.aux.items()]
    for name in _in_order([n for n in case.expected if not n.startswith("grad.")], first=("out", "lse")):
        got = {"out": returned.out, "lse": returned.lse}.get(name, returned.aux.get(name))
        checks.append(_check_float(name, got, case.expected[name], case.tolerances[name][dtype]))
    return checks


def _check_grads(case: LoadedCase, grads: Mapping, dtype: str, layout: str) -> list[OutputCheck]:
    """Every stored gradient (q, k, v, then the other inputs); a differentiable input without one fails."""
    stored = [n[len("grad.") :] for n in case.expected if n.startswith("grad.")]
    checks = []
    for input_name in _in_order(stored, first=POSITIONAL):
        name = f"grad.{input_name}"
        got = grads.get(input_name) if grads is not None else None
        if got is None:
            checks.append(OutputCheck(name, "fail", detail=f"no gradient returned for `{input_name}`"))
            continue
        got = _swap_layout(input_name, _as_float64(got, name), layout)
        checks.append(_check_float(name, got, case.expected[name], case.tolerances[name][dtype]))
    return checks


def _in_order(names, first: tuple[str, ...]) -> list[str]:
    """``names`` with those in ``first`` leading, in that order, and the rest sorted."""
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def _check_implied(case: LoadedCase, returned: _Returned, dtype: str) -> list[OutputCheck]:
    """``out`` against what the implementation's own intermediates imply (see ``Mechanism.implied_output``).

    Run only when an intermediate differs from the case's, so it never fails a
    case that would pass; its verdict says whether the output is right given
    the implementation's own decisions (then only the decisions are wrong).
    """
    if case.mechanism not in registry.names() or registry.get(case.mechanism).implied_output is None:
        return []
    arguments = {**case.inputs, **case.array_params, **{n: _json_param(x) for n, x in case.params.items()}}
    implied = registry.get(case.mechanism).implied_output(arguments, returned.aux)
    if implied is None:
        return []
    check = _check_float(IMPLIED_OUT, returned.out, np.asarray(implied.out, np.float64), case.tolerances["out"][dtype])
    verdict = "consistent with" if check.status == "pass" else "differs from"
    detail = f"out {verdict} the output its own {', '.join(sorted(returned.aux))} imply"
    return [OutputCheck(check.name, check.status, check.error, check.budget, detail, check.difference)]


def _check_float(name: str, got: np.ndarray | None, want: np.ndarray, budget: float) -> OutputCheck:
    if got is None:
        return OutputCheck(name, "not provided", budget=budget)
    if got.shape != want.shape:
        return OutputCheck(name, "fail", budget=budget, detail=f"shape {got.shape}, expected {want.shape}")
    error = output_error(name, got, want)
    if error <= budget:
        return OutputCheck(name, "pass", error, budget)
    return OutputCheck(name, "fail", error, budget, difference=first_difference(got, want, budget))


def _check_exact(name: str, got: np.ndarray | None, want: np.ndarray) -> OutputCheck:
    if got is None:
        return OutputCheck(name, "not provided", budget=0.0)
    if got.shape != want.shape:
        return OutputCheck(name, "fail", budget=0.0, detail=f"shape {got.shape}, expected {want.shape}")
    differs = got != want
    if not np.any(differs):
        return OutputCheck(name, "pass", 0.0, 0.0)
    index = tuple(int(i) for i in np.argwhere(differs)[0])
    return OutputCheck(
        name,
        "fail",
        math.inf,
        0.0,
        detail=f"{int(differs.sum())} of {differs.size} entries differ (must match exactly)",
        difference=Difference(index, got[index].item(), want[index].item()),
    )


def first_difference(got: np.ndarray, want: np.ndarray, budget: float) -> Difference | None:
    """The first index in C order where ``|got - want| > budget * max|want|``.

    Infinities must match exactly and NaN never matches. Returns None when no
    element differs by that much.
    """
    finite = np.isfinite(want)
    scale = max(float(np.max(np.abs(want[finite]), initial=0.0)), TINY)
    with np.errstate(invalid="ignore"):
        close = (got == want) | (np.abs(got - want) <= budget * scale)
    bad = np.argwhere(~close)
    if len(bad) == 0:
        return None
    index = tuple(int(i) for i in bad[0])
    return Difference(index, float(got[index]), float(want[index]))


# --------------------------------------------------------------------------
# The whole suite


def verify(
    impl: Callable,
    *,
    suite: str | Path | Suite | None = None,
    mechanism: str | Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
    dtype: str = "float64",
    layout: str = "bhnd",
    grad: bool = False,
    vjp: Callable | None = None,
    xfail: Iterable[str] = (),
    name: str | None = None,
) -> Report:
    """Check an implementation against every selected conformance case.

    Parameters
    ----------
    impl : callable
        ``impl(q, k, v, **kwargs)`` returning ``out``, ``(out, lse)`` or an
        object with ``.out`` (and optionally ``.lse``, ``.aux``).
    suite : path, Suite or None
        A suite folder (with ``manifest.json``) or a loaded :class:`Suite`;
        None finds the default one (:func:`default_suite_folder`).
    mechanism : str or iterable of str, optional
        Only cases of these mechanisms.
    ids : iterable of str, optional
        Only these case ids (``fnmatch`` patterns such as ``"dense/causal*"`` allowed).
    dtype : {"float64", "float32", "float16", "bfloat16"}
        Precision the inputs are cast to; selects the tolerance budgets.
    layout : {"bhnd", "bnhd"}
        How ``q``, ``k``, ``v``, ``out`` and ``lse`` are laid out for ``impl``.
    grad : bool
        Also check gradients, from ``vjp``.
    vjp : callable, optional
        ``vjp(dout, q, k, v, dlse=..., **kwargs) -> {name: grad}``; defaults
        to ``impl.vjp`` (the adapters of :mod:`refattn.conformance.adapters`
        provide one).
    xfail : iterable of str
        Ids of cases the implementation is known to fail (:func:`read_xfail`
        reads them from a file).
    name : str, optional
        How the report names the implementation (default: its qualified name).

    Returns
    -------
    Report

    Raises
    ------
    ValueError
        For a bad ``dtype`` or ``layout``, ``grad=True`` without a vjp, or a
        selection that matches no case or, with ``mechanism`` None, cases of
        several mechanisms (:class:`SuiteError`).
    """
    _check_choice(dtype, "dtype", PRECISIONS)
    _check_choice(layout, "layout", LAYOUTS)
    vjp = vjp if vjp is not None else getattr(impl, "vjp", None)
    if grad and vjp is None:
        raise ValueError("grad=True needs a vjp: pass vjp=... or an implementation with a .vjp attribute")
    loaded = suite if isinstance(suite, Suite) else load_suite(default_suite_folder() if suite is None else suite)
    cases = loaded.select(mechanisms=mechanism, ids=ids).cases
    require_one_mechanism(cases, mechanism)
    xfail = frozenset(xfail)
    reports = [_apply_xfail(check_case(impl, case, dtype=dtype, layout=layout, grad=grad, vjp=vjp), xfail) for case in cases]
    known = {case.id for case in loaded.cases}
    return Report(
        impl=name or _qualified_name(impl),
        suite=str(loaded.folder),
        dtype=dtype,
        layout=layout,
        grad=grad,
        cases=reports,
        unknown_xfail=tuple(sorted(xfail - known)),
        flag_descriptions=loaded.manifest["flags"],
    )


def _apply_xfail(report: CaseReport, xfail: frozenset) -> CaseReport:
    if report.id not in xfail:
        return report
    status = "xpass" if report.status == "pass" else "xfail"
    return CaseReport(report.id, report.mechanism, report.flags, status, report.checks, report.message, report.seconds)


def _qualified_name(impl) -> str:
    module = getattr(impl, "__module__", None)
    qualname = getattr(impl, "__qualname__", None) or type(impl).__qualname__
    return f"{module}:{qualname}" if module else qualname


def read_xfail(path: str | Path) -> frozenset[str]:
    """Case ids from an xfail file: one id per line; ``#`` starts a comment; blank lines ignored."""
    ids = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            ids.add(entry)
    return frozenset(ids)


def load_callable(spec: str) -> Callable:
    """Import ``"package.module:function"`` (or ``"module:Class.method"``) and return it."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target


def default_suite_folder() -> Path:
    """The suite to verify against when none is named.

    ``./conformance`` when it has a ``manifest.json``; otherwise the
    ``conformance/`` folder of a source checkout (beside the ``refattn``
    package). Raises ``FileNotFoundError`` when neither exists.
    """
    candidates = [Path.cwd() / "conformance", Path(__file__).resolve().parents[2] / "conformance"]
    for folder in candidates:
        if (folder / "manifest.json").is_file():
            return folder
    raise FileNotFoundError(
        "no conformance suite found in ./conformance or beside the refattn package; pass the suite folder (--suite DIR)"
    )
