"""The array namespace of the GPU path: NumPy on CPU, CuPy on a GPU (DESIGN.md, backends).

A mechanism's ``xp.py`` writes its tiled algorithm once over a NumPy-compatible
namespace ``xp`` (``xp.matmul``, ``xp.exp``, ``xp.maximum``...): under NumPy it
runs on CPU, where CI checks it against every conformance case; under CuPy the
same code runs on a GPU, its tile products going to cuBLAS. Its ``cupy.py`` is
the registered ``"cupy"`` backend, made by :func:`cupy_backend`.

CuPy is imported only when the ``cupy`` backend is first called; without CuPy
or without a CUDA device that call raises :class:`SpecError` naming the
backend, before anything is computed. Inputs are checked on the host like
every backend's (the checks are NumPy's), moved to the device once, and the
results are moved back: the backend returns NumPy arrays, as the others do.
"""

from __future__ import annotations

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
    """``(forward, vjp)`` of the ``"cupy"`` backend: ``xp_module``'s algorithm under CuPy, results on the host."""

    def forward(x) -> Result:
        result = xp_module.forward(x, cupy_namespace())
        return Result(out=to_host(result.out), lse=to_host(result.lse), aux=to_host(result.aux))

    def vjp(x, cotangents: Cotangents, saved: Result | None = None) -> Grads:
        return Grads(to_host(dict(xp_module.vjp(x, cotangents, cupy_namespace(), saved))))

    return forward, vjp


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
