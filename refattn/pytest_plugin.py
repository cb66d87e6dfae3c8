"""pytest plugin: run the conformance suite against your implementation as tests.

::

    pytest --refattn-mechanism=dense --refattn-impl=mypackage.attention:attend --refattn-vjp=mypackage.attention:attend_vjp \\
           --refattn-dtype=float32 --refattn-xfail=known_failures.txt

adds one test per conformance case, named ``refattn-conformance::<case id>``,
marked ``refattn`` (``-m refattn`` runs only them) and matched by ``-k`` on
its flags (``-k CAUSAL_ALIGNMENT``). A failing test shows the verifier's
report for that case (every output's error, budget and ratio, the first
differing stage and element, what its flags catch). Cases in the
``--refattn-xfail`` file are marked ``xfail`` (not strict). Gradients are
checked when ``--refattn-vjp`` is given or the implementation has a ``.vjp``.

Installed with refattn (entry point ``pytest11``), so it is loaded by every
pytest run: without ``--refattn-impl`` it does nothing. Importing it imports
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
    group.addoption("--refattn-suite", metavar="DIR", help="suite folder (default: ./conformance, else the source checkout's)")
    group.addoption("--refattn-mechanism", action="append", metavar="M", help="only this mechanism (repeatable)")
    group.addoption(
        "--refattn-dtype", default="float64", choices=PRECISIONS,
        help="precision of the inputs (default float64)",
    )  # fmt: skip
    group.addoption("--refattn-layout", default="bhnd", choices=("bhnd", "bnhd"), help="layout of q, k, v, out (default bhnd)")
    group.addoption("--refattn-xfail", metavar="FILE", help="ids of cases expected to fail, one per line")


def pytest_configure(config):
    config.addinivalue_line("markers", "refattn: a refattn conformance case (added by --refattn-impl)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Append the conformance items before other plugins deselect (``-k``) or reorder."""
    if not config.getoption("refattn_impl"):
        return
    try:
        items.extend(ConformanceCollector.from_parent(session, name=COLLECTOR_NAME, nodeid=COLLECTOR_NAME).collect())
    except (ImportError, ValueError, FileNotFoundError) as exc:  # SuiteError is a ValueError
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
        impl = v.load_callable(option("refattn_impl"))
        vjp = v.load_callable(option("refattn_vjp")) if option("refattn_vjp") else getattr(impl, "vjp", None)
        suite = load_suite(option("refattn_suite") or v.default_suite_folder())
        xfail = v.read_xfail(option("refattn_xfail")) if option("refattn_xfail") else frozenset()
        settings = dict(dtype=option("refattn_dtype"), layout=option("refattn_layout"), grad=vjp is not None, vjp=vjp)
        cases = suite.select(mechanisms=option("refattn_mechanism")).cases
        require_one_mechanism(cases, option("refattn_mechanism"))
        for case in cases:
            item = ConformanceItem.from_parent(
                self, name=case.id, case=case, impl=impl, settings=settings, flag_descriptions=suite.manifest["flags"]
            )
            item.add_marker(pytest.mark.refattn)
            if case.id in xfail:
                item.add_marker(pytest.mark.xfail(reason="listed in --refattn-xfail", strict=False))
            for flag in case.flags:
                item.extra_keyword_matches.add(flag)
            yield item


class ConformanceItem(pytest.Item):
    """One conformance case run through :func:`refattn.conformance.verify.check_case`."""

    def __init__(self, *, case, impl, settings, flag_descriptions, **kwargs):
        super().__init__(**kwargs)
        self.case = case
        self.impl = impl
        self.settings = settings
        self.flag_descriptions = flag_descriptions

    def runtest(self):
        from .conformance.verify import check_case

        report = check_case(self.impl, self.case, **self.settings)
        if report.status != "pass":
            raise ConformanceFailure(report.format(self.flag_descriptions))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"refattn conformance case {self.case.id}"
