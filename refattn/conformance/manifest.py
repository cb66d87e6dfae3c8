"""The suite manifest: build it at export, read and validate it at load.

``<suite>/manifest.json`` lists every case of a suite (format described in
conformance/README.md, schema in ``schema.json`` next to this module)::

    {"format_version": 2, "refattn_version": "0.1.0",
     "flags": {"CAUSAL_ALIGNMENT": "...", ...},
     "cases": [{"id": "dense/causal", "mechanism": "dense", "preset": null,
                "description": "...", "flags": [...], "params": {...},
                "shapes": {"input.q": [1, 2, 17, 16], ...}, "tensors": [...],
                "file": "dense/causal.safetensors", "sha256": "...",
                "size_bytes": 12345,
                "tolerances": {"out": {"float64": 1e-10, "float32": ...}, ...}},
               ...]}

It is written with sorted keys, one-space indentation and a trailing newline,
so that the same suite always gives the same bytes.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

import jsonschema

from .flags import describe
from .text import printable

#: 2: gradients stored in two parts (``grad_dout.<input>``, ``grad_dlse.<input>``)
#: and ``params`` spelling out every value of the function (format 1 had one
#: ``grad.<input>`` for both cotangents together, and only the values a case set).
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("schema.json")
#: A manifest larger than this is refused before parsing (the default suite's is about 100 kB).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: Deepest nesting of JSON arrays and objects a manifest may have (it needs 6).
MAX_JSON_DEPTH = 32
#: Integers in a manifest (sizes, shapes, parameters) fit in a signed 64-bit integer.
MAX_JSON_INTEGER = 2**63 - 1
#: Largest case file (schema ``size_bytes``) and largest suite (sum of sizes) a loader reads.
MAX_CASE_BYTES = 2**30
MAX_SUITE_BYTES = 2**32
#: A SuiteError message is cut to this many characters.
MAX_MESSAGE_CHARS = 600

EXPECTED_PREFIX = "expected."
AUX_PREFIX = "aux."
#: Cotangent -> the prefix of the gradients a case stores for that cotangent alone (the VJP is
#: linear in the cotangents: the gradient for both together is the sum of the two parts).
GRADIENT_PARTS = {"dout": "grad_dout", "dlse": "grad_dlse"}


def gradient_name(cotangent: str, input_name: str) -> str:
    """``gradient_name("dout", "q") == "grad_dout.q"``: the output holding ``input_name``'s gradient for that
    cotangent alone."""
    return f"{GRADIENT_PARTS[cotangent]}.{input_name}"


def is_gradient(output: str) -> bool:
    """Whether an output name (``grad_dout.q``, ``grad_dlse.k``) is a gradient part."""
    return output.split(".", 1)[0] in GRADIENT_PARTS.values()


class SuiteError(ValueError):
    """A conformance suite that cannot be trusted: unreadable, altered, or not of this format.

    The message names the file or case and the problem, on one line, with
    control characters escaped and at most :data:`MAX_MESSAGE_CHARS` long
    (it may quote text from the suite).
    """

    def __init__(self, message: str):
        super().__init__(printable(" ".join(str(message).split()), limit=MAX_MESSAGE_CHARS))


# --- building -----------------------------------------------------------------


def _refattn_version() -> str:
    # Imported when called, not at module import: refattn/__init__.py may one
    # day import this package before it has set __version__.
    from .. import __version__

    return __version__


def case_entry(case, *, params: dict, shapes: dict, file: str, sha256: str, size_bytes: int, tolerances: dict) -> dict:
    """The manifest entry of one exported :class:`~refattn.conformance.case.Case`, whose ``params`` are spelled out
    (:func:`refattn.conformance.export.explicit_params`)."""
    return {
        "id": case.id,
        "mechanism": case.mechanism,
        "preset": case.preset,
        "description": case.description,
        "flags": list(case.flags),
        "params": params,
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "tensors": sorted(shapes),
        "file": file,
        "sha256": sha256,
        "size_bytes": size_bytes,
        "tolerances": tolerances,
    }


def build(entries: list[dict]) -> dict:
    """The manifest of a suite made of ``entries``, describing exactly the flags they use."""
    used = {flag for entry in entries for flag in entry["flags"]}
    return {
        "format_version": FORMAT_VERSION,
        "refattn_version": _refattn_version(),
        "flags": describe(used),
        "cases": entries,
    }


def dumps(manifest: dict) -> str:
    """Deterministic JSON text: sorted keys, indent 1, ASCII, shortest float repr, trailing newline."""
    return json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False) + "\n"


# --- reading ------------------------------------------------------------------


def _reject_constant(name: str):
    raise SuiteError(f"{MANIFEST_NAME}: {name} is not JSON")


def _bounded_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise SuiteError(f"{MANIFEST_NAME}: number {text[:40]} is beyond the float64 range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 20 or abs(int(text)) > MAX_JSON_INTEGER:
        raise SuiteError(f"{MANIFEST_NAME}: integer {text[:40]}{'...' if len(text) > 40 else ''} does not fit in 64 bits")
    return int(text)


def _unique_keys(pairs: list) -> dict:
    keys = Counter(key for key, _ in pairs)
    repeated = sorted(key for key, count in keys.items() if count > 1)
    if repeated:
        raise SuiteError(f"{MANIFEST_NAME}: key {repeated[0]!r} appears twice in one object")
    return dict(pairs)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than :data:`MAX_JSON_DEPTH` before parsing (a parser recurses per level)."""
    depth = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise SuiteError(f"{MANIFEST_NAME}: nested deeper than {MAX_JSON_DEPTH} levels")


def loads(data: bytes) -> dict:
    """Parse manifest bytes strictly: UTF-8 JSON, no NaN/Infinity, no repeated keys, an object at the top.

    Nesting is bounded by :data:`MAX_JSON_DEPTH`, integers by 64 bits and
    floats by the float64 range (``1e999`` is refused, not read as infinity).
    """
    try:
        text = data.decode("utf-8")
        _check_depth(text)
        manifest = json.loads(
            text, parse_constant=_reject_constant, parse_float=_bounded_float, parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )  # fmt: skip
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SuiteError(f"{MANIFEST_NAME} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise SuiteError(f"{MANIFEST_NAME}: expected a JSON object at the top, found {type(manifest).__name__}")
    return manifest


def read_bytes(folder: Path) -> bytes:
    """The bytes of ``folder/manifest.json``, after checking that it is a file of bounded size."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise SuiteError(f"{folder}: no {MANIFEST_NAME} (is it a conformance suite folder?)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SuiteError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    with path.open("rb") as file:
        data = file.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise SuiteError(f"{path}: grew beyond {MAX_MANIFEST_BYTES} bytes while being read")
    return data


def read(folder: Path) -> dict:
    """Read and validate ``folder/manifest.json``; raise :class:`SuiteError` on any problem."""
    manifest = loads(read_bytes(folder))
    validate(manifest)
    return manifest


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _location(manifest: dict, path) -> str:
    """``cases[3].tolerances.out`` (and the case id, when the path is inside a case)."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")
    cases = manifest.get("cases")
    if len(path) >= 2 and path[0] == "cases" and isinstance(cases, list) and isinstance(cases[path[1]], dict):
        case_id = cases[path[1]].get("id")
        if isinstance(case_id, str):
            return f"{text or '(top)'} (case {case_id})"
    return text or "(top)"


def validate(manifest: dict) -> None:
    """Check the format version, the JSON Schema, then what the schema cannot say.

    Raises
    ------
    SuiteError
        For the first problem found, naming where it is.
    """
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise SuiteError(
            f"{MANIFEST_NAME}: format_version {version!r} is not supported; this refattn {_refattn_version()} reads "
            f"format_version {FORMAT_VERSION} (export the suite again, or use the refattn that wrote it)"
        )
    error = jsonschema.exceptions.best_match(_validator().iter_errors(manifest))
    if error is not None:
        where = _location(manifest, list(error.absolute_path))
        raise SuiteError(f"{MANIFEST_NAME}: schema violation at {where}: {error.message}")
    _check_consistency(manifest)


def _check_consistency(manifest: dict) -> None:
    """Cross-field rules: some cases, unique ids and files, a bounded total size, and per case
    :func:`_case_problem`."""
    if not manifest["cases"]:
        raise SuiteError(f"{MANIFEST_NAME} lists no cases: an empty suite checks nothing")
    for field in ("id", "file"):
        counts = Counter(case[field] for case in manifest["cases"])
        repeated = sorted(value for value, count in counts.items() if count > 1)
        if repeated:
            raise SuiteError(f"{MANIFEST_NAME}: {field} {repeated[0]!r} is listed more than once")
    total = sum(case["size_bytes"] for case in manifest["cases"])
    if total > MAX_SUITE_BYTES:
        raise SuiteError(f"{MANIFEST_NAME}: its files add up to {total} bytes, more than a suite may ({MAX_SUITE_BYTES})")
    for case in manifest["cases"]:
        problem = _case_problem(case, manifest["flags"])
        if problem:
            raise SuiteError(f"{MANIFEST_NAME}: case {case['id']}: {problem}")


def _case_problem(case: dict, flags: dict) -> str | None:
    if case["id"].split("/")[0] != case["mechanism"]:
        return f"id does not start with its mechanism {case['mechanism']!r}"
    undescribed = [flag for flag in case["flags"] if flag not in flags]
    if undescribed:
        return f"flag {undescribed[0]} is not described in the manifest's flags"
    if sorted(case["tensors"]) != sorted(case["shapes"]):
        return f"tensors {sorted(case['tensors'])} and the names in shapes {sorted(case['shapes'])} differ"
    outputs = sorted(output_names(case["tensors"]))
    if outputs != sorted(case["tolerances"]):
        return f"tolerances are given for {sorted(case['tolerances'])} but the outputs are {outputs}"
    return _comparison_problem(case) or _precision_problem(case)


def _comparison_problem(case: dict) -> str | None:
    """A case must compare ``out``, and gradients and cotangents must come together, shaped alike:
    each cotangent with one gradient part per input, and each gradient part with its cotangent."""
    shapes = case["shapes"]
    if "expected.out" not in shapes:
        return "has no expected.out: a case must compare the output"
    pairs = [("cotangent.dout", "expected.out"), ("cotangent.dlse", "expected.lse")]
    inputs = [name[len("input."):] for name in shapes if name.startswith("input.")]
    grads = {
        cotangent: [name.split(".", 2)[2] for name in shapes if name.startswith(f"{EXPECTED_PREFIX}{part}.")]
        for cotangent, part in GRADIENT_PARTS.items()
    }
    for cotangent, named in grads.items():
        if named and f"cotangent.{cotangent}" not in shapes:
            return f"has gradients for {cotangent} alone but no cotangent.{cotangent}"
        if f"cotangent.{cotangent}" in shapes:
            pairs += [(f"input.{name}", f"expected.{gradient_name(cotangent, name)}") for name in sorted(set(inputs) | set(named))]
    if "cotangent.dlse" in shapes and "cotangent.dout" not in shapes:
        return "has cotangent.dlse but no cotangent.dout"
    for have, need in pairs:
        if have in shapes and need not in shapes:
            return f"has {have} but no {need}"
        if have in shapes and shapes[have] != shapes[need]:
            return f"{have} has shape {shapes[have]} but {need} has {shapes[need]}"
    return None


def _precision_problem(case: dict) -> str | None:
    """Every output has a budget at the same precisions (those the case offers)."""
    offered = {output: sorted(row) for output, row in case["tolerances"].items()}
    widest = max(offered.values(), key=len)
    for output, precisions in sorted(offered.items()):
        if precisions != widest:
            missing = sorted(set(widest) - set(precisions))
            return f"output {output} has no budget for {', '.join(missing)} (the case offers {', '.join(widest)})"
    return None


def output_names(tensors) -> list[str]:
    """Names of the checked outputs among tensor names: ``expected.out`` -> ``out``; ``aux.*`` as they are."""
    names = [name[len(EXPECTED_PREFIX):] for name in tensors if name.startswith(EXPECTED_PREFIX)]
    return names + [name for name in tensors if name.startswith(AUX_PREFIX)]


def precisions(case: dict) -> list[str]:
    """The precisions a (validated) case offers budgets for."""
    return sorted(next(iter(case["tolerances"].values())))
