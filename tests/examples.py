"""What the tests of examples/ share: loading an adapter by path, and reading a report's statuses."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.append(str(EXAMPLES))  # the adapters import their neighbour _gallery_entry


def load_example(file_name: str, module_name: str | None = None):
    """The adapter ``examples/<file_name>`` as a module, loaded by path (not importable as a package)."""
    spec = importlib.util.spec_from_file_location(module_name or Path(file_name).stem, EXAMPLES / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def statuses(report) -> dict:
    """``case id -> status`` of a verify report."""
    return {case.id: case.status for case in report.cases}
