"""The array namespace of the GPU path: NumPy on CPU, CuPy on a GPU (DESIGN.md, backends).

A mechanism's ``xp.py`` writes its tiled algorithm once over a NumPy-compatible
namespace ``xp`` (``xp.matmul``, ``xp.exp``, ``xp.maximum``...): under NumPy it
runs on CPU, where CI checks it against every conformance case; under CuPy the
same code runs on a GPU, its tile products going to cuBLAS. Its ``cupy.py`` is
the registered ``"cupy"`` backend, made by :func:`cupy_backend`.

CuPy is imported only when the ``cupy`` backend is first called; without CuPy
or without a CUDA device that call raises :class:`SpecError` naming the
backend, before anything is computed. Inputs are checked on the host like
every backend's (the checks are NumPy's). Results are where the inputs were:

* NumPy inputs are moved to the device once, and the results come back as
  NumPy arrays, as every backend returns them;
* CuPy inputs (a kernel author's arrays, already on the GPU) are copied to the
  host for the checks only (:func:`host_copies`); the computation uses the
  device arrays themselves (:func:`with_device_arrays`), and the results stay
  on the device as CuPy arrays, to be compared there.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from types import ModuleType

import numpy as np

from .errors import SpecError
from .results import Cotangents, Grads, Result

#: What to install for the GPU path (pyproject.toml's extras).
INSTALL_HINT = "pip install 'refattn[cuda12]' or 'refattn[cuda13]' on a machine with a CUDA device"


def cupy_or_none() -> ModuleType | None:
    """CuPy when it is installed and sees at least one CUDA device, else None."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # CUDA driver missing or broken: CuPy raises its own runtime errors here
        return None


def cupy_namespace() -> ModuleType:
    """CuPy, or a :class:`SpecError` on ``backend`` saying why the GPU path cannot run here."""
    cupy = cupy_or_none()
    if cupy is None:
        raise SpecError("backend", f"'cupy' only where CuPy finds a CUDA device ({INSTALL_HINT})", "'cupy'")
    return cupy


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for float32/float16/bfloat16 inputs, float64 otherwise (the kernels' rule)."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize <= 4 else np.dtype(np.float64)


def to_host(value):
    """``value`` with every array in it (nested in dicts) as a NumPy array."""
    if isinstance(value, dict):
        return {name: to_host(item) for name, item in value.items()}
    if value is None or isinstance(value, np.ndarray):
        return value
    return value.get() if hasattr(value, "get") else np.asarray(value)


def cupy_backend(xp_module: ModuleType):
    """``(forward, vjp)`` of the ``"cupy"`` backend: ``xp_module``'s algorithm under CuPy, results where
    the inputs were (on the host unless the checked inputs hold CuPy arrays).

    A module that sets ``STEPS_ON_HOST = True`` (the memory family: its streaming steps are the
    reference's, on the host; only each step's attention runs on the device) is given its inputs on the host.
    """

    steps_on_host = getattr(xp_module, "STEPS_ON_HOST", False)

    def forward(x) -> Result:
        cupy = cupy_namespace()
        on_device = holds_device_arrays(x, cupy)
        result = xp_module.forward(inputs_on_host(x, cupy) if steps_on_host and on_device else x, cupy)
        if on_device:
            return result
        return Result(out=to_host(result.out), lse=to_host(result.lse), aux=to_host(result.aux))

    def vjp(x, cotangents: Cotangents, saved: Result | None = None) -> Grads:
        cupy = cupy_namespace()
        on_device = holds_device_arrays(x, cupy)
        steps_x = inputs_on_host(x, cupy) if steps_on_host and on_device else x
        grads = dict(xp_module.vjp(steps_x, cotangents, cupy, saved))
        return Grads(grads if on_device else to_host(grads))

    return forward, vjp


# --- CuPy arrays as inputs ------------------------------------------------------------------


def host_copies(arguments: dict) -> tuple[dict, dict]:
    """``arguments`` with each CuPy array (alone or in a tuple or list) replaced by its host copy, for
    the checks; and ``{id(copy): device array}`` to put the device arrays back (:func:`with_device_arrays`).

    With no CuPy array among them (or no CuPy), the arguments are returned as they are.
    """
    cupy = cupy_or_none()
    originals: dict[int, object] = {}
    if cupy is None:
        return arguments, originals

    def on_host(value):
        if isinstance(value, cupy.ndarray):
            host = value.get()
            originals[id(host)] = value
            return host
        if isinstance(value, (tuple, list)):
            return type(value)(on_host(item) for item in value)
        return value

    return {name: on_host(value) for name, value in arguments.items()}, originals


def with_device_arrays(value, originals: dict):
    """``value`` (checked inputs, a cotangent) with each host copy made by :func:`host_copies` that the checks
    kept as it was replaced by its device array; arrays the checks derived (reshaped, cast) stay on the host
    and are moved as NumPy inputs are."""
    if not originals:
        return value
    return map_leaves(value, lambda leaf: originals.get(id(leaf), leaf) if isinstance(leaf, np.ndarray) else leaf)


def inputs_on_host(x, cupy):
    """Checked inputs ``x`` with every CuPy array in it copied to the host."""
    return map_leaves(x, lambda leaf: leaf.get() if isinstance(leaf, cupy.ndarray) else leaf)


def holds_device_arrays(x, cupy) -> bool:
    """Whether checked inputs ``x`` hold a CuPy array (never where NumPy stands in for CuPy, as in
    ``benchmarks/gpu_check.py --dry-run``: its arrays are the host's)."""
    if cupy is np:
        return False
    found = []
    map_leaves(x, lambda leaf: found.append(isinstance(leaf, cupy.ndarray)))
    return any(found)


def map_leaves(x, change):
    """``x`` with ``change`` applied to each value in it that is neither a tuple nor a dataclass (checked inputs
    nest both). Dataclasses are copied, not rebuilt, so their checks do not run again."""
    if isinstance(x, tuple):
        return tuple(map_leaves(item, change) for item in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        copied = copy.copy(x)
        for field in dataclasses.fields(x):
            object.__setattr__(copied, field.name, map_leaves(getattr(x, field.name), change))
        return copied
    return change(x)


def to_device(result: Result | Grads) -> Result | Grads:
    """A backend's result with every array in it a CuPy array (those already on the device as they are)."""
    cupy = cupy_namespace()

    def moved(value):
        if isinstance(value, dict):
            return {name: moved(item) for name, item in value.items()}
        return None if value is None else cupy.asarray(value)

    if isinstance(result, Result):
        return Result(out=moved(result.out), lse=moved(result.lse), aux=moved(result.aux))
    return Grads(moved(dict(result)))


def device_array(value, xp, dtype):
    """``value`` as an ``xp`` array of ``dtype``: host data (a number, a NumPy array of any dtype, bfloat16
    included, which CuPy has not) converted on the host first; an array already on the device cast there."""
    if isinstance(value, (np.ndarray, np.generic, int, float)):
        return xp.asarray(np.asarray(value, dtype=dtype))
    return xp.asarray(value, dtype=dtype)


def scatter_add(xp, target, index, values) -> None:
    """``target[index] += values`` with repeated indices summed (NumPy's ``add.at``, CuPy's ``cupyx.scatter_add``)."""
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)


def blocks(length: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the consecutive blocks of ``size`` (the last one shorter) that cover ``range(length)``."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def algorithm(name: str) -> ModuleType:
    """Mechanism ``name``'s ``xp.py`` (its algorithm over ``xp``), for a mechanism whose steps run it."""
    from . import registry

    return importlib.import_module(f"{registry.get(name).package}.xp")
