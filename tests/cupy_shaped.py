"""A NumPy stand-in shaped like CuPy: the GPU path's code runs on the CPU and fails where CuPy would.

The xp algorithms (``refattn/*/xp.py``) are tested under NumPy against every conformance case, but
NumPy forgives what CuPy does not. This namespace computes with NumPy and refuses, with a
:class:`CupyShapeError` naming the call, what CuPy 14 refuses or leaves undefined:

* **a host array mixed into device work**: a ``numpy.ndarray`` given to a ufunc, an operator, a
  namespace function or a method, or assigned into a device array (CuPy raises ``TypeError``;
  ``xp.asarray`` is the one way onto the device, and NumPy arrays as indices are copied over, as CuPy does);
* **implicit conversion to the host**: ``numpy.asarray(device_array)`` (``.get()`` is the way back);
* **a device scalar used as a Python index**: ``range(n)`` or ``a[:n]`` with ``n`` a 0-d device array
  (``cupy.ndarray`` has no ``__index__``; reductions return 0-d arrays, not NumPy scalars);
* **a name CuPy lacks or a keyword its function does not take** (``np.max(..., initial=)``, ``ufunc(where=)``),
  checked against ``cupy_api.json``, CuPy's namespace and signatures as recorded from CuPy itself;
* **indexing CuPy does not support**: a boolean mask combined with any other index;
* **an assignment with repeated targets and different values** (``a[i] = v`` with ``i`` repeating):
  CuPy stores an undefined one of them, NumPy the last;
* **a device array of a dtype CuPy lacks** (bfloat16: convert on the host, or with ``xp.asarray(x, dtype=...)``);
* **``cupyx.scatter_add`` on a dtype CuPy's atomic add lacks** (int32, uint32, uint64, float16/32/64 only).

Numerics are NumPy's, so a case that passes here passes as it does under NumPy; this checks the code's
shape, not the device's rounding. ``python tests/cupy_shaped.py`` rewrites ``cupy_api.json`` from the
installed CuPy (it imports without a device).
"""

from __future__ import annotations

import inspect
import json
import numbers
import sys
import types
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

API_FILE = Path(__file__).with_name("cupy_api.json")
#: The value dtypes of CuPy's atomic scatter add (cupy/_core/_routines_indexing.pyx, ``_scatter_op_single``).
SCATTER_ADD_DTYPES = tuple(np.dtype(t) for t in ("int32", "uint32", "uint64", "float16", "float32", "float64"))
#: Functions that take host data and put it on the device.
TRANSFERS = ("asarray", "array", "ascontiguousarray")
#: The dtypes a CuPy array can have (no bfloat16: CuPy refuses "Unsupported dtype").
DEVICE_DTYPE_CHARS = "?bhilqBHILQefdFD"
#: Types that pass to CuPy as they are: Python and NumPy scalars, dtypes, shapes' and slices' parts.
PASSED_AS_IS = (numbers.Number, np.generic, np.dtype, type, str, slice, type(None), type(Ellipsis))


class CupyShapeError(TypeError):
    """What CuPy would refuse (or leave undefined) in code that NumPy runs."""


#: CuPy's namespace as recorded (empty while ``python tests/cupy_shaped.py`` records it afresh).
API = json.loads(API_FILE.read_text()) if API_FILE.exists() else {}


# --- arguments: device arrays in, device arrays out -----------------------------------


def _to_host(value, where: str, allow_host: bool = False):
    """``value`` with every DeviceArray in it unwrapped; a host ndarray is a :class:`CupyShapeError`."""
    if isinstance(value, DeviceArray):
        return value.host
    if isinstance(value, np.ndarray):
        if allow_host:
            return value
        raise CupyShapeError(f"{where}: a NumPy array of shape {value.shape} and dtype {value.dtype} where CuPy "
                             "needs a device array (move it with xp.asarray)")  # fmt: skip
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(item, where, allow_host) for item in value)
    if isinstance(value, dict):  # keyword arguments
        return {key: _to_host(item, where, allow_host) for key, item in value.items()}
    if isinstance(value, PASSED_AS_IS):
        return value
    raise CupyShapeError(f"{where}: an argument of type {type(value).__name__}, which CuPy does not take")


def _to_device(value):
    """NumPy results as CuPy returns them: arrays and NumPy scalars become DeviceArrays (0-d for a scalar)."""
    if isinstance(value, np.ndarray):
        if value.dtype.char not in DEVICE_DTYPE_CHARS:
            raise CupyShapeError(f"a device array of dtype {value.dtype}, which CuPy does not have (convert it first)")
        return DeviceArray(value)
    if isinstance(value, np.generic):
        return DeviceArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_to_device(item) for item in value)
    if isinstance(value, list):
        return [_to_device(item) for item in value]
    return value


def _signature(entry: dict) -> inspect.Signature | None:
    if entry.get("params") is None:
        return None
    kinds = inspect.Parameter
    return inspect.Signature([
        kinds(name, getattr(kinds, kind), default=None if has_default else kinds.empty)
        for name, kind, has_default in entry["params"]
    ])  # fmt: skip


def _check_call(entry: dict, where: str, args: tuple, kwargs: dict) -> None:
    """A :class:`CupyShapeError` when CuPy's recorded signature does not take these arguments."""
    if entry["kind"] == "ufunc":
        unknown = sorted(set(kwargs) - set(entry["keywords"]))
        if unknown:
            raise CupyShapeError(f"{where}: CuPy's ufunc takes no keyword {', '.join(unknown)} "
                                 f"(only {', '.join(entry['keywords'])})")  # fmt: skip
        return
    signature = _signature(entry)
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise CupyShapeError(f"{where}{signature}: CuPy does not take these arguments ({error})") from None


# --- the array ------------------------------------------------------------------------


class DeviceArray(NDArrayOperatorsMixin):
    """A NumPy array behind the interface of ``cupy.ndarray`` (see the module's docstring)."""

    __slots__ = ("host",)

    def __init__(self, host: np.ndarray):
        self.host = host
        _made(host)

    # Operators and NumPy's own functions called on device arrays dispatch here, as they do to CuPy.
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
        if method == "__call__":
            _check_call(API["functions"].get(ufunc.__name__, {"kind": "ufunc", "keywords": []}), where, inputs, kwargs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_to_host(out, where) for out in kwargs["out"])
        result = getattr(ufunc, method)(*_to_host(inputs, where), **kwargs)
        return self._outputs(result, kwargs)

    def _outputs(self, result, kwargs):
        if "out" not in kwargs:
            return _to_device(result)
        return result if result is None else _to_device(result)

    def __array_function__(self, func, types_, args, kwargs):
        return getattr(NAMESPACE, func.__name__)(*args, **kwargs)

    def __array__(self, *args, **kwargs):
        raise CupyShapeError("implicit conversion of a device array to NumPy (CuPy raises; use .get())")

    # Python protocols: CuPy has these, and no __index__.
    def __getitem__(self, key):
        return _to_device(self.host[_index(key, self.host)])

    def __setitem__(self, key, value):
        host_key = _index(key, self.host)
        host_value = _to_host(value, "setitem")
        _require_defined_assignment(self.host, host_key, host_value)
        self.host[host_key] = host_value

    def __len__(self):
        return len(self.host)

    def __iter__(self):
        return (_to_device(row) for row in self.host)

    def __bool__(self):
        _read_by_host()
        return bool(self.host)

    def __float__(self):
        _read_by_host()
        return float(self.host)

    def __int__(self):
        _read_by_host()
        return int(self.host)

    def __repr__(self):
        return f"DeviceArray({self.host!r})"

    def get(self, *args, **kwargs):
        """The host copy (``cupy.ndarray.get``)."""
        _check_call(API["ndarray"]["get"], "ndarray.get", args, kwargs)
        _read_by_host()
        return self.host.copy()

    def __getattr__(self, name):
        if name.startswith("__"):  # NumPy's protocol probes (__array_struct__...): absent, as on cupy.ndarray
            raise AttributeError(name)
        entry = API["ndarray"].get(name)
        if entry is None:
            raise CupyShapeError(f"cupy.ndarray has no attribute {name!r}")
        value = getattr(self.host, name)
        if entry["kind"] != "function":
            return _to_device(value)
        if name in ("item", "tolist"):
            _read_by_host()

        def method(*args, **kwargs):
            _check_call(entry, f"ndarray.{name}", args, kwargs)
            return _to_device(value(*_to_host(args, f"ndarray.{name}"), **_to_host(kwargs, f"ndarray.{name}")))

        return method


class Watch:
    """What device work did while the watch was active (``with Watch() as watch: ...``):

    * ``largest``: the element count of the largest device array made (how O(N) memory is checked without
      a device); ``float64_made``: how many float64 arrays were made (a float32 run's tiles stay float32);
    * ``host_reads``: how many times the host read a device value (``bool``, ``int``, ``float``, ``.item()``,
      ``.tolist()``, ``.get()``), each a wait for the device on a GPU.
    """

    active: list["Watch"] = []

    def __init__(self):
        self.largest = self.float64_made = 0
        self.host_reads = 0

    def __enter__(self):
        Watch.active.append(self)
        return self

    def __exit__(self, *exc):
        Watch.active.remove(self)


def _made(host: np.ndarray) -> None:
    for watch in Watch.active:
        watch.largest = max(watch.largest, host.size)
        watch.float64_made += host.dtype == np.float64


def _read_by_host() -> None:
    for watch in Watch.active:
        watch.host_reads += 1


def _index(key, host: np.ndarray):
    """A CuPy index as NumPy's: device arrays unwrapped, host arrays and lists copied over (CuPy does too)."""
    key = _to_host(key, "indexing", allow_host=True)
    parts = key if isinstance(key, tuple) else (key,)
    masks = [part for part in parts if isinstance(part, np.ndarray) and part.dtype == np.bool_]
    if masks:
        others = [part for part in parts if not (part is masks[0] or part is Ellipsis
                                                  or (isinstance(part, slice) and part == slice(None)))]  # fmt: skip
        if len(masks) > 1 or others:
            raise CupyShapeError("indexing: CuPy supports a boolean mask only as the one index besides ':' and '...'")
    return key


def _require_defined_assignment(host: np.ndarray, key, value) -> None:
    """CuPy stores an undefined one of the values written to a repeated location: refuse that when they differ."""
    parts = key if isinstance(key, tuple) else (key,)
    if not any(isinstance(part, (np.ndarray, list)) and np.asarray(part).dtype.kind in "iu" for part in parts):
        return
    location = np.arange(host.size).reshape(host.shape)[key]
    written = np.broadcast_to(np.asarray(value, dtype=host.dtype), location.shape).ravel()
    location = location.ravel()
    order = np.argsort(location, kind="stable")
    same_place = location[order][1:] == location[order][:-1]
    if np.any(same_place & (written[order][1:] != written[order][:-1])):
        raise CupyShapeError("setitem: different values written to one location (CuPy keeps an undefined one)")


# --- the namespace ----------------------------------------------------------------------


class CupyShapedNamespace(types.ModuleType):
    """``xp``: the names of CuPy's namespace, each NumPy's, with CuPy's refusals (module docstring)."""

    ndarray = DeviceArray

    def __getattr__(self, name):
        entry = API["functions"].get(name)
        if entry is None:
            raise CupyShapeError(f"cupy has no {name!r}")
        if entry["kind"] == "module":
            raise CupyShapeError(f"cupy.{name}: a submodule, which this stand-in does not model")
        value = getattr(np, name)
        if entry["kind"] in ("type", "value"):
            return value
        return self._function(name, value, entry)

    @staticmethod
    def _function(name, function, entry):
        allow_host = name in TRANSFERS

        def call(*args, **kwargs):
            _check_call(entry, f"cupy.{name}", args, kwargs)
            host_args = _to_host(args, f"cupy.{name}", allow_host)
            host_kwargs = _to_host(kwargs, f"cupy.{name}", allow_host)
            return _to_device(function(*host_args, **host_kwargs))

        call.__name__ = name
        return call


def scatter_add(a, slices, value) -> None:
    """``cupyx.scatter_add``: repeated indices summed, on the dtypes of CuPy's atomic add."""
    _check_call(API["cupyx"]["scatter_add"], "cupyx.scatter_add", (a, slices, value), {})
    target = _to_host(a, "cupyx.scatter_add")
    if target.dtype not in SCATTER_ADD_DTYPES:
        raise CupyShapeError(f"cupyx.scatter_add: dtype {target.dtype}, which CuPy's atomic add does not support")
    np.add.at(target, _index(slices, target), _to_host(value, "cupyx.scatter_add"))


NAMESPACE = CupyShapedNamespace("cupy_shaped")
CUPYX = types.ModuleType("cupyx_shaped")
CUPYX.scatter_add = scatter_add


# --- recording CuPy's namespace (run where CuPy is installed; it needs no device) ---------------


def record() -> dict:
    """CuPy's public names, with each function's parameters, from the installed CuPy."""
    import cupy
    import cupyx

    return {"cupy_version": cupy.__version__,
            "functions": {name: _describe(getattr(cupy, name), cupy) for name in dir(cupy) if not name.startswith("_")},
            "ndarray": {name: _describe(getattr(cupy.ndarray, name), cupy) for name in dir(cupy.ndarray)
                        if not name.startswith("_")},
            "cupyx": {"scatter_add": _describe(cupyx.scatter_add, cupy)}}  # fmt: skip


def _describe(value, cupy) -> dict:
    if isinstance(value, type):
        return {"kind": "type"}
    if isinstance(value, types.ModuleType):
        return {"kind": "module"}
    if isinstance(value, cupy.ufunc):  # called with out, casting and dtype only (cupy.ufunc.__call__)
        return {"kind": "ufunc", "nin": value.nin, "keywords": ["casting", "dtype", "out"]}
    if not callable(value):
        return {"kind": "attribute" if isinstance(value, (property, types.GetSetDescriptorType)) else "value"}
    return {"kind": "function", "params": _parameters(value)}


def _parameters(function) -> list | None:
    """``[name, kind, has_default]`` per parameter: from the signature, or from the docstring's first line
    where CuPy compiled the function without one or hides its keywords behind ``**kwargs``."""
    try:
        found = [[p.name, p.kind.name, p.default is not p.empty] for p in inspect.signature(function).parameters.values()]
        if not any(kind == "VAR_KEYWORD" for _, kind, _ in found):
            return found
    except (TypeError, ValueError):
        found = None
    first_line = (function.__doc__ or "").strip().partition("\n")[0].partition(" -> ")[0]
    head, _, rest = first_line.partition("(")
    if not rest.endswith(")") or " " in head:
        return found
    names = []
    for part in rest[:-1].replace("\\*", "*").split(","):
        part = part.strip()
        declared, _, default = part.partition("=")
        if part and part != "self":
            names.append(part if part in ("*", "/") or part.startswith("*") else declared.split()[-1] + ("=None" if default else ""))
    try:
        namespace = {}
        exec(f"def f({', '.join(names)}): pass", namespace)
    except SyntaxError:
        return found
    return [[p.name, p.kind.name, p.default is not p.empty] for p in inspect.signature(namespace["f"]).parameters.values()]


if __name__ == "__main__":
    recorded = record()
    API_FILE.write_text(json.dumps(recorded, indent=0, sort_keys=True) + "\n")
    print(f"wrote {API_FILE} from CuPy {recorded['cupy_version']}", file=sys.stderr)
