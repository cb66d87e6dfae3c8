"""Export the conformance vectors, and check that an exported suite is current.

For every registered mechanism (found through ``refattn.core.registry``,
never imported by name) and every case of its ``cases()``:

1. ``rng = numpy.random.default_rng(case.seed)``; ``arrays = case.arrays(rng)``;
   then, from the same ``rng``, standard-normal cotangents ``dout`` (shape of
   ``out``) and ``dlse`` (shape of ``lse``);
2. the float64 forward and its VJP give the expected values;
3. the same forward and VJP evaluated with ``precision=`` float32, float16
   and bfloat16, plainly and with randomised rounding (seeded by the case;
   a tie case's trials keep its ties instead), give the reference's own
   error in each precision, from which
   :mod:`refattn.conformance.tolerance` sets the budgets;
4. the tensors are written to ``<out>/<mechanism>/<name>.safetensors`` and
   the case is listed in ``<out>/manifest.json``.

With ``large=True`` the long-sequence cases of ``<package>.cases.large_cases()``
are added. They are forward only and computed with the Numba kernel
(``backend="numba"``): the reference's (B, H, Nq, Nk) intermediates do not
fit in memory at 65536 tokens, and neither does its evaluation at lower
precision, so large cases carry a float64 budget only. They are not
committed: export them to another folder.

The output is a pure function of the code: the same refattn on the same
machine writes byte-identical files (safetensors orders its header by dtype
and name; the manifest has sorted keys, no timestamps, shortest float repr).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import tempfile
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from ..core import registry
from ..core.precision import jittered
from ..core.presets import FROM_PRESET
from ..core.registry import Mechanism
from . import manifest as manifest_module
from . import tolerance
from .case import Case
from .manifest import MANIFEST_NAME, SuiteError
from .progress import progress_bar
from .suite import load_suite

#: Backend computing the large cases.
LARGE_BACKEND = "numba"
#: ``check`` accepts expected values that differ from a fresh export by at most
#: this normwise error: float64 results may differ in the last bits between
#: machines (vectorised ``exp`` and ``log`` differ by CPU), which is not drift.
REEXPORT_RTOL = 1e-12
#: ``check`` accepts budgets within this relative difference (0.75: within a factor of 4),
#: for the same reason (a last-bit change can move lower-precision roundings, and so the error).
REEXPORT_BUDGET_RTOL = 0.75


def export(out_dir, mechanisms=None, large=False, progress=False) -> dict:
    """Write the conformance suite to ``out_dir`` and return its manifest.

    Parameters
    ----------
    out_dir : str or path
        Suite folder; created if needed. Existing case files of the exported
        mechanisms that are no longer cases are removed; nothing else is.
    mechanisms : iterable of str, optional
        Registry names to export; default every registered mechanism.
    large : bool
        Also export each mechanism's ``large_cases()`` (long sequences,
        forward only, float64 budgets only; tens of MB each).
    progress : bool or None
        Draw a progress bar on stderr once the export takes longer than a
        second; ``None`` draws it when stderr is a terminal.

    Returns
    -------
    dict
        The manifest, as written to ``out_dir/manifest.json``.
    """
    out_dir = Path(out_dir)
    plan = _plan(_mechanisms(mechanisms), large)
    entries = []
    for mechanism, case, is_large in progress_bar(plan, "export", enabled=progress, label=lambda item: item[1].id):
        entries.append(_export_case(out_dir, mechanism, case, is_large))
    _remove_stale(out_dir, {mechanism.name for mechanism, _, _ in plan}, {entry["file"] for entry in entries})
    manifest = manifest_module.build(entries)
    manifest_module.validate(manifest)
    _write_if_changed(out_dir / MANIFEST_NAME, manifest_module.dumps(manifest).encode("ascii"))
    return manifest


def check(folder, mechanisms=None, large=False, progress=False) -> list[str]:
    """Differences between the suite in ``folder`` and what :func:`export` would write there now.

    The folder is first loaded with :func:`~refattn.conformance.suite.load_suite`
    (so an altered or inconsistent suite is reported), then compared with a
    fresh export in a temporary folder. Files that are byte-identical agree.
    Files that differ agree when they differ only as floating point may between
    machines: integer and boolean tensors bitwise equal, floating-point
    tensors within :data:`REEXPORT_RTOL` (normwise), the manifest equal except
    checksums, sizes and budgets within :data:`REEXPORT_BUDGET_RTOL`.

    Why not bitwise: BLAS and LAPACK pick their kernels by CPU (OpenBLAS's
    DYNAMIC_ARCH), and NumPy's exp and sums have CPU-specific SIMD loops. So
    float64 inputs that a case builds with a QR factorisation (routing's
    designed problems) differ in their last bits between an Intel and an AMD
    machine, and the lower-precision evaluations that set the budgets round
    differently: budgets were seen to differ by up to 2.4x between two such
    machines (routing_hybrid/google, differential/decode_single_query).
    A budget is a bound on rounding error, not a value, so ``check`` accepts
    one within a factor of 4 of a fresh export's; what it must catch (a
    changed function, case or policy) moves values far more than that.

    Parameters
    ----------
    folder : str or path
        The suite folder to check (``conformance`` in the repository).
    mechanisms, large
        As for :func:`export`; pass what the folder was exported with. With
        ``mechanisms``, only their cases (and the flags they use) are compared.
    progress : bool or None
        As for :func:`export`.

    Returns
    -------
    list of str
        One message per drift, empty when the folder is current.
    """
    folder = Path(folder)
    try:
        load_suite(folder, mechanisms)
    except SuiteError as error:
        return [f"{folder} does not load: {error}"]
    with tempfile.TemporaryDirectory() as fresh:
        export(fresh, mechanisms=mechanisms, large=large, progress=progress)
        chosen = None if mechanisms is None else {mechanism.name for mechanism in _mechanisms(mechanisms)}
        return _differences(Path(fresh), folder, chosen)


# --- planning -----------------------------------------------------------------


def _mechanisms(names) -> list[Mechanism]:
    if isinstance(names, str):
        names = [names]
    return [registry.get(name) for name in (registry.names() if names is None else names)]


def large_cases(mechanism: Mechanism) -> list[Case]:
    """``large_cases()`` of the mechanism's ``cases`` module, or [] when it has none."""
    module_name = f"{mechanism.package}.cases"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return []
    return list(getattr(module, "large_cases", list)())


def _plan(mechanisms: list[Mechanism], large: bool) -> list[tuple[Mechanism, Case, bool]]:
    """(mechanism, case, is_large) for every case to export, checked for well-formed ids."""
    plan = []
    for mechanism in mechanisms:
        plan += [(mechanism, case, False) for case in mechanism.cases()]
        if large:
            plan += [(mechanism, case, True) for case in large_cases(mechanism)]
    seen = set()
    for mechanism, case, _ in plan:
        prefix, _, name = case.id.partition("/")
        if case.mechanism != mechanism.name or prefix != mechanism.name or not name:
            raise ValueError(f"case {case.id!r} of mechanism {mechanism.name!r}: ids are '{mechanism.name}/<name>'")
        if case.id in seen:
            raise ValueError(f"case id {case.id!r} is defined twice")
        seen.add(case.id)
    return plan


# --- computing one case -------------------------------------------------------


def compute_case(mechanism: Mechanism, case: Case, large: bool = False) -> tuple[dict, dict]:
    """The tensors of one case and the budgets of its outputs.

    Returns
    -------
    tensors : dict[str, ndarray]
        ``input.*``, ``param.*``, ``cotangent.*``, ``expected.*``, ``aux.*``.
    tolerances : dict[str, dict[str, float]]
        Output name -> precision -> budget.
    """
    rng = np.random.default_rng(case.seed)
    arrays = case.arrays(rng)
    compute = _by_large_backend if large else _by_reference
    expected, cotangents, tolerances = compute(mechanism, case, arrays, rng)
    tensors = {
        (f"input.{name}" if name in case.differentiable else f"param.{name}"): _storable(array)
        for name, array in arrays.items()
    }
    tensors.update({f"cotangent.{name}": value for name, value in cotangents.items()})
    for name, value in expected.items():
        tensors[name if name.startswith("aux.") else f"expected.{name}"] = _storable(value)
    return tensors, tolerances


def _by_large_backend(mechanism: Mechanism, case: Case, arrays: dict, rng) -> tuple[dict, dict, dict]:
    """Forward only, by :data:`LARGE_BACKEND` in float64; float64 budgets only."""
    expected = _outputs(mechanism.forward(**arrays, **case.params, backend=LARGE_BACKEND))
    return expected, {}, {name: tolerance.budgets(name, value, {}) for name, value in expected.items()}


def _by_reference(mechanism: Mechanism, case: Case, arrays: dict, rng) -> tuple[dict, dict, dict]:
    """Expected values, cotangents and budgets at every precision, by the reference."""
    result = mechanism.forward(**arrays, **case.params)
    cotangents = _cotangents(case, result, rng)
    expected = {**_outputs(result), **_grads(mechanism, case, arrays, cotangents, precision=None)}
    at_precision = {p: _evaluations(mechanism, case, arrays, cotangents, p) for p in tolerance.LOWER_PRECISIONS}
    grads = {name: value for name, value in expected.items() if manifest_module.is_gradient(name)}
    arguments = {**arrays, **case.params}
    scales = tolerance.gradient_scales(grads)
    sensitivity = tolerance.sensitivities(mechanism.vjp, arguments, cotangents.get("dout"), result, grads, scales)
    tolerances = {
        name: tolerance.budgets(
            name, value, {p: [o[name] for o in outputs] for p, outputs in at_precision.items()},
            sensitivity.get(name, 0.0), scales.get(name, tolerance.TINY),
        )
        for name, value in expected.items()
    }  # fmt: skip
    return expected, cotangents, tolerances


def _storable(array) -> np.ndarray:
    """Floats as contiguous float64; booleans and integers as they are."""
    array = np.asarray(array)
    if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
        array = array.astype(np.float64)
    return np.ascontiguousarray(array)


def _outputs(result) -> dict[str, np.ndarray]:
    """``out``, ``lse`` (when defined) and ``aux.<name>`` of a forward Result."""
    outputs = {"out": result.out}
    if result.lse is not None:
        outputs["lse"] = result.lse
    outputs.update({f"aux.{name}": value for name, value in result.aux.items()})
    return outputs


def _cotangents(case: Case, result, rng) -> dict[str, np.ndarray]:
    """Standard-normal ``dout`` and ``dlse``, drawn after the arrays; none for forward-only cases."""
    if not case.grad:
        return {}
    cotangents = {"dout": rng.standard_normal(result.out.shape)}
    if result.lse is not None:
        cotangents["dlse"] = rng.standard_normal(result.lse.shape)
    return cotangents


def _grads(mechanism: Mechanism, case: Case, arrays: dict, cotangents: dict, precision) -> dict[str, np.ndarray]:
    """The gradients of every differentiable input at ``precision``, by linearity in two parts.

    ``grad_dout.<input>`` is the VJP for ``dout`` alone and ``grad_dlse.<input>``
    (mechanisms with a log-sum-exp) for ``dlse`` alone; their sum is the VJP
    for both. None for forward-only cases.
    """
    if not case.grad:
        return {}
    dout = cotangents["dout"]
    parts = {"dout": mechanism.vjp(dout, **arrays, **case.params, precision=precision)}
    if "dlse" in cotangents:
        parts["dlse"] = mechanism.vjp(np.zeros_like(dout), **arrays, dlse=cotangents["dlse"], **case.params,
                                      precision=precision)  # fmt: skip
    declared = {name for name in case.differentiable if name in arrays}
    for grads in parts.values():
        if set(grads) != declared:
            raise ValueError(f"case {case.id}: vjp gave gradients {sorted(grads)}; the case declares {sorted(declared)}")
    return {
        manifest_module.gradient_name(part, name): grads[name] for part, grads in parts.items() for name in sorted(grads)
    }


def _evaluations(mechanism: Mechanism, case: Case, arrays: dict, cotangents: dict, precision: str) -> list[dict]:
    """The case's outputs in ``precision``, once per evaluation of :func:`rounding_trials`."""
    return [_evaluate(mechanism, case, *trial) for trial in rounding_trials(case, arrays, cotangents, precision)]


def rounding_trials(case: Case, arrays: dict, cotangents: dict, precision: str) -> list[tuple[dict, dict, object]]:
    """``(arrays, cotangents, numerics)`` of each evaluation that sets the case's budgets in ``precision``.

    The plain evaluation, then :data:`~tolerance.ROUNDING_TRIALS` trials: with
    randomised rounding (seeded by the case), or, for a tie case
    (``case.exact_ties``), plain on the inputs and cotangents moved by
    :func:`~tolerance.tie_preserving_inputs`, which keeps its ties exact.
    """
    plain = (arrays, cotangents, precision)
    if case.exact_ties:
        moved = [tolerance.tie_preserving_inputs({**arrays, **cotangents}, precision, trial)
                 for trial in range(tolerance.ROUNDING_TRIALS)]  # fmt: skip
        return [plain] + [({n: m[n] for n in arrays}, {n: m[n] for n in cotangents}, precision) for m in moved]
    seeds = [case.seed * 1000 + trial for trial in range(tolerance.ROUNDING_TRIALS)]
    return [plain] + [(arrays, cotangents, jittered(precision, seed=seed)) for seed in seeds]


def _evaluate(mechanism: Mechanism, case: Case, arrays: dict, cotangents: dict, precision) -> dict:
    """Every output of the case, evaluated by the reference in ``precision`` (a name or a Numerics)."""
    result = mechanism.forward(**arrays, **case.params, precision=precision)
    return {**_outputs(result), **_grads(mechanism, case, arrays, cotangents, precision)}


def _export_case(out_dir: Path, mechanism: Mechanism, case: Case, large: bool) -> dict:
    """Compute one case, write its file and return its manifest entry."""
    tensors, tolerances = compute_case(mechanism, case, large)
    data = safetensors.numpy.save(tensors)
    file = f"{case.id}.safetensors"
    _write_if_changed(out_dir / file, data)
    arrays = {name.split(".", 1)[1]: tensors[name] for name in tensors if name.startswith(("input.", "param."))}
    return manifest_module.case_entry(
        case,
        params=explicit_params(mechanism, case.params, arrays),
        shapes={name: tensors[name].shape for name in sorted(tensors)},
        file=file,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        tolerances=tolerances,
    )


def explicit_params(mechanism: Mechanism, params: dict, arrays: dict) -> dict:
    """Every argument of ``mechanism``'s function that is not an array, as JSON: the case's ``params``,
    the function's defaults, and the values a preset sets.

    A parameter left at :data:`~refattn.core.presets.FROM_PRESET` gets the value
    the checked inputs resolved (their attribute of the same name), so that a
    reader of the manifest never needs refattn's source to learn what a preset
    asks for; ``preset`` stays, as a label. Optional arrays the case leaves
    out are ``null``. A preset's parameter whose checked inputs keep no
    attribute of that name (see :func:`unresolved_params`) is left out: its
    absence means "the preset's value".

    Raises
    ------
    ValueError
        If a value is not JSON (a contract violation).
    """
    own = _bound(mechanism, params, arrays)
    inputs = mechanism.check_inputs(**own) if _from_preset(own) else None
    explicit = {}
    for name, value in own.items():
        if name in arrays or (value is FROM_PRESET and not hasattr(inputs, name)):
            continue
        value = getattr(inputs, name) if value is FROM_PRESET else value
        explicit[name] = _json_value(value, f"{mechanism.name} parameter {name}")
    return explicit


def unresolved_params(mechanism: Mechanism, params: dict, arrays: dict) -> list[str]:
    """The preset parameters of one case that :func:`explicit_params` cannot spell out: their checked
    inputs have no attribute of their name (the mechanism should keep the resolved value there)."""
    own = _bound(mechanism, params, arrays)
    if not _from_preset(own):
        return []
    inputs = mechanism.check_inputs(**own)
    return [name for name, value in own.items() if value is FROM_PRESET and not hasattr(inputs, name)]


def _from_preset(arguments: dict) -> bool:
    return any(value is FROM_PRESET for value in arguments.values())


def _bound(mechanism: Mechanism, params: dict, arrays: dict) -> dict:
    """Every argument of the public function but ``precision`` and ``backend``, defaults filled in."""
    bound = inspect.signature(mechanism.forward).bind_partial(**arrays, **params)
    bound.apply_defaults()
    return {name: value for name, value in bound.arguments.items() if name not in registry.DISPATCH_ARGUMENTS}


def _json_value(value, what: str):
    """``value`` as JSON (tuples as lists, NumPy scalars as numbers, dicts with string keys as objects);
    raise ValueError for anything else."""
    if isinstance(value, (tuple, list)):
        return [_json_value(item, what) for item in value]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _json_value(item, f"{what}[{key!r}]") for key, item in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and np.isfinite(value):
        return value
    raise ValueError(f"{what} is {value!r}, which a manifest cannot hold (JSON: null, bool, number, string, list)")


# --- files --------------------------------------------------------------------


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``data`` atomically (temporary file, then rename), unless the file already holds it."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _remove_stale(out_dir: Path, mechanism_names: set[str], files: set[str]) -> None:
    """Delete case files of the exported mechanisms that no case produced (renamed or removed cases)."""
    for name in sorted(mechanism_names):
        for path in sorted((out_dir / name).glob("*.safetensors")):
            if f"{name}/{path.name}" not in files:
                path.unlink()


# --- drift --------------------------------------------------------------------


def _suite_files(folder: Path, mechanisms: set[str] | None) -> set[str]:
    """The manifest and every case file under ``folder`` (of ``mechanisms`` only, unless None), as relative
    POSIX paths."""
    files = {path.relative_to(folder).as_posix() for path in folder.rglob("*.safetensors")}
    if mechanisms is not None:
        files = {file for file in files if file.split("/", 1)[0] in mechanisms}
    return files | ({MANIFEST_NAME} if (folder / MANIFEST_NAME).is_file() else set())


def _differences(fresh: Path, folder: Path, mechanisms: set[str] | None = None) -> list[str]:
    """What differs between ``folder`` and a ``fresh`` export, for ``mechanisms`` only unless None."""
    messages = []
    fresh_files, folder_files = _suite_files(fresh, mechanisms), _suite_files(folder, mechanisms)
    messages += [f"{file}: missing (a fresh export writes it)" for file in sorted(fresh_files - folder_files)]
    messages += [f"{file}: not in a fresh export (stale; delete it)" for file in sorted(folder_files - fresh_files)]
    for file in sorted(fresh_files & folder_files):
        new, old = (fresh / file).read_bytes(), (folder / file).read_bytes()
        if new == old:
            continue
        if file == MANIFEST_NAME:
            messages += [f"{file}: {message}" for message in _manifest_differences(new, old, mechanisms)]
        else:
            messages += [f"{file}: {message}" for message in _tensor_differences(new, old)]
    return messages


def _tensor_differences(new: bytes, old: bytes) -> list[str]:
    try:
        old_tensors = safetensors.numpy.load(old)
    except SafetensorError as error:
        return [f"unreadable: {error}"]
    new_tensors = safetensors.numpy.load(new)
    if sorted(new_tensors) != sorted(old_tensors):
        return [f"tensors {sorted(old_tensors)}, a fresh export has {sorted(new_tensors)}"]
    messages = []
    for name in sorted(new_tensors):
        a, b = new_tensors[name], old_tensors[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            messages.append(f"{name} is {b.dtype}{list(b.shape)}, a fresh export has {a.dtype}{list(a.shape)}")
        elif a.dtype.kind == "f":  # expected values, inputs and float parameters alike (see check)
            error = tolerance.normwise_error(b, a)
            if error > REEXPORT_RTOL:
                messages.append(f"{name} differs from a fresh export by {error:.3g} (normwise)")
        elif not np.array_equal(a, b):
            messages.append(f"{name} differs from a fresh export")
    return messages


def _manifest_differences(new: bytes, old: bytes, mechanisms: set[str] | None = None) -> list[str]:
    """Differences between two manifests, over the cases of ``mechanisms`` (and the flags they use) unless None."""
    new, old = manifest_module.loads(new), manifest_module.loads(old)
    if mechanisms is not None:
        new, old = _restricted(new, mechanisms), _restricted(old, mechanisms)
    messages = [
        f"{key} is {old[key]!r}, a fresh export has {new[key]!r}"
        for key in sorted(new)
        if key not in ("cases", "flags") and new[key] != old.get(key)
    ]
    old_flags, new_flags = old.get("flags", {}), new["flags"]
    messages += [
        f"flag {flag}: {'described differently' if flag in old_flags else 'missing'} (a fresh export has {text!r})"
        for flag, text in sorted(new_flags.items()) if old_flags.get(flag) != text
    ]  # fmt: skip
    messages += [f"flag {flag}: not in a fresh export" for flag in sorted(old_flags.keys() - new_flags.keys())]
    old_cases = {case["id"]: case for case in old["cases"]}
    new_cases = {case["id"]: case for case in new["cases"]}
    removed, added = sorted(old_cases.keys() - new_cases.keys()), sorted(new_cases.keys() - old_cases.keys())
    messages += [f"case {case_id}: not in a fresh export" for case_id in removed]
    messages += [f"case {case_id}: missing (a fresh export has it)" for case_id in added]
    common = [case_id for case_id in new_cases if case_id in old_cases]
    if common != [case_id for case_id in old_cases if case_id in new_cases]:
        messages.append("cases are listed in another order than a fresh export lists them")
    for case_id in common:
        messages += [f"case {case_id}: {m}" for m in _entry_differences(new_cases[case_id], old_cases[case_id])]
    return messages


def _restricted(manifest: dict, mechanisms: set[str]) -> dict:
    """``manifest`` with only the cases of ``mechanisms`` and the descriptions of the flags they use."""
    cases = [case for case in manifest["cases"] if case["mechanism"] in mechanisms]
    used = {flag for case in cases for flag in case["flags"]}
    flags = {flag: text for flag, text in manifest["flags"].items() if flag in used}
    return {**manifest, "cases": cases, "flags": flags}


def _entry_differences(new: dict, old: dict) -> list[str]:
    exact = sorted(set(new) - {"sha256", "size_bytes", "tolerances"})
    messages = [
        f"{key} is {old.get(key)!r}, a fresh export has {new[key]!r}" for key in exact if new[key] != old.get(key)
    ]
    new_budgets, old_budgets = _flat(new["tolerances"]), _flat(old["tolerances"])
    if sorted(new_budgets) != sorted(old_budgets):
        return messages + [f"budgets for {sorted(old_budgets)}, a fresh export has {sorted(new_budgets)}"]
    for key, value in new_budgets.items():
        if abs(value - old_budgets[key]) > REEXPORT_BUDGET_RTOL * max(value, old_budgets[key]):
            messages.append(f"budget {key} is {old_budgets[key]!r}, a fresh export has {value!r}")
    return messages


def _flat(tolerances: dict) -> dict[str, float]:
    return {f"{output}@{precision}": value for output, row in tolerances.items() for precision, value in row.items()}
