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
error of :func:`refattn.conformance.tolerance.error`; an output passes when
its error is at most the budget stored for it and the precision. Integer
intermediates (``aux``) must match exactly; floating-point ones (routing's
``slot_lse``) are compared within their budget. Gradients are checked by
linearity: with an lse, against the sum of the stored parts for ``dout`` and
for ``dlse`` (check ``grad.<input>``); without one, against the ``dout``
part alone (check ``grad_dout.<input>``, and ``dlse=None`` is passed).

A case's status says what happened: ``pass``; ``partial`` (passed, but
outputs the case checks, such as ``lse`` or ``aux.buckets``, were not
returned: :attr:`CaseReport.missing` names them; a failure with
``require_aux``); ``unsupported`` (the implementation raised
``NotImplementedError``: it cannot express the case; a failure with
``strict``); ``fail``; ``error`` (any other exception); ``timeout``.
Cases listed in ``xfail`` (known bugs, each with a reason) that fail or
error are ``xfail``, and those that pass ``xpass``; neither fails the run
(as pytest's ``xfail(strict=False)``). Before any case runs, the
implementation's signature is checked against every selected case's
arguments, and the xfail ids against the suite.

The implementation under test is contained: any exception it raises,
``SystemExit`` included, is that case's error (only ``KeyboardInterrupt``
stops the run); results that are not real floating-point arrays fail with
the reason; it gets fresh copies of the arrays (parameters as tuples, which
it cannot edit for later cases), and writing into them is reported as a
failed ``input.<name>`` check. With ``timeout=`` each case runs in a worker
process and one that does not finish in time is a ``timeout``.

A bundled backend is verified through the registry with ``backend=NAME``
(``refattn verify --mechanism dense --backend numba``): the implementation
is then the mechanism's public function and VJP with that backend.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import math
import multiprocessing
import numbers
import os
import sys
import textwrap
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from ..core import registry
from ..core.errors import SpecError
from ..core.precision import PRECISIONS, STORAGE_DTYPES
from .suite import LoadedCase, Suite, SuiteError, json_argument, load_suite, mechanisms_named, require_one_mechanism
from .case import EXACT_TIES
from .text import printable
from .manifest import gradient_name, is_gradient
from .progress import progress_bar
from .tolerance import TINY, error as output_error, gradient_scales
from .trust import Origin

LAYOUTS = ("bhnd", "bnhd")
STATUSES = ("pass", "partial", "unsupported", "xfail", "xpass", "fail", "error", "timeout")
#: Statuses that fail a run (``unsupported`` too with ``strict``, ``partial`` with ``require_aux``).
FAILING = ("fail", "error", "timeout")
#: Result dtypes accepted as floating point besides NumPy's own (``kind == "f"``).
EXTRA_FLOAT_DTYPES = tuple(np.dtype(STORAGE_DTYPES[p]) for p in PRECISIONS if np.dtype(STORAGE_DTYPES[p]).kind != "f")
# Arrays whose axes 1 and 2 (heads, sequence) are swapped in the "bnhd" layout.
SEQUENCE_MAJOR = ("q", "k", "v", "qk", "out", "lse")
#: Name of the check of ``out`` against what the implementation's own
#: intermediates imply (``Mechanism.implied_output``), run when they differ.
IMPLIED_OUT = "out|own_aux"
#: The suite installed with the package (setup.py copies the repository's conformance/ there).
PACKAGED_SUITE = Path(__file__).resolve().parent / "vectors"
#: The repository's published copy, for a source checkout or an editable install.
SOURCE_SUITE = Path(__file__).resolve().parents[2] / "conformance"
#: Environment variable naming another default suite folder.
SUITE_VARIABLE = "REFATTN_SUITE"
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
    status : {"pass", "partial", "unsupported", "xfail", "xpass", "fail", "error", "timeout"}
        ``partial``: passed, but outputs the case checks were not returned
        (:attr:`missing` names them); ``unsupported``: the implementation
        raised ``NotImplementedError`` (``message`` is its text); ``xfail``: a
        listed known bug failed (``message`` is the reason listed).
    checks : list of OutputCheck
        In stage order: intermediates (in the case's order), then outputs, then
        gradients; ``input.<name>`` checks fail when the implementation wrote into that input.
    message : str
        For an error: the exception the implementation raised (control characters
        escaped); for a timeout: how long it ran.
    seconds : float
        Time spent in the implementation and the comparison.
    gradient_cotangents : tuple of str
        The cotangents the gradients were checked for: ``("dout", "dlse")``
        (checks ``grad.<input>``, against the sum of the stored parts),
        ``("dout",)`` when the implementation returned no lse (checks
        ``grad_dout.<input>``), ``()`` when gradients were not checked.
    """

    id: str
    mechanism: str
    flags: tuple[str, ...]
    status: str
    checks: list[OutputCheck] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    gradient_cotangents: tuple[str, ...] = ()

    @property
    def failed_checks(self) -> list[OutputCheck]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def missing(self) -> tuple[str, ...]:
        """Outputs the case checks that the implementation did not return (``lse``, ``aux.<name>``)."""
        return tuple(c.name for c in self.checks if c.status == "not provided")

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
            lines.append(f"  {_MESSAGE_LEAD.get(self.status, 'implementation raised ')}{self.message}")
        if self.missing:
            lines.append(f"  not returned, so not compared: {', '.join(self.missing)}")
        if self.gradient_cotangents == ("dout",):
            lines.append("  gradients checked for dout alone (the implementation returned no lse)")
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
            "missing": list(self.missing),
            "gradient_cotangents": list(self.gradient_cotangents),
            "worst_ratio": _json_float(self.worst_ratio),
            "seconds": round(self.seconds, 6),
            "checks": [_check_dict(c) for c in self.checks],
        }


#: How a case's message is introduced, by status (an error's is what the implementation raised).
_MESSAGE_LEAD = {"timeout": "", "unsupported": "unsupported: ", "xfail": "known bug: ", "xpass": "listed as a known bug: "}


@dataclass(frozen=True)
class Report:
    """The verdict on a whole run of :func:`verify`.

    ``ok`` is True when the run has cases and none failed, errored or timed
    out (``xfail``, ``xpass``, ``partial`` and ``unsupported`` are fine, unless
    ``require_aux`` makes ``partial`` and ``strict`` makes ``unsupported`` fail). ``origin`` says whether the suite
    is the official one (:mod:`refattn.conformance.trust`); every format
    states it first. ``flag_descriptions`` are the manifest's descriptions
    of the flags, quoted under each failing case.
    """

    impl: str
    suite: str
    dtype: str
    layout: str
    grad: bool
    cases: list[CaseReport]
    origin: Origin
    flag_descriptions: Mapping[str, str] = field(default_factory=dict)
    strict: bool = False
    require_aux: bool = False

    @property
    def failing(self) -> tuple[str, ...]:
        """The statuses that fail this run."""
        return self.failing_statuses(self.strict, self.require_aux)

    @staticmethod
    def failing_statuses(strict: bool, require_aux: bool) -> tuple[str, ...]:
        """:data:`FAILING`, with ``unsupported`` when ``strict`` and ``partial`` when ``require_aux``."""
        return FAILING + ("unsupported",) * strict + ("partial",) * require_aux

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.status not in self.failing for c in self.cases)

    def counts(self) -> dict[str, int]:
        """Number of cases in each status (every status present, zeros included)."""
        return {s: sum(c.status == s for c in self.cases) for s in STATUSES}

    def summary(self) -> str:
        """``"12 passed, 2 failed, 1 xfailed"``."""
        words = {"pass": "passed", "partial": "partial", "unsupported": "unsupported", "xfail": "xfailed",
                 "xpass": "xpassed", "fail": "failed", "error": "error", "timeout": "timed out"}  # fmt: skip
        counts = self.counts()
        parts = [f"{n} {words[s]}{'s' if s == 'error' and n > 1 else ''}" for s, n in counts.items() if n]
        return ", ".join(parts) or "no cases"

    def to_json(self, indent: int | None = 2) -> str:
        """The report as strict JSON (non-finite numbers as the strings "inf", "-inf", "nan")."""
        document = {
            "suite_origin": self.origin.to_dict(),
            "impl": self.impl,
            "suite": self.suite,
            "dtype": self.dtype,
            "layout": self.layout,
            "grad": self.grad,
            "ok": self.ok,
            "counts": self.counts(),
            "strict": self.strict,
            "require_aux": self.require_aux,
            "cases": [c.to_dict() for c in self.cases],
        }
        return json.dumps(document, indent=indent, allow_nan=False)

    def to_junit(self) -> str:
        """The report as JUnit XML: one ``testcase`` per case.

        A failure is a ``failure`` element, an implementation's exception an
        ``error`` element, an expected failure or an unsupported case
        ``skipped`` (as pytest writes xfail and skip), unless this run fails
        on it; the readable per-case report is the element's text.
        """
        counts = self.counts()
        suite = ET.Element(
            "testsuite",
            name=f"refattn conformance ({self.dtype}, {self.layout}{', grad' if self.grad else ''})",
            tests=str(len(self.cases)),
            failures=str(counts["fail"]),
            errors=str(counts["error"] + counts["timeout"]),
            skipped=str(sum(c.status in ("xfail", "unsupported") and c.status not in self.failing for c in self.cases)),
            time=f"{sum(c.seconds for c in self.cases):.3f}",
        )
        properties = ET.SubElement(suite, "properties")
        ET.SubElement(properties, "property", name="suite_origin", value=self.origin.describe())
        ET.SubElement(properties, "property", name="manifest_sha256", value=self.origin.manifest_sha256)
        for case in self.cases:
            element = ET.SubElement(
                suite, "testcase", classname=f"refattn.{case.mechanism}", name=case.id, time=f"{case.seconds:.3f}"
            )
            tag = {"error": "error", "timeout": "error", "xfail": "skipped", "unsupported": "skipped"}.get(case.status)
            tag = "failure" if case.status in self.failing and tag != "error" else tag
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
            self.origin.describe(),
            f"refattn verify: {self.impl}  dtype={self.dtype}  layout={self.layout}  grad={grad}",
            f"suite: {self.suite} ({len(self.cases)} case{'' if len(self.cases) == 1 else 's'})",
            "",
        ]
        width = max([len("case")] + [len(c.id) for c in self.cases])
        lines.append(f"{'case':<{width}}  {'status':<11}  {'worst ratio':>11}  flags")
        for c in self.cases:
            status = c.status.upper() if c.status in self.failing else c.status
            lines.append(f"{c.id:<{width}}  {status:<11}  {_num(c.worst_ratio):>11}  {' '.join(c.flags)}")
        details = [c for c in self.cases if c.status in (*self.failing, "xfail")]
        if details:
            lines += ["", "Details", "-------"]
            for c in details:
                lines += [c.format(self.flag_descriptions), ""]
        lines += _listing("Unsupported (the implementation raised NotImplementedError)", self.cases, "unsupported",
                          lambda c: c.message)  # fmt: skip
        lines += _listing("Partial (passed, but some outputs were not returned)", self.cases, "partial",
                          lambda c: "not returned: " + ", ".join(c.missing))  # fmt: skip
        lines.append(f"{self.summary()}  ({'OK' if self.ok else 'FAILED'})")
        return "\n".join(lines)


def _listing(title: str, cases: list[CaseReport], status: str, say: Callable[[CaseReport], str]) -> list[str]:
    """A titled list of the cases in ``status``, one line each with what ``say`` says; [] when none."""
    chosen = [c for c in cases if c.status == status]
    if not chosen:
        return []
    return ["", title, "-" * len(title)] + [f"{c.id}: {say(c)}" for c in chosen] + [""]


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
    """What an implementation returned, as arrays (in whatever dtype it chose) in the manifest's layout."""

    out: np.ndarray
    lse: np.ndarray | None
    aux: Mapping[str, np.ndarray]


def check_case(
    impl: Callable, case: LoadedCase, *, dtype: str = "float64", layout: str = "bhnd", grad: bool = False, vjp=None
) -> CaseReport:
    """Run ``impl`` (and ``vjp`` when ``grad``) on one case and compare every output.

    Parameters are those of :func:`verify`; ``xfail`` and ``timeout`` are
    applied by the caller. Whatever the implementation raises (``SystemExit``
    included, ``KeyboardInterrupt`` excepted) is the case's error.
    """
    _check_choice(dtype, "dtype", PRECISIONS)
    _check_choice(layout, "layout", LAYOUTS)
    start = time.perf_counter()
    checks: list[OutputCheck] = []
    cotangents_used: tuple[str, ...] = ()
    try:
        positional, keywords = _call_arguments(case, dtype, layout)
        returned = _read_returned(impl(*positional, **keywords), layout)
        checks += _check_unmodified(case, positional, keywords, dtype, layout)
        checks += _check_forward(case, returned, dtype)
        if grad and any(is_gradient(name) for name in case.expected):
            cotangents = _cotangents(case, dtype, layout)
            # By linearity: with an lse, the gradient for both cotangents; without one, for dout alone.
            dlse = cotangents.get("dlse") if returned.lse is not None else None
            cotangents_used = ("dout",) if dlse is None else ("dout", "dlse")
            positional, keywords = _call_arguments(case, dtype, layout)
            grads = vjp(cotangents["dout"], *positional, dlse=dlse, **keywords)
            checks += _check_unmodified(case, positional, keywords, dtype, layout)
            checks += _check_grads(case, grads, dtype, layout, cotangents_used)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 -- an implementation may raise anything, sys.exit() too: reported, not raised
        status = "unsupported" if isinstance(exc, NotImplementedError) else "error"
        message = printable(str(exc) or "NotImplementedError", limit=2000) if status == "unsupported" else _exception(exc)
        return CaseReport(case.id, case.mechanism, tuple(case.flags), status, checks, message,
                          time.perf_counter() - start, cotangents_used)  # fmt: skip
    if any(c.name.startswith("aux.") and c.status == "fail" for c in checks):  # refattn's own check, outside the try
        checks += _check_implied(case, returned, dtype)
    status = "fail" if any(c.status == "fail" for c in checks) else "pass"
    if status == "pass" and any(c.status == "not provided" for c in checks):
        status = "partial"
    return CaseReport(case.id, case.mechanism, tuple(case.flags), status, checks, "", time.perf_counter() - start,
                      cotangents_used)  # fmt: skip


def _exception(exc: BaseException) -> str:
    """``"ValueError: message (at file.py:12 in fn)"``: the exception and where it was raised, printable."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(frame.filename).name}:{frame.lineno} in {frame.name})" if frame else ""
    return printable(f"{type(exc).__name__}: {exc}", limit=2000) + printable(where)


def _check_choice(value, name: str, options) -> None:
    if not isinstance(value, str) or value not in options:
        raise SpecError(name, f"one of {list(options)}", repr(value)[:80])


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """A fresh, writable copy: floating-point arrays in the precision under test, others unchanged."""
    return x.astype(STORAGE_DTYPES[dtype]) if x.dtype.kind == "f" else x.copy()


def _swap_layout(name: str, x: np.ndarray, layout: str) -> np.ndarray:
    """(B, H, N, ...) <-> (B, N, H, ...) for the sequence-major arrays in the "bnhd" layout (its own inverse)."""
    if layout == "bnhd" and name in SEQUENCE_MAJOR:
        return np.ascontiguousarray(np.swapaxes(x, 1, 2))
    return x


def _call_arguments(case: LoadedCase, dtype: str, layout: str) -> tuple[tuple, dict]:
    """``(q, k, v)`` (or ``(qk, v)``) and the keyword arguments of one call: fresh copies, cast and laid out."""
    arrays = {**case.inputs, **case.array_params}
    arrays = {name: _swap_layout(name, _cast(x, dtype), layout) for name, x in arrays.items()}
    positional = tuple(arrays.pop(name) for name in positional_names(case))
    # The manifest spells out every parameter for its readers, and the call passes each, except those that
    # are None where the public function's default is None too ("not given": no bias, no keep-mask), so an
    # implementation need not accept options it never receives. A None that means something (LSH's
    # ``scale=None``, 1/sqrt(D), against a preset's default) is passed.
    not_given = _none_defaults(case.mechanism)
    keywords = {name: json_argument(value) for name, value in case.params.items()
                if not (value is None and name in not_given)}  # fmt: skip
    return positional, {**keywords, **arrays}


def _none_defaults(mechanism: str) -> set[str]:
    """The parameters of the mechanism's public function whose default is None (all, for one refattn lacks)."""
    if mechanism not in registry.names():
        return _ALL_NAMES
    parameters = inspect.signature(registry.get(mechanism).forward).parameters.values()
    return {p.name for p in parameters if p.default is None}


class _AllNames(set):
    """Contains every name."""

    def __contains__(self, name) -> bool:
        return True


_ALL_NAMES = _AllNames()


def positional_names(case: LoadedCase) -> tuple[str, ...]:
    """The inputs passed positionally, in order: the mechanism's ``positional`` (``q, k, v``; ``qk, v``;
    ``u, w, v``...), or :data:`POSITIONAL` for a mechanism this refattn does not know."""
    names = registry.get(case.mechanism).positional if case.mechanism in registry.names() else POSITIONAL
    return tuple(name for name in names if name in case.inputs)


def _check_unmodified(case: LoadedCase, positional: tuple, keywords: dict, dtype: str, layout: str) -> list[OutputCheck]:
    """A failed ``input.<name>`` check for every array the implementation wrote into."""
    handed = {**dict(zip(positional_names(case), positional)), **keywords}
    fresh_positional, fresh_keywords = _call_arguments(case, dtype, layout)
    fresh = {**dict(zip(positional_names(case), fresh_positional)), **fresh_keywords}
    written = [name for name, x in fresh.items() if isinstance(x, np.ndarray) and not _same_array(handed[name], x)]
    detail = "the implementation wrote into this input (it must not modify its arguments)"
    return [OutputCheck(f"input.{name}", "fail", detail=detail) for name in written]


def _same_array(got, want: np.ndarray) -> bool:
    return isinstance(got, np.ndarray) and got.shape == want.shape and bool(np.all((got == want) | (got != got)))


def _cotangents(case: LoadedCase, dtype: str, layout: str) -> dict:
    """``dout`` and ``dlse`` cast and laid out like ``out`` and ``lse``."""
    named = {"dout": "out", "dlse": "lse"}
    return {name: _swap_layout(named.get(name, name), _cast(x, dtype), layout) for name, x in case.cotangents.items()}


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
    out = _swap_layout("out", np.asarray(out), layout)
    lse = None if lse is None else _swap_layout("lse", np.asarray(lse), layout)
    return _Returned(out, lse, {name: np.asarray(x) for name, x in aux.items()})


def _check_forward(case: LoadedCase, returned: _Returned, dtype: str) -> list[OutputCheck]:
    """Integer intermediates (exactly, in the case's order), then ``out``, ``lse`` and the floating-point
    intermediates (``aux.slot_lse``), each within its budget."""
    exact = {name: want for name, want in case.aux.items() if want.dtype.kind in "biu"}
    checks = [_check_exact(f"aux.{name}", returned.aux.get(name), want) for name, want in exact.items()]
    if EXACT_TIES in case.flags:
        checks = [_as_tie_order(c) for c in checks]
    floats = {name: want for name, want in case.expected.items() if not name.startswith("grad")}
    floats.update({f"aux.{name}": want for name, want in case.aux.items() if name not in exact})
    for name in _in_order(list(floats), first=("out", "lse")):
        got = {"out": returned.out, "lse": returned.lse}.get(name, returned.aux.get(name.removeprefix("aux.")))
        checks.append(_check_float(name, got, floats[name], case.tolerances[name][dtype]))
    return checks


def _check_grads(case: LoadedCase, grads: Mapping, dtype: str, layout: str, cotangents: tuple[str, ...]) -> list[OutputCheck]:
    """Every stored gradient (q, k, v, then the other inputs); a differentiable input without one fails.

    For ``("dout", "dlse")`` each gradient is compared with the sum of its two
    stored parts (check ``grad.<input>``), within the sum of their budgets;
    for ``("dout",)`` with the ``dout`` part (check ``grad_dout.<input>``).
    Both errors are relative to the larger norm of the two parts
    (:func:`refattn.conformance.tolerance.gradient_scales`).
    """
    parts = {cotangent: gradient_name(cotangent, "") for cotangent in cotangents}
    stored = {name.split(".", 1)[1] for name in case.expected if name.startswith(parts["dout"])}
    scales = gradient_scales({name: value for name, value in case.expected.items() if is_gradient(name)})
    checks = []
    for input_name in _in_order(stored, first=positional_names(case)):
        named = [gradient_name(cotangent, input_name) for cotangent in cotangents]
        want = sum(case.expected[name] for name in named)
        budget = sum(case.tolerances[name][dtype] for name in named)
        name = f"grad.{input_name}" if len(named) > 1 else named[0]
        got = grads.get(input_name) if grads is not None else None
        if got is None:
            checks.append(OutputCheck(name, "fail", detail=f"no gradient returned for `{input_name}`"))
            continue
        got = _swap_layout(input_name, np.asarray(got), layout)
        checks.append(_check_float(name, got, want, budget, scales[named[0]]))
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
    arguments = {**case.inputs, **case.array_params, **{n: json_argument(x) for n, x in case.params.items()}}
    implied = registry.get(case.mechanism).implied_output(arguments, returned.aux)
    if implied is None:
        return []
    check = _check_float(IMPLIED_OUT, returned.out, np.asarray(implied.out, np.float64), case.tolerances["out"][dtype])
    verdict = "consistent with" if check.status == "pass" else "differs from"
    detail = f"out {verdict} the output its own {', '.join(sorted(returned.aux))} imply"
    return [OutputCheck(check.name, check.status, check.error, check.budget, detail, check.difference)]


def _check_float(name: str, got: np.ndarray | None, want: np.ndarray, budget: float, scale: float = TINY) -> OutputCheck:
    """``got`` against ``want`` by :func:`~refattn.conformance.tolerance.error` (``scale``: its smallest denominator)."""
    if got is None:
        return OutputCheck(name, "not provided", budget=budget)
    if got.dtype.kind != "f" and got.dtype not in EXTRA_FLOAT_DTYPES:
        kind = "complex, not real" if got.dtype.kind == "c" else "not floating point"
        return OutputCheck(name, "fail", budget=budget, detail=f"dtype {got.dtype} ({kind}); expected a real float array")
    if got.shape != want.shape:
        return OutputCheck(name, "fail", budget=budget, detail=f"shape {got.shape}, expected {want.shape}")
    got = got.astype(np.float64)
    error = output_error(name, got, want, scale)
    if error <= budget:
        return OutputCheck(name, "pass", error, budget)
    return OutputCheck(name, "fail", error, budget, difference=first_difference(got, want, budget, scale))


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


def _as_tie_order(check: OutputCheck) -> OutputCheck:
    """A failed decision of a tie case (flag EXACT_TIES), described as the tie-order difference it most likely is."""
    if check.status != "fail" or check.difference is None:
        return check
    detail = (f"tie order differs: {check.detail}, on a case whose decisions sit on exact ties (duplicated or "
              "all-zero tokens), which the spec breaks toward the lower position or index")  # fmt: skip
    return replace(check, detail=detail)


def first_difference(got: np.ndarray, want: np.ndarray, budget: float, scale: float = TINY) -> Difference | None:
    """The first index in C order where ``|got - want| > budget * max(max|want|, scale)``.

    Infinities must match exactly and NaN never matches. Returns None when no
    element differs by that much.
    """
    finite = np.isfinite(want)
    scale = max(float(np.max(np.abs(want[finite]), initial=0.0)), scale)
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
    impl: Callable | None = None,
    *,
    suite: str | Path | Suite | None = None,
    mechanism: str | Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
    dtype: str = "float64",
    layout: str = "bhnd",
    grad: bool = False,
    vjp: Callable | None = None,
    xfail: Mapping[str, str] | Iterable[str] = (),
    name: str | None = None,
    backend: str | None = None,
    timeout: float | None = None,
    require_official: bool = False,
    strict: bool = False,
    require_aux: bool = False,
    progress: bool | None = False,
) -> Report:
    """Check an implementation against every selected conformance case.

    Parameters
    ----------
    impl : callable, optional
        ``impl(q, k, v, **kwargs)`` returning ``out``, ``(out, lse)`` or an
        object with ``.out`` (and optionally ``.lse``, ``.aux``). Give it, or
        ``backend``.
    suite : path, Suite or None
        A suite folder (with ``manifest.json``) or a loaded :class:`Suite`;
        None is the suite refattn publishes (:func:`default_suite_folder`).
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
    xfail : mapping or iterable of str
        Ids of cases the implementation is known to fail, each with the reason
        (a mapping id -> reason; :func:`read_xfail` reads one from a file), or
        ids alone. An id that is not in the suite's manifest is an error.
    name : str, optional
        How the report names the implementation (default: its qualified name).
    backend : str, optional
        Verify a bundled backend of ``mechanism`` (one name) instead of
        ``impl``: its public function and public VJP with ``backend=``.
    timeout : float, optional
        Seconds each case may take; each case then runs in a worker process,
        and one that takes longer is reported as ``timeout`` (the run goes on).
    require_official : bool
        Refuse a suite that is not the one refattn published.
    strict : bool
        Count ``unsupported`` cases (the implementation raised
        ``NotImplementedError``) as failures.
    require_aux : bool
        Count ``partial`` cases (outputs the case checks were not returned) as failures.
    progress : bool or None
        Draw a progress bar on stderr once the run takes longer than a second;
        None: only when stderr is a terminal.

    Returns
    -------
    Report

    Notes
    -----
    What every case hands ``impl`` and what it compares (per mechanism, with
    each argument's type, shape and meaning: ``refattn mechanisms --contract
    M``, or the tables of conformance/README.md, generated from the public
    functions' docstrings and the manifest):

    ==================  ==========================================  ==========================================
    what                how it reaches ``impl``                     how it is compared
    ==================  ==========================================  ==========================================
    ``input.*``         positionally, in the mechanism's order,     --
                        cast to ``dtype`` and laid out as ``layout``
    ``param.*``         keyword arrays (masks, rotations,           --
                        centroids, projections...)
    ``params``          keywords: every value the function takes,   --
                        the preset's spelled out (``preset`` names
                        them); a None whose default is None too is
                        not passed; ``scale=None`` is ``1/sqrt(D)``
    ``out``, ``lse``    returned                                    normwise relative error within the case's
                                                                    budget for ``dtype``; ``lse`` only when
                                                                    returned
    ``aux.*``           returned in ``.aux``                        exactly when the budget is 0 (decisions:
                                                                    buckets, clusters), else by budget; one not
                                                                    returned makes the case ``partial``
    gradients           ``vjp(dout, *inputs, dlse=..., **kwargs)``  ``grad_dout.*`` and ``grad_dlse.*`` (the
                                                                    VJP is linear in the cotangents): their sum
                                                                    with an ``lse``, the ``dout`` part without
    ==================  ==========================================  ==========================================

    Raises
    ------
    SpecError
        For a bad argument: ``dtype``, ``layout``, ``impl`` and ``backend``
        both or neither given, an unknown backend, ``grad=True`` without a
        vjp, a bad ``timeout``.
    SuiteError
        For a suite that does not load, a custom suite with
        ``require_official``, a selection that matches no case, mixes
        mechanisms with ``mechanism`` None, or has no budget for ``dtype``.
    """
    _check_choice(dtype, "dtype", PRECISIONS)
    _check_choice(layout, "layout", LAYOUTS)
    check_timeout(timeout)
    if backend is not None:
        impl, vjp, name = bundled_backend(impl, mechanism, backend, name)
    if not callable(impl):
        raise SpecError("impl", "a callable impl(q, k, v, **kwargs), or backend=NAME", _summary(impl))
    vjp = vjp if vjp is not None else getattr(impl, "vjp", None)
    if grad and not callable(vjp):
        raise SpecError("vjp", "a callable when grad=True (pass vjp=... or an implementation with a .vjp)", _summary(vjp))
    loaded = suite if isinstance(suite, Suite) else load_suite(
        default_suite_folder() if suite is None else suite, mechanism if mechanism is not None else mechanisms_named(ids)
    )
    if require_official and not loaded.origin.official:
        raise SuiteError(f"{loaded.folder}: {loaded.origin.describe()}; refusing it (require_official)")
    cases = loaded.select(mechanisms=mechanism, ids=ids).cases
    require_one_mechanism(cases, mechanism)
    require_precision(cases, dtype)
    xfail = check_xfail(xfail, loaded.manifest)
    check_signature(impl, cases, "impl")
    if grad:
        check_signature(vjp, cases, "vjp", cotangent=True)
    settings = dict(dtype=dtype, layout=layout, grad=grad, vjp=vjp)
    reports = [
        _apply_xfail(run_case(impl, case, timeout=timeout, **settings), xfail)
        for case in progress_bar(cases, "verify", enabled=progress, label=lambda case: case.id)
    ]
    return Report(
        impl=printable(name or _qualified_name(impl)),
        suite=printable(str(loaded.folder)),
        dtype=dtype,
        layout=layout,
        grad=grad,
        cases=reports,
        origin=loaded.origin,
        flag_descriptions={flag: printable(text) for flag, text in loaded.manifest["flags"].items()},
        strict=strict,
        require_aux=require_aux,
    )


def _summary(value) -> str:
    return printable(f"{type(value).__name__} {value!r}", limit=80)


def check_timeout(timeout) -> None:
    """Raise :class:`SpecError` unless ``timeout`` is None or a finite number of seconds > 0."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < math.inf:
        raise SpecError("timeout", "None or a finite number of seconds > 0", _summary(timeout))


def bundled_backend(impl, mechanism, backend: str, name: str | None) -> tuple[Callable, Callable | None, str]:
    """The public function and VJP of ``mechanism`` (one name) with ``backend=``, and how to name them.

    ``impl`` must be None (the backend is the implementation); raises :class:`SpecError` otherwise,
    or for an unknown mechanism or backend.
    """
    if impl is not None:
        raise SpecError("impl", "None with backend=NAME (the backend is the implementation)", _summary(impl))
    if not isinstance(mechanism, str):
        raise SpecError("mechanism", "one mechanism name with backend=NAME", _summary(mechanism))
    registered = registry.get(mechanism)
    if not isinstance(backend, str) or backend not in registered.backends:
        raise SpecError("backend", f"one of {list(registered.backends)} for {mechanism}", _summary(backend))
    forward = functools.partial(registered.forward, backend=backend)
    vjp = None if registered.vjp is None else functools.partial(registered.vjp, backend=backend)
    return forward, vjp, name or f"{mechanism} --backend {backend}"


def require_precision(cases: list[LoadedCase], dtype: str) -> None:
    """Raise :class:`SuiteError` for an empty selection or a case without budgets at ``dtype``."""
    if not cases:
        raise SuiteError("the selection has no cases: nothing would be compared")
    lacking = [case for case in cases if dtype not in case.precisions]
    if lacking:
        raise SuiteError(
            f"case {lacking[0].id} has no {dtype} budgets (it offers {', '.join(lacking[0].precisions)}); "
            f"leave it out (--case) or choose one of those"
        )


def run_case(impl: Callable, case: LoadedCase, *, timeout: float | None = None, **settings) -> CaseReport:
    """:func:`check_case`, in a worker process with a time limit when ``timeout`` is given.

    The worker is forked, so ``impl`` need not be importable or picklable; it
    is stopped when ``timeout`` seconds pass, and the case is a ``timeout``.
    A worker that dies (a crash in native code) makes the case an error.
    """
    if timeout is None:
        return check_case(impl, case, **settings)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_worker, args=(sender, impl, case, settings), daemon=True)
    start = time.perf_counter()
    worker.start()
    sender.close()
    try:
        if receiver.poll(timeout):
            try:
                return receiver.recv()
            except (EOFError, OSError):
                worker.join()
                message = f"the worker process running the implementation died (exit code {worker.exitcode})"
                return CaseReport(case.id, case.mechanism, case.flags, "error", [], message, time.perf_counter() - start)
        message = f"no result within {timeout:g} s; the worker process was stopped"
        return CaseReport(case.id, case.mechanism, case.flags, "timeout", [], message, time.perf_counter() - start)
    finally:
        if worker.is_alive():
            worker.kill()
        worker.join()
        receiver.close()


def _worker(sender, impl: Callable, case: LoadedCase, settings: dict) -> None:
    """In the forked worker: check the case, send the report, and leave without running any exit handler."""
    try:
        sender.send(check_case(impl, case, **settings))
        sender.close()
    finally:
        os._exit(0)


def _apply_xfail(report: CaseReport, xfail: Mapping[str, str]) -> CaseReport:
    """A listed case that failed is ``xfail``, one that passed ``xpass`` (the reason is the message);
    ``unsupported`` stays what it is: a case the implementation cannot express is not a bug."""
    if report.id not in xfail or report.status == "unsupported":
        return report
    status = "xpass" if report.status in ("pass", "partial") else "xfail"
    message = xfail[report.id] + (f" ({report.message})" if report.message else "")
    return CaseReport(report.id, report.mechanism, report.flags, status, report.checks, message, report.seconds,
                      report.gradient_cotangents)  # fmt: skip


def check_xfail(xfail, manifest: dict) -> dict[str, str]:
    """``xfail`` as id -> reason, after checking that every id is a case of the suite."""
    reasons = dict(xfail) if isinstance(xfail, Mapping) else {case_id: "listed as a known bug" for case_id in xfail}
    known = {entry["id"] for entry in manifest["cases"]}
    unknown = sorted(set(reasons) - known)
    if unknown:
        raise SuiteError(
            f"the xfail list names {len(unknown)} case{'s' * (len(unknown) > 1)} not in the suite: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} (see `refattn show` for ids; remove or fix them)"
        )
    return reasons


def check_signature(function: Callable, cases: list[LoadedCase], what: str, cotangent: bool = False) -> None:
    """Raise :class:`SpecError` unless ``function`` can be called with every case's arguments.

    An implementation takes the case's positional inputs (``q, k, v`` or
    ``qk, v``) and every parameter by keyword (a ``**kwargs`` it may refuse
    with ``NotImplementedError``); a VJP takes ``dout`` first and ``dlse=``.
    A callable whose signature cannot be read is not checked.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return
    for case in cases:
        positional = list(positional_names(case))
        keywords = [name for name in (*case.inputs, *case.array_params, *case.params) if name not in positional]
        arguments = (["dout"] if cotangent else []) + positional
        extra = {"dlse": None} if cotangent else {}
        try:
            signature.bind(*arguments, **dict.fromkeys(keywords), **extra)
        except TypeError as error:
            call = ", ".join([*arguments, *(f"{n}=..." for n in (*keywords, *extra))])
            raise SpecError(
                what,
                f"a callable taking ({call}) for case {case.id}; add **kwargs and raise NotImplementedError "
                "for what it cannot compute",
                f"{_qualified_name(function)}{signature} ({error})",
            ) from None


def _qualified_name(impl) -> str:
    module = getattr(impl, "__module__", None)
    qualname = getattr(impl, "__qualname__", None) or type(impl).__qualname__
    return f"{module}:{qualname}" if module else qualname


def read_xfail(path: str | Path) -> dict[str, str]:
    """Known bugs from an xfail file: id -> reason.

    One case id per line, its reason after ``#`` on the same line, or in the
    ``#`` comment lines just above a group of ids; blank lines end a group.
    Every id needs a reason (a known bug is explained, or it is a failure).

    Raises
    ------
    ValueError
        For an id without a reason, naming the file and line.
    """
    reasons, comment, after_ids = {}, [], False
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        entry, _, note = (part.strip() for part in line.partition("#"))
        if not entry:
            if note:
                comment = [note] if after_ids else comment + [note]
            elif not line.strip():
                comment = []
            after_ids = False
            continue
        after_ids = True
        reason = note or " ".join(comment)
        if not reason:
            raise ValueError(f"{path}:{number}: case {entry} has no reason; write it after '#' or in a comment above")
        reasons[entry] = printable(reason, limit=500)
    return reasons


def load_callable(spec: str) -> Callable:
    """Import ``"package.module:function"`` or ``"path/to/file.py:function"`` (``Class.method`` too) and return it.

    A file is imported as a module of its own (named after its path), with its
    folder on ``sys.path`` so that it may import its neighbours; it need not
    be inside a package.

    Raises
    ------
    ValueError
        For a spec of another form, a missing file, a module without the
        attribute, or an attribute that is not callable.
    ImportError
        When the module (or what it imports) cannot be imported.
    """
    location, sep, attribute = spec.rpartition(":")  # rpartition: "C:\\x\\impl.py:attend" on Windows
    if not sep or not location or not attribute:
        raise ValueError(f"expected 'package.module:function' or 'path/to/file.py:function', got {spec!r}")
    target = _import_file(location) if location.endswith(".py") else importlib.import_module(location)
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{location!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable")
    return target


def _import_file(location: str):
    """The module defined by the Python file at ``location``, imported once (``sys.modules`` keeps it)."""
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"no Python file {location!r} (from {Path.cwd()})")
    name = "refattn_impl_" + "".join(c if c.isalnum() else "_" for c in str(path))
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def default_suite_folder() -> Path:
    """The suite to verify against when none is named: the one refattn publishes.

    In order: the folder named by the environment variable ``REFATTN_SUITE``;
    the suite installed with the package (``refattn/conformance/vectors``,
    :data:`PACKAGED_SUITE`); the ``conformance/`` folder beside the ``refattn``
    package (a source checkout or an editable install). Raises
    ``FileNotFoundError`` when none has a ``manifest.json``. Whichever is
    found, the report's first line says whether it is the official suite.
    """
    named = os.environ.get(SUITE_VARIABLE)
    if named:
        if not (Path(named) / "manifest.json").is_file():
            raise FileNotFoundError(f"{SUITE_VARIABLE}={named}: no manifest.json there")
        return Path(named)
    for folder in (PACKAGED_SUITE, SOURCE_SUITE):
        if (folder / "manifest.json").is_file():
            return folder
    raise FileNotFoundError(
        f"no conformance suite installed in {PACKAGED_SUITE} or beside the refattn package ({SOURCE_SUITE}); "
        "reinstall refattn, or pass the suite folder (--suite DIR)"
    )
