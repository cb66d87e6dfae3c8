"""Loading a conformance suite, safely, from a folder anyone may have handed you.

:func:`load_suite` trusts nothing it reads. Before any tensor is parsed it

1. parses ``manifest.json`` strictly (JSON only, no repeated keys), checks
   its ``format_version`` and validates it against ``schema.json`` and the
   cross-field rules of :mod:`refattn.conformance.manifest`;
2. confines every case's file to the suite folder: relative POSIX paths
   only, no ``..`` component, and the resolved path (symlinks followed) must
   lie inside the folder;
3. checks the file's size, then its SHA-256, against the manifest.

Only then are the bytes parsed, by ``safetensors`` (a JSON header and raw
little-endian data: no pickle, no code), and the tensors' names, shapes and
dtypes checked against the manifest. Every problem raises
:class:`SuiteError` naming the case and what is wrong.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from . import manifest as manifest_module
from .manifest import SuiteError

__all__ = ["SuiteError", "LoadedCase", "Suite", "load_suite", "require_one_mechanism"]

#: Tensor name prefixes whose tensors must be float64.
FLOAT64_PREFIXES = ("input.", "cotangent.", "expected.")


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
        Integer (or other) intermediates, from ``aux.<name>``, sorted by name (the order
        the verifier checks them in); must match exactly.
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


@dataclass(frozen=True)
class Suite:
    """A loaded suite: its folder, its (validated) manifest and its cases."""

    folder: Path
    manifest: dict = field(repr=False)
    cases: list[LoadedCase] = field(repr=False)

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
        return Suite(self.folder, self.manifest, chosen)


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


def _names(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _require_known(kind: str, given, known: set) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise SuiteError(f"no case with {kind} {unknown[0]!r}; the selection has {sorted(known)}")


def load_suite(folder) -> Suite:
    """Load and verify every case of the suite in ``folder``.

    Parameters
    ----------
    folder : str or path
        A folder with ``manifest.json`` and the files it lists
        (``conformance/`` in the repository, or ``refattn export --out``).

    Returns
    -------
    Suite

    Raises
    ------
    SuiteError
        On the first problem: missing or invalid manifest, wrong format
        version, schema violation, a file path outside the folder, a missing,
        truncated or altered file, or tensors other than the manifest lists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SuiteError(f"{folder}: not a folder")
    root = folder.resolve(strict=True)
    manifest = manifest_module.read(root)
    cases = [_load_case(root, entry) for entry in manifest["cases"]]
    return Suite(folder, manifest, cases)


def _load_case(root: Path, entry: dict) -> LoadedCase:
    where = f"case {entry['id']}"
    path = _confined_path(root, entry["file"], where)
    data = _checked_bytes(path, entry, where)
    tensors = _parse(data, entry, where)
    parts = {prefix: {} for prefix in ("input", "param", "cotangent", "expected", "aux")}
    for name in entry["tensors"]:  # the manifest's order (sorted), not the file's: stage reports are deterministic
        prefix, rest = name.split(".", 1)
        parts[prefix][rest] = tensors[name]
    return LoadedCase(
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
    """The file's bytes, after checking its size and SHA-256 against the manifest."""
    expected_size = entry["size_bytes"]
    size = path.stat().st_size
    if size != expected_size:
        raise SuiteError(
            f"{where}: file {entry['file']} has {size} bytes, the manifest says {expected_size} (truncated or altered)"
        )
    data = path.read_bytes()
    if len(data) != expected_size:
        raise SuiteError(f"{where}: file {entry['file']} changed size while being read")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise SuiteError(
            f"{where}: file {entry['file']} has SHA-256 {digest}, the manifest says {entry['sha256']} (altered)"
        )
    return data


def _parse(data: bytes, entry: dict, where: str) -> dict[str, np.ndarray]:
    """Parse verified safetensors bytes; check names, shapes and dtypes against the manifest."""
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
        shape = entry["shapes"][name]
        if list(array.shape) != shape:
            raise SuiteError(f"{where}: tensor {name} has shape {list(array.shape)}, the manifest says {shape}")
        if name.startswith(FLOAT64_PREFIXES) and array.dtype != np.float64:
            kind = name.split(".")[0]
            raise SuiteError(f"{where}: tensor {name} has dtype {array.dtype}; {kind} tensors are float64")
        if array.dtype.kind not in "biuf":
            raise SuiteError(f"{where}: tensor {name} has dtype {array.dtype}; expected bool, integer or float")
        array.setflags(write=False)
    return tensors
