"""Loading a conformance suite, safely, from a folder anyone may have handed you.

:func:`load_suite` trusts nothing it reads. Before any tensor is parsed it

1. parses ``manifest.json`` strictly (JSON only, no repeated keys, bounded
   size, nesting and numbers), checks its ``format_version`` and validates it
   against ``schema.json`` and the cross-field rules of
   :mod:`refattn.conformance.manifest` (some cases; each compares ``out``;
   gradients with their cotangents; a budget for every precision offered);
2. confines every case's file to the suite folder: relative POSIX paths
   only, no ``..`` component, and the resolved path (symlinks followed) must
   lie inside the folder;
3. checks the file's size (at most 1 GiB), then its SHA-256, read in chunks,
   against the manifest.

Only then are the bytes parsed, by ``safetensors`` (a JSON header and raw
little-endian data: no pickle, no code), and the tensors checked: names,
shapes and dtypes as the manifest says, masks stored as bool, inputs and
expected values finite (``-inf`` only in a log-sum-exp), the inputs accepted
by the mechanism's ``check_inputs`` with ``out`` and ``lse`` of the shapes
its contract gives, and every budget within what the tolerance policy can
produce (:func:`refattn.conformance.tolerance.ceiling`). Every problem
raises :class:`SuiteError`, one line naming the case and what is wrong.

The suite's :class:`~refattn.conformance.trust.Origin` (official or custom)
comes from the hash of its manifest (:mod:`refattn.conformance.trust`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from ..core import registry
from ..core.errors import SpecError
from . import manifest as manifest_module
from . import tolerance, trust
from .manifest import SuiteError

__all__ = ["SuiteError", "LoadedCase", "Suite", "load_suite", "mechanisms_named", "require_one_mechanism"]

#: Tensor name prefixes whose tensors must be float64.
FLOAT64_PREFIXES = ("input.", "cotangent.", "expected.")
#: Tensors whose values must all be finite (expected values may hold -inf in ``lse`` only).
FINITE_PREFIXES = ("input.", "param.", "cotangent.")
#: Array parameters whose names contain one of these are masks: stored as bool.
MASK_WORDS = ("mask", "keep")
#: Files are hashed in pieces of this many bytes.
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class LoadedCase:
    """One case of a suite, with its tensors loaded (read-only arrays).

    Attributes
    ----------
    id, mechanism, preset, description : str (preset may be None)
    flags : tuple of str
    params : dict
        JSON keyword arguments of the mechanism (``causal``, ``window``...).
    inputs : dict[str, ndarray]
        Differentiable arrays, from ``input.<name>`` (``q``, ``k``, ``v``, ``bias``).
    array_params : dict[str, ndarray]
        Non-differentiable arrays, from ``param.<name>`` (``mask``, ``dropout_keep``).
    cotangents : dict[str, ndarray]
        ``dout`` and ``dlse`` (absent for forward-only cases).
    expected : dict[str, ndarray]
        ``out``, ``lse``, ``grad.q``... from ``expected.<name>``.
    aux : dict[str, ndarray]
        Intermediates, from ``aux.<name>``, sorted by name (the order the verifier
        checks them in): integer and boolean ones must match exactly, floating-point
        ones (routing's ``slot_lse``) are compared within their budget like ``out``.
    tolerances : dict[str, dict[str, float]]
        Output name (``out``, ``grad.q``, ``aux.<name>``) -> precision -> budget
        on :func:`refattn.conformance.tolerance.normwise_error`.
    """

    id: str
    mechanism: str
    preset: str | None
    description: str
    flags: tuple[str, ...]
    params: dict
    inputs: dict = field(repr=False)
    array_params: dict = field(repr=False)
    cotangents: dict = field(repr=False)
    expected: dict = field(repr=False)
    aux: dict = field(repr=False)
    tolerances: dict = field(repr=False)

    def arguments(self) -> dict:
        """Every argument of the forward call: inputs, array parameters and JSON parameters."""
        return {**self.inputs, **self.array_params, **self.params}

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this case has budgets for (every output has the same ones)."""
        return tuple(sorted(next(iter(self.tolerances.values()))))


@dataclass(frozen=True)
class Suite:
    """A loaded suite: its folder, its (validated) manifest, its cases and its origin (official or custom)."""

    folder: Path
    manifest: dict = field(repr=False)
    cases: list[LoadedCase] = field(repr=False)
    origin: trust.Origin

    def select(self, mechanisms=None, ids=None, flags=None) -> Suite:
        """The cases matching every filter given (the manifest is kept whole).

        Parameters
        ----------
        mechanisms : str or iterable of str, optional
            Keep cases of these mechanisms.
        ids : str or iterable of str, optional
            Keep cases whose id matches one of these (exact ids, or
            ``fnmatch`` patterns such as ``"dense/causal*"``).
        flags : str or iterable of str, optional
            Keep cases carrying at least one of these flags.

        Raises
        ------
        SuiteError
            If a mechanism, id or flag given matches no case of the suite, so
            that a typo never selects nothing and passes vacuously.
        """
        chosen = self.cases
        if mechanisms is not None:
            mechanisms = _names(mechanisms)
            _require_known("mechanism", mechanisms, {case.mechanism for case in chosen})
            chosen = [case for case in chosen if case.mechanism in mechanisms]
        if ids is not None:
            ids = _names(ids)
            for pattern in ids:
                if not any(fnmatch.fnmatchcase(case.id, pattern) for case in chosen):
                    raise SuiteError(f"no case id matches {pattern!r}")
            chosen = [case for case in chosen if any(fnmatch.fnmatchcase(case.id, p) for p in ids)]
        if flags is not None:
            flags = _names(flags)
            _require_known("flag", flags, {flag for case in chosen for flag in case.flags})
            chosen = [case for case in chosen if set(case.flags) & set(flags)]
        return Suite(self.folder, self.manifest, chosen, self.origin)


def require_one_mechanism(cases, mechanisms) -> None:
    """Refuse a selection that mixes mechanisms when the caller named none.

    An implementation computes one mechanism; run on another's cases it
    fails every one of them with an unexpected keyword, which says nothing
    useful. Naming several mechanisms explicitly is allowed.

    Raises
    ------
    SuiteError
        If ``mechanisms`` is None and ``cases`` belong to more than one mechanism.
    """
    found = sorted({case.mechanism for case in cases})
    if mechanisms is None and len(found) > 1:
        raise SuiteError(
            f"the selection has cases of {len(found)} mechanisms {found}; an implementation computes one: "
            "name it with mechanism= (--mechanism, --refattn-mechanism)"
        )


def mechanisms_named(ids) -> tuple[str, ...] | None:
    """The mechanisms that case ids (or patterns) name by their literal prefix, or None if one has none.

    ``["dense/causal*", "alibi/basic"]`` -> ``("alibi", "dense")``: enough to
    load only those mechanisms' cases (:func:`load_suite`).
    """
    if ids is None:
        return None
    prefixes = {pattern.split("/", 1)[0] for pattern in _names(ids)}
    if any("/" not in pattern for pattern in _names(ids)) or any(set(p) & set("*?[") for p in prefixes):
        return None
    return tuple(sorted(prefixes))


def _names(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _require_known(kind: str, given, known: set) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise SuiteError(f"no case with {kind} {unknown[0]!r}; the selection has {sorted(known)}")


def load_suite(folder, mechanisms=None) -> Suite:
    """Load and verify every case of the suite in ``folder`` (or of the mechanisms named).

    Parameters
    ----------
    folder : str or path
        A folder with ``manifest.json`` and the files it lists
        (``conformance/`` in the repository, or ``refattn export --out``).
    mechanisms : str or iterable of str, optional
        Load only these mechanisms' cases (the manifest is validated whole;
        other cases' files are not read). A name with no case is an error.

    Returns
    -------
    Suite

    Raises
    ------
    SuiteError
        On the first problem: missing or invalid manifest, wrong format
        version, schema violation, a file path outside the folder, a missing,
        truncated or altered file, tensors other than the manifest lists or
        than the mechanism's contract allows, non-finite values, a budget
        the tolerance policy cannot produce.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SuiteError(f"{folder}: not a folder")
    root = folder.resolve(strict=True)
    data = manifest_module.read_bytes(root)
    manifest = manifest_module.loads(data)
    manifest_module.validate(manifest)
    entries = manifest["cases"]
    if mechanisms is not None:
        mechanisms = _names(mechanisms)
        _require_known("mechanism", mechanisms, {entry["mechanism"] for entry in entries})
        entries = [entry for entry in entries if entry["mechanism"] in mechanisms]
    cases = [_load_case(root, entry) for entry in entries]
    return Suite(folder, manifest, cases, trust.origin(data))


def _load_case(root: Path, entry: dict) -> LoadedCase:
    where = f"case {entry['id']}"
    path = _confined_path(root, entry["file"], where)
    data = _checked_bytes(path, entry, where)
    tensors = _parse(data, entry, where)
    parts = {prefix: {} for prefix in ("input", "param", "cotangent", "expected", "aux")}
    for name in entry["tensors"]:  # the manifest's order (sorted), not the file's: stage reports are deterministic
        prefix, rest = name.split(".", 1)
        parts[prefix][rest] = tensors[name]
    case = LoadedCase(
        id=entry["id"],
        mechanism=entry["mechanism"],
        preset=entry["preset"],
        description=entry["description"],
        flags=tuple(entry["flags"]),
        params=entry["params"],
        inputs=parts["input"],
        array_params=parts["param"],
        cotangents=parts["cotangent"],
        expected=parts["expected"],
        aux=parts["aux"],
        tolerances=entry["tolerances"],
    )
    _check_contract(case, where)
    _check_budgets(case, where)
    return case


def _confined_path(root: Path, file: str, where: str) -> Path:
    """``root / file`` after checking that it names a regular file inside ``root``."""
    if "\\" in file or ":" in file:
        raise SuiteError(f"{where}: file {file!r} is not a relative POSIX path (no '\\' or ':')")
    relative = PurePosixPath(file)
    if relative.is_absolute():
        raise SuiteError(f"{where}: file {file!r} is an absolute path; files must be relative to the suite folder")
    if ".." in relative.parts:
        raise SuiteError(f"{where}: file {file!r} has a '..' component; files must stay inside the suite folder")
    candidate = root.joinpath(*relative.parts)
    if not candidate.exists():
        raise SuiteError(f"{where}: file {file} is missing from {root}")
    resolved = candidate.resolve(strict=True)
    if not resolved.is_relative_to(root):
        raise SuiteError(f"{where}: file {file} resolves to {resolved}, outside the suite folder {root} (a symlink?)")
    if not resolved.is_file():
        raise SuiteError(f"{where}: file {file} is not a regular file")
    return resolved


def _checked_bytes(path: Path, entry: dict, where: str) -> bytes:
    """The file's bytes, after checking its size and SHA-256 (hashed in chunks) against the manifest.

    The manifest's size is at most ``MAX_CASE_BYTES`` (the schema says so), and
    no more than that size is ever read.
    """
    expected_size = entry["size_bytes"]
    size = path.stat().st_size
    if size != expected_size:
        raise SuiteError(
            f"{where}: file {entry['file']} has {size} bytes, the manifest says {expected_size} (truncated or altered)"
        )
    digest = hashlib.sha256()
    data = bytearray()
    with path.open("rb") as file:
        while chunk := file.read(min(HASH_CHUNK_BYTES, expected_size + 1 - len(data))):
            digest.update(chunk)
            data += chunk
            if len(data) > expected_size:
                break
    if len(data) != expected_size:
        raise SuiteError(f"{where}: file {entry['file']} changed size while being read")
    if digest.hexdigest() != entry["sha256"]:
        raise SuiteError(
            f"{where}: file {entry['file']} has SHA-256 {digest.hexdigest()}, the manifest says {entry['sha256']} (altered)"
        )
    return bytes(data)


def _parse(data: bytes, entry: dict, where: str) -> dict[str, np.ndarray]:
    """Parse verified safetensors bytes; check every tensor against the manifest (:func:`_tensor_problem`)."""
    try:
        tensors = safetensors.numpy.load(data)
    except (SafetensorError, ValueError, TypeError) as error:
        raise SuiteError(f"{where}: file {entry['file']} is not a readable safetensors file: {error}") from None
    missing = sorted(set(entry["tensors"]) - set(tensors))
    extra = sorted(set(tensors) - set(entry["tensors"]))
    if missing or extra:
        problems = [f"lacks tensors {missing}"] if missing else []
        problems += [f"has unlisted tensors {extra}"] if extra else []
        raise SuiteError(f"{where}: file {entry['file']} {' and '.join(problems)}")
    for name, array in tensors.items():
        problem = _tensor_problem(name, array, entry["shapes"][name])
        if problem:
            raise SuiteError(f"{where}: tensor {name} {problem}")
        array.setflags(write=False)
    return tensors


def _tensor_problem(name: str, array: np.ndarray, shape: list) -> str | None:
    """What is wrong with one tensor: shape, dtype (float64, bool masks), non-finite values."""
    kind = name.split(".")[0]
    if list(array.shape) != shape:
        return f"has shape {list(array.shape)}, the manifest says {shape}"
    if name.startswith(FLOAT64_PREFIXES) and array.dtype != np.float64:
        return f"has dtype {array.dtype}; {kind} tensors are float64"
    if array.dtype.kind not in "biuf":
        return f"has dtype {array.dtype}; expected bool, integer or float"
    if kind == "param" and any(word in name for word in MASK_WORDS) and array.dtype != np.bool_:
        return f"has dtype {array.dtype}; masks are stored as bool (True = may attend, or kept)"
    if array.dtype.kind != "f":
        return None
    if name.startswith(FINITE_PREFIXES) and not np.all(np.isfinite(array)):
        return f"has {_non_finite(array)}; {kind} values must be finite"
    may_be_empty_row = kind in ("expected", "aux") and tolerance.is_log_sum_exp(name)  # -inf: a row with no key
    checked = np.where(np.isneginf(array), 0.0, array) if may_be_empty_row else array
    if not np.all(np.isfinite(checked)):
        return f"has {_non_finite(checked)}; expected values are finite (-inf only in a log-sum-exp)"
    return None


def _non_finite(array: np.ndarray) -> str:
    """``"nan at index (0, 1, 2, 3)"``: the first non-finite value and where it is."""
    index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
    return f"{array[index]} at index {index}"


def json_argument(value):
    """A JSON parameter as the public functions take it: lists become tuples, all the way down, and objects
    fresh dicts, so that nothing an implementation edits in place reaches a later case."""
    if isinstance(value, dict):
        return {key: json_argument(item) for key, item in value.items()}
    return tuple(json_argument(item) for item in value) if isinstance(value, list) else value


def _check_contract(case: LoadedCase, where: str) -> None:
    """The case's arguments pass its mechanism's ``check_inputs``, and ``out``/``lse`` have the shapes it gives."""
    if case.mechanism not in registry.names():
        raise SuiteError(f"{where}: mechanism {case.mechanism!r} is not one this refattn knows ({registry.names()})")
    mechanism = registry.get(case.mechanism)
    arguments = {**case.inputs, **case.array_params, **{n: json_argument(x) for n, x in case.params.items()}}
    try:
        bound = inspect.signature(mechanism.forward).bind(**arguments)
        bound.apply_defaults()
        own = {name: value for name, value in bound.arguments.items() if name not in registry.DISPATCH_ARGUMENTS}
        shapes = mechanism.check_inputs(**own).cotangent_shapes()
    except (SpecError, TypeError) as error:
        raise SuiteError(f"{where}: its arguments are not valid {case.mechanism} arguments: {error}") from None
    want = {"out": shapes["dout"], "lse": shapes.get("dlse")}
    for output, shape in want.items():
        got = case.expected.get(output)
        if shape is None and got is not None:
            raise SuiteError(f"{where}: has expected.{output}, which {case.mechanism} does not define")
        if shape is not None and got is None:
            raise SuiteError(f"{where}: has no expected.{output}; {case.mechanism} defines it (shape {list(shape)})")
        if shape is not None and got.shape != tuple(shape):
            raise SuiteError(f"{where}: expected.{output} has shape {list(got.shape)}; {case.mechanism} gives {list(shape)}")


def _check_budgets(case: LoadedCase, where: str) -> None:
    """Every budget is at most what the tolerance policy can produce for it (:func:`tolerance.ceiling`)."""
    log_sum_exps = [case.expected.get("lse")] + [x for name, x in case.aux.items() if tolerance.is_log_sum_exp(name)]
    scale = max((tolerance.logit_scale(lse) for lse in log_sum_exps if lse is not None), default=0.0)
    for output, row in case.tolerances.items():
        for precision, budget in row.items():
            most = tolerance.ceiling(output, precision, scale, exact=_is_exact(case, output))
            if not budget <= most:
                raise SuiteError(
                    f"{where}: budget {budget!r} for {output} in {precision} is above {most:.3g}, the most the "
                    "tolerance policy gives this case (raised budgets let wrong results pass)"
                )


def _is_exact(case: LoadedCase, output: str) -> bool:
    """Whether ``output`` must match exactly: an integer or boolean intermediate."""
    return output.startswith("aux.") and case.aux[output[len("aux."):]].dtype.kind in "biu"
