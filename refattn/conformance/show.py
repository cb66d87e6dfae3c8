"""``refattn show CASE_ID``: one case as a reader wants it, without opening a file.

Its description, its flags with what each catches, every parameter (the
manifest spells out defaults and preset values), the shape and dtype of every
tensor, and the budget of every output at every precision.
"""

from __future__ import annotations

import json
import textwrap
from typing import Mapping

from .suite import LoadedCase
from .text import printable

WIDTH = 100


def describe_case(case: LoadedCase, flag_descriptions: Mapping[str, str]) -> str:
    """The readable account of ``case``; ``flag_descriptions`` is the manifest's ``flags``."""
    lines = [f"{case.id}  (mechanism {case.mechanism}, preset {case.preset or 'none'})", ""]
    lines += textwrap.wrap(printable(case.description), WIDTH)
    lines += ["", "flags:"]
    for flag in case.flags:
        text = printable(flag_descriptions.get(flag, "(not described)"))
        lines += textwrap.wrap(f"{flag}: {text}", WIDTH, initial_indent="  ", subsequent_indent="    ")
    lines += ["", "parameters:"]
    width = max((len(name) for name in case.params), default=0)
    lines += [f"  {name:<{width}} = {json.dumps(value)}" for name, value in sorted(case.params.items())]
    lines += ["", "tensors:"]
    tensors = {
        **{f"input.{n}": x for n, x in case.inputs.items()},
        **{f"param.{n}": x for n, x in case.array_params.items()},
        **{f"cotangent.{n}": x for n, x in case.cotangents.items()},
        **{f"expected.{n}": x for n, x in case.expected.items()},
        **{f"aux.{n}": x for n, x in case.aux.items()},
    }
    width = max(len(name) for name in tensors)
    lines += [f"  {name:<{width}}  {x.dtype}{list(x.shape)}" for name, x in tensors.items()]
    precisions = case.precisions
    lines += ["", "budgets (normwise relative error; 0 = must match exactly):"]
    width = max(len(name) for name in case.tolerances)
    lines.append(f"  {'output':<{width}}" + "".join(f"  {p:>10}" for p in precisions))
    for output, row in case.tolerances.items():
        lines.append(f"  {output:<{width}}" + "".join(f"  {row[p]:>10.3g}" for p in precisions))
    return "\n".join(lines)
