"""Verify a JAX attention function: NumPy in, JAX arrays to the function,
NumPy out, gradients by ``jax.vjp``.

Example::

    import jax
    from refattn.conformance.adapters import from_jax
    from refattn.conformance.verify import verify

    def attend(q, k, v, *, scale=None, **unsupported):
        return jax.nn.dot_product_attention(q, k, v, scale=scale)  # (B, N, H, D)

    report = verify(from_jax(attend), dtype="float32", layout="bnhd", grad=True)

float64 cases are run with JAX's 64-bit mode switched on for the call
(``jax.enable_x64``), so that float64 inputs are not silently narrowed.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ...core.results import Result
from ._common import FrameworkImplementation, named, split_result


def _jax():
    try:
        import jax
    except ImportError as exc:
        raise ImportError("refattn's JAX adapter needs JAX: pip install jax") from exc
    return jax


def from_jax(fn, *, device=None, inputs=("q", "k", "v")) -> "JaxImplementation":
    """Wrap ``fn(q, k, v, **kwargs) -> out or (out, lse)``, a function of JAX arrays.

    Parameters
    ----------
    fn : callable
        Receives every array as a JAX array of the same dtype (bool masks
        included); other parameters (``causal``, ``scale``, ``window``...)
        unchanged. Returns ``out``, ``(out, lse)`` or an object with
        ``.out`` and ``.lse``.
    device : jax.Device, optional
        Where the arrays are placed (default: JAX's default device).
    inputs : tuple of str
        Names of the positional inputs, as the cases name them: ``("q", "k",
        "v")``, or ``("qk", "v")`` for shared-QK mechanisms (LSH). The
        gradients are returned under these names.

    Returns
    -------
    JaxImplementation
        A NumPy callable with a ``.vjp`` computed by ``jax.vjp``.
    """
    return JaxImplementation(fn, device, tuple(inputs))


class JaxImplementation(FrameworkImplementation):
    """A JAX function seen as a NumPy implementation (see :func:`from_jax`)."""

    adapter = "from_jax"

    def __call__(self, *sequences, **kwargs) -> Result:
        with _precision_of(sequences[0]):
            arrays = self._arrays({**named(self.inputs, sequences), **kwargs})
            positional = [arrays.pop(n) for n in self.inputs]
            out, lse = split_result(self.fn(*positional, **arrays))
            return Result(out=np.asarray(out), lse=None if lse is None else np.asarray(lse))

    def vjp(self, dout, *sequences, dlse=None, **kwargs) -> dict:
        """Gradients of every floating-point array argument for cotangents ``dout`` (and ``dlse``).

        ``dlse`` is used only when the function returns a log-sum-exp.
        """
        jax = _jax()
        with _precision_of(sequences[0]):
            arrays = self._arrays({**named(self.inputs, sequences), **kwargs})
            names = [n for n, x in arrays.items() if isinstance(x, jax.Array) and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
            fixed = {n: x for n, x in arrays.items() if n not in names}

            def forward(*differentiable):
                given = {**fixed, **dict(zip(names, differentiable))}
                positional = [given.pop(n) for n in self.inputs]
                return split_result(self.fn(*positional, **given))

            (out, lse), pullback = jax.vjp(forward, *(arrays[n] for n in names))
            lse_cotangent = None
            if lse is not None:
                lse_cotangent = jax.numpy.zeros_like(lse) if dlse is None else self._array(dlse).astype(lse.dtype)
            grads = pullback((self._array(dout).astype(out.dtype), lse_cotangent))
            return {name: np.asarray(g) for name, g in zip(names, grads)}

    def _arrays(self, kwargs: dict) -> dict:
        return {n: self._array(x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}

    def _array(self, x: np.ndarray):
        return _jax().device_put(x, self.device)


def _precision_of(q: np.ndarray):
    """A context with JAX's 64-bit mode on for float64 inputs, unchanged otherwise."""
    if q.dtype != np.float64:
        return contextlib.nullcontext()
    jax = _jax()
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX releases

    return enable_x64(True)
