"""pytest plugin: run the conformance suite against your implementation as tests.

::

    pytest --refattn-mechanism=dense --refattn-impl=mypackage.attention:attend --refattn-vjp=mypackage.attention:attend_vjp \\
           --refattn-dtype=float32 --refattn-xfail=known_failures.txt

or, for a bundled backend, ``--refattn-mechanism=dense --refattn-backend=numba``,
adds one test per conformance case, named ``refattn-conformance::<case id>``,
marked ``refattn`` (``-m refattn`` runs only them) and matched by ``-k`` on
its flags (``-k CAUSAL_ALIGNMENT``). A failing test shows the verifier's
report for that case (every output's error, budget and ratio, the first
differing stage and element, what its flags catch). Cases in the
``--refattn-xfail`` file are marked ``xfail`` (not strict). Gradients are
checked when ``--refattn-vjp`` is given or the implementation has a ``.vjp``
(always for ``--refattn-backend``). ``--refattn-timeout=SECONDS`` runs each
case in a worker process; ``--refattn-require-official`` refuses a suite other
than the published one, and the header says which suite runs. A case the
implementation cannot express (it raises ``NotImplementedError``) is skipped,
or fails with ``--refattn-strict``; one that passes without returning every
output the case checks passes, or fails with ``--refattn-require-aux``.

Installed with refattn (entry point ``pytest11``), so it is loaded by every
pytest run: without ``--refattn-impl`` or ``--refattn-backend`` it does nothing. Importing it imports
only refattn's light core (NumPy); the suite, the verifier and the
implementation are loaded only when the option is given.
"""

from __future__ import annotations

import os
import sys

import pytest

from .core.precision import PRECISIONS

COLLECTOR_NAME = "refattn-conformance"


def pytest_addoption(parser):
    group = parser.getgroup("refattn", "refattn conformance suite")
    group.addoption("--refattn-impl", metavar="MODULE:FUNCTION", help="implementation to verify, impl(q, k, v, **kwargs)")
    group.addoption("--refattn-vjp", metavar="MODULE:FUNCTION", help="its gradients, vjp(dout, q, k, v, dlse=..., **kwargs)")
    group.addoption("--refattn-backend", metavar="NAME", help="a bundled backend of --refattn-mechanism, instead of an impl")
    group.addoption("--refattn-suite", metavar="DIR", help="suite folder (default: the published one)")
    group.addoption("--refattn-require-official", action="store_true", help="refuse a suite other than the published one")
    group.addoption("--refattn-timeout", type=float, metavar="SECONDS", help="per case, in a worker process")
    group.addoption("--refattn-mechanism", action="append", metavar="M", help="only this mechanism (repeatable)")
    group.addoption(
        "--refattn-dtype", default="float64", choices=PRECISIONS,
        help="precision of the inputs (default float64)",
    )  # fmt: skip
    group.addoption("--refattn-layout", default="bhnd", choices=("bhnd", "bnhd"), help="layout of q, k, v, out (default bhnd)")
    group.addoption("--refattn-xfail", metavar="FILE", help="known bugs: a case id per line, its reason after # or above")
    group.addoption("--refattn-strict", action="store_true", help="unsupported cases (NotImplementedError) fail")
    group.addoption("--refattn-require-aux", action="store_true", help="partial cases (outputs not returned) fail")
    group.addoption("--refattn-fuzz", type=int, metavar="N", help="also fuzz the implementation with N problems")


def pytest_configure(config):
    config.addinivalue_line("markers", "refattn: a refattn conformance case (added by --refattn-impl)")


def _active(config) -> bool:
    return bool(config.getoption("refattn_impl") or config.getoption("refattn_backend"))


def pytest_report_header(config):
    """Which suite runs: official or custom (the first line of every refattn report)."""
    if not _active(config):
        return None
    from .conformance import manifest, trust
    from .conformance.verify import default_suite_folder

    try:
        folder = config.getoption("refattn_suite") or default_suite_folder()
        return f"refattn: {trust.origin(manifest.read_bytes(folder)).describe()} in {folder}"
    except (ValueError, OSError):  # reported as a usage error at collection
        return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Append the conformance items before other plugins deselect (``-k``) or reorder."""
    if not _active(config):
        return
    try:
        items.extend(ConformanceCollector.from_parent(session, name=COLLECTOR_NAME, nodeid=COLLECTOR_NAME).collect())
    except (ImportError, ValueError, FileNotFoundError) as exc:  # SuiteError and SpecError are ValueErrors
        raise pytest.UsageError(f"refattn: {exc}") from exc


class ConformanceFailure(Exception):
    """A case that failed; carries the verifier's readable report of it."""


class ConformanceCollector(pytest.Collector):
    """Loads the suite and the implementation once, and makes one item per selected case."""

    def collect(self):
        from .conformance import verify as v
        from .conformance.suite import load_suite, require_one_mechanism

        option = self.config.getoption
        if os.getcwd() not in sys.path:  # find the implementation's module from here, as `python -m pytest` would
            sys.path.insert(0, os.getcwd())
        mechanisms = option("refattn_mechanism")
        if option("refattn_backend"):
            if option("refattn_impl") or not mechanisms or len(mechanisms) != 1:
                raise ValueError("--refattn-backend takes one --refattn-mechanism and no --refattn-impl")
            impl, vjp, _ = v.bundled_backend(None, mechanisms[0], option("refattn_backend"), None)
        else:
            impl = v.load_callable(option("refattn_impl"))
            vjp = v.load_callable(option("refattn_vjp")) if option("refattn_vjp") else getattr(impl, "vjp", None)
        suite = load_suite(option("refattn_suite") or v.default_suite_folder(), mechanisms=mechanisms)
        if option("refattn_require_official") and not suite.origin.official:
            raise ValueError(f"{suite.folder}: {suite.origin.describe()}; refusing it (--refattn-require-official)")
        xfail = v.read_xfail(option("refattn_xfail")) if option("refattn_xfail") else {}
        v.check_xfail(xfail, suite.manifest)
        v.check_timeout(option("refattn_timeout"))
        settings = dict(dtype=option("refattn_dtype"), layout=option("refattn_layout"), grad=vjp is not None, vjp=vjp)
        settings["timeout"] = option("refattn_timeout")
        cases = suite.select(mechanisms=mechanisms).cases
        require_one_mechanism(cases, mechanisms)
        v.require_precision(cases, option("refattn_dtype"))
        v.check_signature(impl, cases, "impl")
        if vjp is not None:
            v.check_signature(vjp, cases, "vjp", cotangent=True)
        failing = v.Report.failing_statuses(option("refattn_strict"), option("refattn_require_aux"))
        for case in cases:
            item = ConformanceItem.from_parent(
                self, name=case.id, case=case, impl=impl, settings=settings, flag_descriptions=suite.manifest["flags"],
                failing=failing,
            )
            item.add_marker(pytest.mark.refattn)
            if case.id in xfail:
                item.add_marker(pytest.mark.xfail(reason=xfail[case.id], strict=False))
            for flag in case.flags:
                item.extra_keyword_matches.add(flag)
            yield item
        if option("refattn_fuzz"):
            if len(mechanisms or []) != 1:
                raise ValueError("--refattn-fuzz takes one --refattn-mechanism")
            yield FuzzItem.from_parent(
                self, name=f"fuzz[{mechanisms[0]}]", impl=impl, vjp=vjp, mechanism=mechanisms[0],
                examples=option("refattn_fuzz"), dtype=option("refattn_dtype"), layout=option("refattn_layout"),
            )  # fmt: skip


class ConformanceItem(pytest.Item):
    """One conformance case run through :func:`refattn.conformance.verify.run_case`."""

    def __init__(self, *, case, impl, settings, flag_descriptions, failing, **kwargs):
        super().__init__(**kwargs)
        self.failing = failing
        self.case = case
        self.impl = impl
        self.settings = settings
        self.flag_descriptions = flag_descriptions

    def runtest(self):
        from .conformance.verify import run_case

        report = run_case(self.impl, self.case, **self.settings)
        if report.status in self.failing:
            raise ConformanceFailure(report.format(self.flag_descriptions))
        if report.status == "unsupported":
            pytest.skip(f"unsupported: {report.message}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"refattn conformance case {self.case.id}"


class FuzzItem(pytest.Item):
    """``--refattn-fuzz N``: N drawn problems of the mechanism against the oracle (refattn/fuzz.py)."""

    def __init__(self, *, impl, vjp, mechanism, examples, dtype, layout, **kwargs):
        super().__init__(**kwargs)
        self.impl, self.vjp, self.mechanism = impl, vjp, mechanism
        self.options = dict(examples=examples, dtype=dtype, layout=layout)

    def runtest(self):
        from .fuzz import check

        check(self.impl, self.mechanism, vjp=self.vjp, grad=self.vjp is not None, **self.options)

    def reportinfo(self):
        return self.path, None, f"refattn fuzz {self.mechanism} ({self.options['examples']} problems)"
