"""Progress bars for the long commands (export, verify), on a terminal only.

Drawn by tqdm on stderr, and only once a run has lasted a second (tqdm's
``delay``), so short runs, pipes, CI logs and ``--quiet`` stay clean.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable

#: Seconds a run must last before its bar appears.
DELAY_SECONDS = 1.0


def progress_bar(items: list, what: str, *, enabled: bool | None = None, label: Callable | None = None) -> Iterable:
    """Yield ``items``, with a bar on stderr when ``enabled`` (None: when stderr is a terminal).

    ``label(item)`` (optional) is shown beside the bar: the case being run.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, desc=what, unit="case", delay=DELAY_SECONDS, file=sys.stderr) as bar:
        for item in bar:
            if label is not None:
                bar.set_postfix_str(label(item), refresh=False)
            yield item
