"""The mechanism contract and registry (DESIGN.md, "The mechanism contract").

A mechanism is one folder ``refattn/<family>/<name>/`` with

``reference.py``
    The **public function**, whose signature and numpydoc docstring are the
    specification, written once::

        def dense_attention(q, k, v, *, mask=None, ..., precision=None, backend="reference") -> Result:
            '''...the spec...'''
            return registry.call_forward("dense", locals())

    its VJP derived from it (never a second copy of the signature)::

        dense_attention_vjp = registry.vjp_function(dense_attention, "dense", grads="...")

    and the reference **backend**: ``forward(inputs, num) -> Result`` and
    ``vjp(inputs, cotangents, num) -> Grads``, the numbered steps of the spec.
``inputs.py`` (or a function in ``reference.py``)
    ``check_inputs(**arguments)``: every public argument but ``precision`` and
    ``backend`` in, one checked-inputs object out. Every ``SpecError`` is
    raised here, before any backend runs. The object has a method
    ``cotangent_shapes() -> {"dout": shape, "dlse": shape or None}``.
``numba.py`` (``cupy.py``...)
    Other backends: ``forward(inputs) -> Result`` and ``vjp(inputs,
    cotangents, saved=None) -> Grads`` over checked inputs, computing in the
    inputs' dtype (float32 for float32/float16/bfloat16, float64 otherwise).
    ``saved`` is the Result this backend's forward returned for the same
    inputs, when the caller has it (FlashAttention's backward reuses ``out``
    and ``lse``); a backend may ignore it.
``cases.py``, ``properties.py``, ``spec/<page>.md``
    Its conformance cases (``cases() -> list[Case]`` and ``FLAGS``, the
    descriptions of the flags only it uses), its invariants, its spec page.
``__init__.py``
    One line: ``MECHANISM = registry.register("<name>", __name__, forward, vjp,
    check_inputs, "spec/<page>.md")`` (:func:`register`).

The registry is the only dispatcher: :func:`call_forward` and the VJPs made by
:func:`vjp_function` check the inputs once, pick the backend, apply the
precision rule (``precision=`` is an option of the reference alone, whose
results are float64 whatever it computed in) and check cotangents. Backends
are modules imported on first use, so importing refattn compiles no Numba
kernel and needs no CuPy.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import numpy as np

from .checks import cotangent
from .errors import SpecError
from .precision import numerics
from . import xp
from .results import Cotangents, Grads, Result

REFERENCE = "reference"
#: The backend of the GPU path (refattn/core/xp.py), available only where CuPy sees a device.
GPU_BACKEND = "cupy"
#: Arguments of every public function that are not the mechanism's own.
DISPATCH_ARGUMENTS = ("precision", "backend")
#: Keywords the derived VJP adds in front of the forward's own.
VJP_ARGUMENTS = ("dout", "dlse", "saved")


@dataclass(frozen=True)
class Mechanism:
    """One registered mechanism.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"dense"``; also the prefix of its case ids.
    package : str
        Module path of its folder, e.g. ``"refattn.dense"``; backends are
        ``<package>.<backend>``, cases ``<package>.cases``, invariants
        ``<package>.properties``, Hypothesis strategies ``<package>.strategies``.
    forward : callable
        The public function (in ``reference.py``).
    vjp : callable
        Its VJP, made by :func:`vjp_function`.
    check_inputs : callable
        ``check_inputs(**arguments) -> inputs``.
    spec : str
        Its spec page, relative to the repository root.
    backends : tuple of str
        ``"reference"`` first; by default ``("reference", "numba")``.
    positional : tuple of str
        The array inputs passed positionally, in order: ``("q", "k", "v")``,
        or ``("qk", "v")`` for shared query-key mechanisms.
    implied_output : callable, optional
        ``implied_output(arguments, aux) -> Result or None``: the output that an
        implementation's own discrete intermediates (``aux``, e.g. LSH buckets)
        imply, by a formula independent of how they were computed. When those
        intermediates differ from a case's, the verifier compares the
        implementation's output with this, telling a wrong decision (hashing,
        routing) apart from wrong attention given the decision.
    state_held_fixed : bool
        The mechanism streams segments through a state (recurrent memory), and
        its VJP holds the state carried between segments fixed (stop-gradient,
        as Transformer-XL's memory update): it is the gradient of each segment
        given its incoming state, not the gradient of the whole stream, so
        finite differences of the whole-sequence forward do not check it. Its
        own tests check it segment by segment.
    """

    name: str
    package: str
    forward: Callable
    vjp: Callable
    check_inputs: Callable
    spec: str
    backends: tuple[str, ...] = ("reference", "numba")
    positional: tuple[str, ...] = ("q", "k", "v")
    implied_output: Callable | None = None
    state_held_fixed: bool = False

    def backend(self, backend_name: str) -> ModuleType:
        """The module implementing this mechanism on ``backend_name``."""
        if backend_name not in self.backends:
            raise SpecError("backend", f"one of {list(self.backends)} for {self.name}", repr(backend_name))
        return importlib.import_module(f"{self.package}.{backend_name}")

    def available_backends(self) -> tuple[str, ...]:
        """Its backends that can run here: ``"cupy"`` only where CuPy finds a CUDA device."""
        return tuple(name for name in self.backends if name != GPU_BACKEND or gpu_available())

    def cases(self) -> list:
        """Its conformance cases: those of ``<package>.cases.cases()`` whose mechanism is this one."""
        return [case for case in importlib.import_module(f"{self.package}.cases").cases() if case.mechanism == self.name]

    def flags(self) -> dict[str, str]:
        """The flags its cases module describes (``<package>.cases.FLAGS``; may be empty)."""
        return dict(getattr(importlib.import_module(f"{self.package}.cases"), "FLAGS", {}))

    @property
    def properties(self) -> str:
        """Module path of its invariants."""
        return f"{self.package}.properties"

    @property
    def strategies(self) -> str:
        """Module path of its Hypothesis strategies (``problems(precision=...)``)."""
        return f"{self.package}.strategies"


_MECHANISMS: dict[str, Mechanism] = {}


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """Whether the ``"cupy"`` backend can run here (CuPy installed, a CUDA device visible); asked once."""
    from .xp import cupy_or_none

    return cupy_or_none() is not None


def register(name: str, package: str, forward, vjp, check_inputs, spec: str, **options) -> Mechanism:
    """Register mechanism ``name`` from its folder's ``__init__.py`` (``package`` is its ``__name__``).

    ``options`` are the optional :class:`Mechanism` fields (``backends``,
    ``positional``, ``implied_output``, ``state_held_fixed``).
    """
    mechanism = Mechanism(name, package, forward, vjp, check_inputs, spec, **options)
    _document_dispatch_arguments(mechanism)
    if mechanism.backends[:1] != (REFERENCE,):
        raise RuntimeError(f"mechanism {mechanism.name!r}: backends must start with {REFERENCE!r}")
    if mechanism.name in _MECHANISMS and _MECHANISMS[mechanism.name] is not mechanism:
        raise RuntimeError(f"mechanism {mechanism.name!r} registered twice")
    _MECHANISMS[mechanism.name] = mechanism
    return mechanism


def _document_dispatch_arguments(mechanism: Mechanism) -> None:
    """Add ``precision`` and ``backend``, the registry's arguments, to the public function's docstring.

    They mean the same for every mechanism, so they are written here once,
    before "Returns", with the backends this mechanism has; a docstring that
    documents them itself (a mechanism-specific note) is left as it is.
    """
    doc = mechanism.forward.__doc__
    if not doc or re.search(r"^    precision\b", doc, re.M) or "\n    Returns\n" not in doc:
        return
    folder = mechanism.package.replace(".", "/")
    on_gpu = " on a GPU (CuPy arrays in give CuPy arrays out)"
    kernels = [f'``"{name}"`` runs {folder}/{name}.py' + (on_gpu if name == GPU_BACKEND else "")
               for name in mechanism.backends[1:]]  # fmt: skip
    runs = ", ".join(kernels) + ", in the inputs' dtype (no ``precision``)" if kernels else "The reference alone"
    names = ", ".join(f'"{name}"' for name in mechanism.backends)
    text = (
        '    precision : {None, "float64", "float32", "float16", "bfloat16"} or Numerics\n'
        "        Evaluate the reference in that precision (tolerances only); the result is float64.\n"
        f"    backend : {{{names}}}\n        {runs}.\n"
    )
    head, _, tail = doc.rpartition("\n    Returns\n")
    mechanism.forward.__doc__ = f"{head.rstrip()}\n{text}\n    Returns\n{tail}"


def names() -> list[str]:
    """Registered mechanism names, sorted."""
    return sorted(_MECHANISMS)


def get(name: str) -> Mechanism:
    if name not in _MECHANISMS:
        raise SpecError("mechanism", f"one of {names()}", repr(name))
    return _MECHANISMS[name]


# --------------------------------------------------------------------------
# Dispatch: the one place where inputs are checked and a backend is chosen.
# --------------------------------------------------------------------------


def _split(arguments: dict) -> tuple[dict, str, object]:
    """The mechanism's own arguments, the backend name and the precision."""
    own = {name: value for name, value in arguments.items() if name not in DISPATCH_ARGUMENTS}
    backend_name = arguments.get("backend", REFERENCE)
    precision = arguments.get("precision")
    if backend_name != REFERENCE and precision is not None:
        raise SpecError(
            "precision", "None with a non-reference backend (kernels compute in their input dtype)", repr(precision)
        )
    return own, backend_name, precision


def call_forward(name: str, arguments: dict) -> Result:
    """Run mechanism ``name``'s forward on ``arguments`` (the public function's ``locals()``)."""
    mechanism = get(name)
    own, backend_name, precision = _split(arguments)
    module = mechanism.backend(backend_name)  # a bad backend name fails before any work
    if backend_name == GPU_BACKEND:
        return _on_gpu(mechanism, own, lambda inputs, host, device_arrays: module.forward(
            xp.with_device_arrays(inputs, device_arrays)))
    inputs = mechanism.check_inputs(**own)
    if backend_name == REFERENCE:
        return _as_float64(module.forward(inputs, numerics(precision)))
    return module.forward(inputs)


def call_vjp(name: str, dout, arguments: dict, *, dlse=None, saved: Result | None = None) -> Grads:
    """Run mechanism ``name``'s VJP for cotangents ``dout`` (and ``dlse``)."""
    mechanism = get(name)
    own, backend_name, precision = _split(arguments)
    module = mechanism.backend(backend_name)
    if backend_name == GPU_BACKEND:
        return _on_gpu(mechanism, {**own, "dout": dout, "dlse": dlse}, lambda inputs, host, device_arrays: module.vjp(
            xp.with_device_arrays(inputs, device_arrays),
            _checked_cotangents(name, inputs, host["dout"], host["dlse"], device_arrays), saved=saved))  # fmt: skip
    inputs = mechanism.check_inputs(**own)
    cotangents = _checked_cotangents(name, inputs, dout, dlse)
    if backend_name == REFERENCE:
        grads = module.vjp(inputs, cotangents, numerics(precision))
        return Grads({key: np.asarray(value, np.float64) for key, value in grads.items()})
    return module.vjp(inputs, cotangents, saved=saved)


def _checked_cotangents(name: str, inputs, dout, dlse, device_arrays: dict | None = None) -> Cotangents:
    """``dout`` and ``dlse`` checked against the output's shapes (CuPy ones by their host copies in
    ``device_arrays``, then given back as the device arrays)."""
    shapes = inputs.cotangent_shapes()
    dout = cotangent(dout, "dout", shapes["dout"])
    if dlse is not None:
        if shapes.get("dlse") is None:
            raise SpecError("dlse", f"None ({name} defines no log-sum-exp)", "an array")
        dlse = cotangent(dlse, "dlse", shapes["dlse"])
    return xp.with_device_arrays(Cotangents(dout=dout, dlse=dlse), device_arrays or {})


def _on_gpu(mechanism: Mechanism, own: dict, compute: Callable):
    """``compute(checked inputs, own's host copies, device_arrays)`` on the ``"cupy"`` backend: CuPy arrays
    among ``own`` (the cotangents ``dout`` and ``dlse`` included) are checked by their host copies, then
    computed with as they are, and the results are CuPy arrays (refattn/core/xp.py); with NumPy arrays only,
    the results are NumPy arrays, as every backend's."""
    host, device_arrays = xp.host_copies(own)
    inputs = mechanism.check_inputs(**{name: value for name, value in host.items() if name not in ("dout", "dlse")})
    result = compute(inputs, host, device_arrays)
    return xp.to_device(result) if device_arrays else result


def _as_float64(result: Result) -> Result:
    """The reference's result in float64 (it may have computed in a lower precision)."""
    aux = {key: value.astype(np.float64) if np.issubdtype(value.dtype, np.floating) else value
           for key, value in result.aux.items()}  # fmt: skip
    lse = None if result.lse is None else np.asarray(result.lse, np.float64)
    return Result(out=np.asarray(result.out, np.float64), lse=lse, aux=aux)


def vjp_function(forward: Callable, name: str, *, grads: str) -> Callable:
    """The public VJP of ``forward``, without a second copy of its signature.

    Its signature is ``forward``'s with ``dout`` first and the keywords
    ``dlse=None`` (the cotangent of ``lse``; 0 when omitted) and
    ``saved=None`` (the Result the same backend's forward returned for these
    arguments, which a kernel may reuse instead of recomputing it). ``grads``
    is the docstring's "Returns" text: which gradients, of what shape.
    """
    forward_signature = inspect.signature(forward)
    parameters = list(forward_signature.parameters.values())
    keyword = inspect.Parameter.KEYWORD_ONLY
    first_keyword = next(i for i, p in enumerate(parameters) if p.kind == keyword)
    signature = forward_signature.replace(
        parameters=[inspect.Parameter("dout", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + parameters[:first_keyword]
        + [inspect.Parameter("dlse", keyword, default=None), inspect.Parameter("saved", keyword, default=None)]
        + parameters[first_keyword:],
        return_annotation=Grads,
    )

    def vjp(dout, *args, dlse=None, saved=None, **kwargs):
        bound = forward_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return call_vjp(name, dout, dict(bound.arguments), dlse=dlse, saved=saved)

    vjp.__name__ = vjp.__qualname__ = f"{forward.__name__}_vjp"
    vjp.__signature__ = signature
    vjp.__module__ = forward.__module__
    vjp.__doc__ = (
        f"Gradients of :func:`{forward.__name__}` for cotangents ``dout`` (and ``dlse``).\n\n"
        f"Parameters are those of :func:`{forward.__name__}`, plus\n\n"
        "dout : ndarray, the shape of ``out``\n    Cotangent of ``out``.\n"
        "dlse : ndarray, the shape of ``lse``, optional\n    Cotangent of ``lse``; 0 when omitted.\n"
        "saved : Result, optional\n    What the same backend's forward returned for these arguments;\n"
        "    a kernel may reuse it instead of recomputing the forward.\n\n"
        f"Returns\n-------\nGrads\n{grads}\n"
    )
    return vjp
