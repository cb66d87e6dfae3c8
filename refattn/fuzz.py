"""``refattn fuzz``: differential testing of an implementation against the oracle.

The conformance vectors catch the bug classes someone thought of; fuzzing
finds the others. For one mechanism, :func:`fuzz`

1. draws problems from the mechanism's strategy
   (:func:`refattn.strategies.problems`: awkward sizes, every option, value
   scales from tiny to huge logits, discrete decisions kept away from ties at
   the precision under test);
2. makes each one a conformance case in memory: the oracle's expected values
   (the reference; the Numba backend for problems too large for it, forward
   only and in float64), cotangents, and for every output the budget the
   tolerance policy gives that very problem at the precision under test
   (:mod:`refattn.conformance.tolerance`, as for the exported vectors);
3. runs the implementation on it exactly as ``refattn verify`` runs it on a
   stored case (:func:`refattn.conformance.verify.check_case`), and with
   ``properties`` also checks the mechanism's invariants
   (``<package>/properties.py``) on the implementation alone;
4. on a failure, lets Hypothesis shrink the problem to a minimal one (fewer
   and shorter sequences, smaller heads, fewer options, simpler parameters),
   reports it like ``verify`` (shapes, parameters, every output's error and
   budget, the first differing stage and element) and, with ``save``, writes
   it as a case of a conformance suite in the published format, so that
   ``refattn verify --suite DIR`` replays it in any language.

Runs are deterministic for a given ``seed`` (Hypothesis's example database is
off unless ``database`` names a folder). What fuzzing can and cannot find is
discussed in spec/fuzzing.md.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import importlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.numpy
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.database import DirectoryBasedExampleDatabase

from . import strategies
from .conformance import export, tolerance
from .conformance import manifest as manifest_module
from .conformance.case import Case, case_seed
from .conformance.manifest import MANIFEST_NAME, SuiteError
from .conformance.suite import LoadedCase, load_suite
from .conformance.text import printable
from .conformance.verify import FAILING, LAYOUTS, CaseReport, bundled_backend, check_case, load_callable
from .core import registry
from .core.errors import SpecError
from .core.precision import PRECISIONS, STORAGE_DTYPES
from .core.results import Result

#: The flag of every saved counterexample (it is described in the saved suite's manifest).
FUZZ_FLAG = "FUZZ_COUNTEREXAMPLE"
FUZZ_FLAG_DESCRIPTION = (
    "A problem drawn by `refattn fuzz` on which an implementation differed from the oracle, shrunk to a minimal one "
    "and saved: a regression case of the implementation's own suite. Its description names the implementation and "
    "the first differing stage."
)
#: Saved cases are named ``<mechanism>/fuzz_<digest of the problem>``.
CASE_PREFIX = "fuzz_"
#: A problem whose score matrix (B, H, Nq, Nk) has more entries than this is "large": its expected
#: values come from the Numba backend (forward only, float64; the reference's intermediates would not fit).
LARGE_SCORES = 1 << 24
#: Invariants in a lower precision are checked to this many unit roundoffs, times ``1 + L`` (the logit scale).
PROPERTY_ROUNDOFFS = 64.0


class _Differs(AssertionError):
    """Raised inside the Hypothesis test on a failing problem (Hypothesis then shrinks it)."""


class _OutOfTime(BaseException):
    """Raised inside the Hypothesis test when ``max_seconds`` have passed: ends the run at once (not a failure)."""


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PropertyViolation:
    """An invariant of the mechanism that the implementation broke on a problem."""

    name: str
    message: str

    def describe(self) -> str:
        return f"property {self.name}: {self.message}"


@dataclass(frozen=True)
class Counterexample:
    """The minimal failing problem found, and what differed on it.

    Attributes
    ----------
    problem : MechanismProblem
    case : LoadedCase
        The problem as a conformance case (expected values and budgets at the precision under test).
    report : CaseReport
        The verifier's account of it: every check, the first differing stage and element.
    violations : list of PropertyViolation
        Invariants it broke (with ``properties``).
    saved : Path or None
        The case file written with ``save``.
    """

    problem: strategies.MechanismProblem
    case: LoadedCase
    report: CaseReport
    violations: tuple[PropertyViolation, ...] = ()
    saved: Path | None = None

    @property
    def failed(self) -> bool:
        return self.report.status in FAILING or bool(self.violations)

    def format(self) -> str:
        lines = ["minimal problem:"] + [f"  {line}" for line in self.problem.describe().splitlines()]
        lines.append(self.report.format())
        lines += [f"  {violation.describe()}" for violation in self.violations]
        return "\n".join(lines)


@dataclass(frozen=True)
class FuzzReport:
    """The verdict of one :func:`fuzz` run: ``ok`` when no example failed."""

    impl: str
    mechanism: str
    dtype: str
    grad: bool
    seed: int
    examples: int
    seconds: float
    unsupported: int
    counterexample: Counterexample | None = None
    out_of_time: bool = False
    found_after: int | None = None

    @property
    def shrink_steps(self) -> int:
        """Problems run after the first failure (Hypothesis's shrinking)."""
        return 0 if self.found_after is None else self.examples - self.found_after

    @property
    def ok(self) -> bool:
        return self.counterexample is None

    def format(self) -> str:
        """A readable report: the run, and for a failure the minimal problem and the verifier's account of it."""
        head = (f"refattn fuzz: {self.impl}  mechanism={self.mechanism}  dtype={self.dtype}  "
                f"grad={'yes' if self.grad else 'no'}  seed={self.seed}")  # fmt: skip
        runs = self.examples if self.ok else self.found_after
        ran = f"{runs} example{'s' * (runs != 1)}"
        ran += f" in {self.seconds:.1f} s" if self.ok else f", shrunk in {self.shrink_steps} more ({self.seconds:.1f} s)"
        ran += f" ({self.unsupported} unsupported)" if self.unsupported else ""
        ran += " (stopped at --max-seconds)" if self.out_of_time else ""
        if self.ok:
            return f"{head}\n{ran}: no difference found (OK)"
        lines = [head, f"{ran}: FAILED", self.counterexample.format()]
        if self.counterexample.saved is not None:
            folder = self.counterexample.saved.parent.parent
            lines.append(f"saved: {self.counterexample.saved}")
            tested = self.impl.split(" ", 1)[1] if " --backend " in self.impl else f"--impl {self.impl}"
            options = (f" --dtype {self.dtype}" if self.dtype != "float64" else "") + (" --grad" if self.grad else "")
            lines.append(f"replay: refattn verify --suite {folder} --mechanism {self.mechanism} {tested}{options}")
        return "\n".join(lines)


# --------------------------------------------------------------------------
# One problem as a conformance case


def as_case(problem: strategies.MechanismProblem, grad: bool, description: str = "") -> Case:
    """``problem`` as a :class:`~refattn.conformance.case.Case` named ``<mechanism>/fuzz_<digest>``.

    Its differentiable inputs are those the reference VJP gives gradients for
    (every array argument when ``grad`` is False: they are all passed alike).
    """
    mechanism = registry.get(problem.mechanism)
    arrays = {name: np.ascontiguousarray(x) for name, x in problem.arrays.items()}
    case_id = f"{mechanism.name}/{CASE_PREFIX}{_digest(arrays, problem.params)}"
    differentiable = _differentiable(mechanism, problem) if grad else None
    grad = differentiable is not None
    return Case(
        id=case_id,
        mechanism=mechanism.name,
        description=description or f"A problem drawn by refattn fuzz ({mechanism.name}).",
        flags=(FUZZ_FLAG,),
        seed=case_seed(case_id),
        arrays=lambda rng: {name: x.copy() for name, x in arrays.items()},
        params=dict(problem.params),
        differentiable=tuple(problem.positional) if differentiable is None else tuple(differentiable),
        preset=problem.preset,
        grad=grad,
    )


def _digest(arrays: dict, params: dict) -> str:
    """12 hex digits identifying a problem: its arrays (names, dtypes, shapes, bytes) and parameters."""
    digest = hashlib.sha256(repr(sorted(params.items())).encode())
    for name, x in sorted(arrays.items()):
        digest.update(f"{name}:{x.dtype.str}:{x.shape}".encode())
        digest.update(x.tobytes())
    return digest.hexdigest()[:12]


def _differentiable(mechanism: registry.Mechanism, problem: strategies.MechanismProblem) -> list[str] | None:
    """The array arguments the reference VJP returns gradients for; None where it gives none (a forward-only
    mechanism such as the centroid update, or a problem it cannot differentiate)."""
    result = problem.call(mechanism.forward)
    try:
        grads = problem.call(mechanism.vjp, np.zeros_like(result.out))
    except (SpecError, NotImplementedError):
        return None
    return [name for name in problem.arrays if name in grads]


def is_large(problem: strategies.MechanismProblem) -> bool:
    """Whether ``problem`` is too large for the reference: its first input's rows times its length
    exceed :data:`LARGE_SCORES` (the size of a (B, H, Nq, Nk) score matrix)."""
    first = problem.arrays[problem.positional[0]]
    return first.ndim >= 2 and math.prod(first.shape[:-1]) * first.shape[-2] > LARGE_SCORES


def loaded_case(problem: strategies.MechanismProblem, dtype: str, grad: bool) -> LoadedCase:
    """``problem`` as a case in memory, as :func:`~refattn.conformance.suite.load_suite` would give it: expected
    values by the oracle and, for every output, the budget the tolerance policy gives it at ``dtype``."""
    mechanism = registry.get(problem.mechanism)
    large = is_large(problem) and "numba" in mechanism.backends
    if large and dtype != "float64":
        raise SpecError("dtype", f"float64 for problems this large (beyond {LARGE_SCORES} scores)", repr(dtype))
    case = as_case(problem, grad and not large)
    rng = np.random.default_rng(case.seed)
    arrays = case.arrays(rng)
    if large:
        expected, cotangents, tolerances = export._by_large_backend(mechanism, case, arrays, rng)
    else:
        expected, cotangents, tolerances = _by_reference(mechanism, case, arrays, rng, dtype)
    parts = {name: x for name, x in expected.items() if not name.startswith("aux.")}
    return LoadedCase(
        id=case.id,
        mechanism=mechanism.name,
        preset=case.preset,
        description=case.description,
        flags=case.flags,
        params=export.explicit_params(mechanism, case.params, arrays),
        inputs={name: x for name, x in arrays.items() if name in case.differentiable},
        array_params={name: x for name, x in arrays.items() if name not in case.differentiable},
        cotangents=cotangents,
        expected=parts,
        aux={name.removeprefix("aux."): x for name, x in sorted(expected.items()) if name.startswith("aux.")},
        tolerances=tolerances,
    )


def _by_reference(mechanism, case: Case, arrays: dict, rng, dtype: str) -> tuple[dict, dict, dict]:
    """Expected values, cotangents and budgets at ``dtype`` (and float32, which float64's budget needs), as the
    export computes them at every precision (``refattn.conformance.export._by_reference``, which evaluates the
    reference at all three lower precisions)."""
    result = mechanism.forward(**arrays, **case.params)
    cotangents = export._cotangents(case, result, rng)
    expected = {**export._outputs(result), **export._grads(mechanism, case, arrays, cotangents, precision=None)}
    # float64's budget also needs the float32 reference error (tolerance.conditioned_float64_budget).
    lower = "float32" if dtype == "float64" else dtype
    at_dtype = {lower: export._evaluations(mechanism, case, arrays, cotangents, lower)}
    grads = {name: value for name, value in expected.items() if manifest_module.is_gradient(name)}
    scales = tolerance.gradient_scales(grads)
    sensitivity = tolerance.sensitivities(mechanism.vjp, {**arrays, **case.params}, cotangents.get("dout"), result,
                                          grads, scales)  # fmt: skip
    tolerances = {
        name: tolerance.budgets(
            name, value, {p: [o[name] for o in outputs] for p, outputs in at_dtype.items()},
            sensitivity.get(name, 0.0), scales.get(name, tolerance.TINY),
        )
        for name, value in expected.items()
    }  # fmt: skip
    return expected, cotangents, tolerances


# --------------------------------------------------------------------------
# Invariants on the implementation alone


def property_functions(mechanism: str) -> list[Callable]:
    """The invariants of ``mechanism`` that can run on any implementation: the functions of its
    ``properties`` module (its ``ALL`` when it lists them) taking ``(attend, <positional inputs>, params)``."""
    registered = registry.get(mechanism)
    module = importlib.import_module(registered.properties)
    candidates = getattr(module, "ALL", None)
    if candidates is None:
        candidates = [f for name, f in vars(module).items()
                      if inspect.isfunction(f) and f.__module__ == module.__name__ and not name.startswith("_")]  # fmt: skip
    wanted = ["attend", *registered.positional, "params"]
    return [f for f in candidates if list(inspect.signature(f).parameters)[: len(wanted)] == wanted]


def check_properties(impl: Callable, problem: strategies.MechanismProblem, dtype: str, logit_scale: float) -> list[PropertyViolation]:
    """Run every invariant of :func:`property_functions` on ``impl``; the ones it breaks.

    ``impl`` gets the arrays in ``dtype``; the invariants compare its results
    to a normwise tolerance of :data:`PROPERTY_ROUNDOFFS` unit roundoffs times
    ``1 + logit_scale`` (1e-10 at least). An invariant that does not apply to
    the problem (it raises ``ValueError``) is skipped.
    """

    def attend(*positional, **keywords):
        cast = lambda x: x.astype(STORAGE_DTYPES[dtype]) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x
        return _as_result(impl(*map(cast, positional), **{name: cast(x) for name, x in keywords.items()}))

    rtol = max(1e-10, PROPERTY_ROUNDOFFS * tolerance.unit_roundoff(dtype) * (1.0 + logit_scale))
    arrays = problem.arrays
    positional = [arrays.pop(name) for name in problem.positional]
    violations = []
    for prop in property_functions(problem.mechanism):
        keywords = {"rtol": rtol} if "rtol" in inspect.signature(prop).parameters else {}
        try:
            prop(attend, *positional, {**arrays, **problem.params}, **keywords)
        except ValueError:
            continue  # the invariant needs another kind of problem
        except NotImplementedError:
            continue
        except AssertionError as error:
            violations.append(PropertyViolation(prop.__name__, printable(str(error), limit=500)))
    return violations


def _as_result(value) -> Result:
    """An implementation's return value (``out``, ``(out, lse)`` or an object with ``.out``) as a float64 Result."""
    if hasattr(value, "out"):
        out, lse, aux = value.out, getattr(value, "lse", None), dict(getattr(value, "aux", None) or {})
    elif isinstance(value, tuple):
        (out, lse), aux = value, {}
    else:
        out, lse, aux = value, None, {}
    as_float64 = lambda x: None if x is None else np.asarray(x).astype(np.float64)
    return Result(out=as_float64(out), lse=as_float64(lse), aux=aux)


# --------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    """What one run has seen so far (the Hypothesis test writes here)."""

    deadline: float
    examples: int = 0
    found_after: int | None = None
    unsupported: int = 0
    failure: Counterexample | None = None
    out_of_time: bool = False
    started: float = field(default_factory=time.perf_counter)


def fuzz(
    impl: Callable | None = None,
    mechanism: str = "dense",
    *,
    vjp: Callable | None = None,
    backend: str | None = None,
    dtype: str = "float64",
    layout: str = "bhnd",
    grad: bool = False,
    examples: int = 100,
    seed: int = 0,
    max_seconds: float | None = None,
    properties: bool = False,
    save=None,
    database=None,
    name: str | None = None,
) -> FuzzReport:
    """Fuzz ``impl`` against the oracle on problems of ``mechanism``; shrink and report the first failure.

    Parameters
    ----------
    impl : callable
        ``impl(q, k, v, **kwargs)`` as for :func:`refattn.verify` (``qk, v``
        for shared-QK mechanisms); None with ``backend``.
    mechanism : str
        Registry name.
    vjp : callable, optional
        Its gradients, ``vjp(dout, q, k, v, dlse=..., **kwargs)``; default ``impl.vjp``.
    backend : str, optional
        Fuzz a bundled backend of ``mechanism`` (``"numba"``) instead of ``impl``.
    dtype : {"float64", "float32", "float16", "bfloat16"}
        Precision of the inputs; budgets are those of that precision.
    layout : {"bhnd", "bnhd"}
    grad : bool
        Also compare gradients (needs ``vjp``).
    examples : int >= 1
        How many problems to draw (Hypothesis's ``max_examples``).
    seed : int
        The run is a function of it.
    max_seconds : float, optional
        Stop drawing (and shrinking) after this long; the run then reports what it found.
    properties : bool
        Also check the mechanism's invariants on ``impl`` alone.
    save : str or path, optional
        Write the minimal counterexample there as a conformance case (a suite
        folder: new, or one holding only ``refattn fuzz`` cases).
    database : str or path, optional
        Keep Hypothesis's example database there (failures are replayed first next time).
    name : str, optional
        How the report names the implementation.

    Returns
    -------
    FuzzReport

    Raises
    ------
    SpecError
        For a bad argument: unknown mechanism or one without strategies,
        ``examples`` < 1, bad ``dtype`` or ``layout``, ``grad`` without a vjp,
        ``impl`` and ``backend`` both or neither given.
    SuiteError
        When ``save`` holds a suite other than a ``refattn fuzz`` one.
    """
    _check_examples(examples)
    if backend is not None:
        impl, vjp, name = bundled_backend(impl, mechanism, backend, name)
    if not callable(impl):
        raise SpecError("impl", "a callable impl(q, k, v, **kwargs), or backend=NAME", printable(repr(impl), limit=80))
    vjp = vjp if vjp is not None else getattr(impl, "vjp", None)
    if grad and not callable(vjp):
        raise SpecError("vjp", "a callable when grad=True (pass vjp=... or an implementation with a .vjp)", repr(vjp))
    if dtype not in PRECISIONS:
        raise SpecError("dtype", f"one of {list(PRECISIONS)}", repr(dtype))
    if layout not in LAYOUTS:
        raise SpecError("layout", f"one of {list(LAYOUTS)}", repr(layout))
    problems = strategies.problems(mechanism, precision=dtype)
    if save is not None:
        fuzz_suite_entries(save)
    run = _Run(deadline=math.inf if max_seconds is None else time.perf_counter() + max_seconds)

    def attempt(problem: strategies.MechanismProblem) -> None:
        if time.perf_counter() > run.deadline:
            run.out_of_time = True
            raise _OutOfTime
        run.examples += 1
        found = examine(impl, problem, dtype=dtype, layout=layout, grad=grad, vjp=vjp, properties=properties)
        run.unsupported += found.report.status == "unsupported"
        if found.failed:
            run.failure = found
            run.found_after = run.found_after or run.examples
            raise _Differs(found.report.first_stage or "property")

    test = settings(
        max_examples=examples, database=None if database is None else DirectoryBasedExampleDatabase(str(database)),
        derandomize=False, deadline=None, print_blob=False, report_multiple_bugs=False, verbosity=Verbosity.quiet,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck),
    )(hypothesis_seed(seed)(given(problems)(attempt)))  # fmt: skip
    try:
        test()
    except (_Differs, _OutOfTime):
        pass  # the last failure recorded is the smallest (Hypothesis replays the minimal example last)
    failure = run.failure
    if failure is not None and save is not None:
        failure = Counterexample(failure.problem, failure.case, failure.report, failure.violations,
                                 save_case(save, failure, name or _qualified_name(impl)))  # fmt: skip
    return FuzzReport(
        impl=printable(name or _qualified_name(impl)), mechanism=mechanism, dtype=dtype, grad=grad, seed=seed,
        examples=run.examples, seconds=time.perf_counter() - run.started, unsupported=run.unsupported,
        counterexample=failure, out_of_time=run.out_of_time, found_after=run.found_after,
    )  # fmt: skip


def examine(impl: Callable, problem: strategies.MechanismProblem, *, dtype: str = "float64", layout: str = "bhnd",
            grad: bool = False, vjp: Callable | None = None, properties: bool = False) -> Counterexample:  # fmt: skip
    """Run ``impl`` on one problem: the verifier's report (and invariants broken, with ``properties``)."""
    case = loaded_case(problem, dtype, grad)
    report = check_case(impl, case, dtype=dtype, layout=layout, grad=grad, vjp=vjp)
    violations = ()
    if properties and report.status not in ("error", "unsupported"):
        logit_scale = tolerance.logit_scale(case.expected["lse"]) if "lse" in case.expected else 0.0
        violations = tuple(check_properties(impl, problem, dtype, logit_scale))
    return Counterexample(problem, case, report, violations)


def _check_examples(examples) -> None:
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise SpecError("examples", "an integer >= 1", repr(examples))


def _qualified_name(impl) -> str:
    module = getattr(impl, "__module__", None)
    qualname = getattr(impl, "__qualname__", None) or type(impl).__qualname__
    return f"{module}:{qualname}" if module else qualname


# --------------------------------------------------------------------------
# Saving a counterexample as a conformance case


def fuzz_suite_entries(folder) -> list[dict]:
    """The manifest entries of the ``refattn fuzz`` suite in ``folder`` ([] for a new or empty folder).

    Raises
    ------
    SuiteError
        If ``folder`` is a file, or holds a suite that does not load or has a
        case ``refattn fuzz`` did not write (another suite: never mixed in).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SuiteError(f"--save {folder}: not a folder")
    if not (folder / MANIFEST_NAME).is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise SuiteError(f"--save {folder}: holds files but no {MANIFEST_NAME}; name a new or empty folder, or a fuzz suite")
        return []
    try:
        suite = load_suite(folder)
    except SuiteError as error:
        raise SuiteError(f"--save {folder}: holds a suite that does not load ({error})") from None
    foreign = [case.id for case in suite.cases if FUZZ_FLAG not in case.flags]
    if foreign:
        raise SuiteError(f"--save {folder}: holds a different suite (case {foreign[0]} was not written by refattn fuzz)")
    return list(suite.manifest["cases"])


def save_case(folder, counterexample: Counterexample, impl_name: str) -> Path:
    """Write the counterexample as a case of the fuzz suite in ``folder`` (creating it); return its file.

    The case is computed again as ``refattn export`` computes one (budgets at
    every precision, gradients when the mechanism has them), written as
    ``<mechanism>/fuzz_<digest>.safetensors`` and added to the manifest, so
    that ``refattn verify --suite folder`` replays it.
    """
    folder = Path(folder)
    entries = [entry for entry in fuzz_suite_entries(folder)]
    mechanism = registry.get(counterexample.problem.mechanism)
    stage = counterexample.report.first_stage or (counterexample.violations[0].name if counterexample.violations else "")
    description = printable(f"Found by refattn fuzz: {impl_name} differed at {stage or counterexample.report.status}.", limit=300)
    case = as_case(counterexample.problem, grad=True, description=description)
    tensors, tolerances = export.compute_case(mechanism, case)
    data = safetensors.numpy.save(tensors)
    file = f"{case.id}.safetensors"
    path = folder / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    arrays = {name.split(".", 1)[1]: tensors[name] for name in tensors if name.startswith(("input.", "param."))}
    entry = manifest_module.case_entry(
        case, params=export.explicit_params(mechanism, case.params, arrays),
        shapes={name: tensors[name].shape for name in sorted(tensors)}, file=file,
        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), tolerances=tolerances,
    )  # fmt: skip
    entries = [old for old in entries if old["id"] != case.id] + [entry]
    manifest = {**manifest_module.build([]), "flags": {FUZZ_FLAG: FUZZ_FLAG_DESCRIPTION}, "cases": entries}
    manifest_module.validate(manifest)
    (folder / MANIFEST_NAME).write_text(manifest_module.dumps(manifest), encoding="ascii")
    return path


# --------------------------------------------------------------------------
# Command line and pytest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``refattn fuzz``."""
    tested = parser.add_mutually_exclusive_group(required=True)
    tested.add_argument("--impl", metavar="MODULE:FUNCTION", help="implementation, impl(q, k, v, **kwargs); FILE.py:FUNCTION too")
    tested.add_argument("--backend", metavar="NAME", help="a bundled backend of --mechanism instead (numba)")
    parser.add_argument("--vjp", metavar="MODULE:FUNCTION", help="its gradients, vjp(dout, q, k, v, dlse=..., **kwargs)")
    parser.add_argument("--mechanism", required=True, metavar="M", help="the mechanism it implements")
    parser.add_argument("--dtype", default="float64", help="precision of the inputs (default float64)")
    parser.add_argument("--layout", default="bhnd", help="layout of q, k, v, out: bhnd (default) or bnhd")
    parser.add_argument("--grad", action="store_true", help="also compare gradients (needs --vjp or impl.vjp)")
    parser.add_argument("--examples", type=int, default=100, metavar="N", help="problems to draw (default 100)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="the run is a function of it (default 0)")
    parser.add_argument("--max-seconds", type=float, metavar="T", help="stop drawing and shrinking after T seconds")
    parser.add_argument("--properties", action="store_true", help="also check the mechanism's invariants on the implementation")
    parser.add_argument("--save", metavar="DIR", help="write the minimal counterexample there as a conformance case")
    parser.add_argument("--database", metavar="DIR", help="keep Hypothesis's example database there")


def run(args: argparse.Namespace) -> int:
    """``refattn fuzz``: 0 when no difference was found, 1 when one was, 2 for bad input (one line on stderr)."""
    try:
        impl = None if args.impl is None else load_callable(args.impl)
        vjp = None if args.vjp is None else load_callable(args.vjp)
        report = fuzz(impl, args.mechanism, vjp=vjp, backend=args.backend, dtype=args.dtype, layout=args.layout,
                      grad=args.grad, examples=args.examples, seed=args.seed, max_seconds=args.max_seconds,
                      properties=args.properties, save=args.save, database=args.database, name=args.impl)  # fmt: skip
    except (ValueError, ImportError, OSError) as error:  # SpecError and SuiteError are ValueErrors
        print(f"refattn fuzz: error: {printable(str(error), limit=600)}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def main(argv=None) -> int:
    """The whole ``refattn fuzz`` command line (``argv`` without the ``fuzz`` word)."""
    parser = argparse.ArgumentParser(prog="refattn fuzz", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def check(impl: Callable | None, mechanism: str, examples: int, **options) -> FuzzReport:
    """:func:`fuzz`, raising ``AssertionError`` with the report when a difference is found (for test suites
    and the pytest plugin's ``--refattn-fuzz N``)."""
    report = fuzz(impl, mechanism, examples=examples, **options)
    if not report.ok:
        raise AssertionError(report.format())
    return report
