"""Verify a PyTorch attention function: NumPy in, torch tensors to the function,
NumPy out, gradients by ``torch.autograd``.

Example::

    import torch.nn.functional as F
    from refattn.conformance.adapters import from_torch
    from refattn.conformance.verify import verify

    def sdpa(q, k, v, *, scale=None, **unsupported):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    report = verify(from_torch(sdpa), dtype="float32", grad=True)
"""

from __future__ import annotations

import numpy as np

from ...core.results import Result
from ._common import FrameworkImplementation, named, split_result


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError("refattn's torch adapter needs PyTorch: pip install torch") from exc
    return torch


def from_torch(fn, *, device="cpu", inputs=("q", "k", "v")) -> "TorchImplementation":
    """Wrap ``fn(q, k, v, **kwargs) -> out or (out, lse)``, a function of torch tensors.

    Parameters
    ----------
    fn : callable
        Receives every array as a tensor on ``device``: floating-point arrays
        in the matching torch dtype (bfloat16 as ``torch.bfloat16``), bool
        masks as ``torch.bool``, integer arrays as ``torch.int64``; other
        parameters (``causal``, ``scale``, ``window``...) unchanged. Returns
        ``out``, ``(out, lse)`` or an object with ``.out`` and ``.lse``.
    device : str or torch.device
        Where the tensors live ("cpu", "cuda", ...).
    inputs : tuple of str
        Names of the positional inputs, as the cases name them: ``("q", "k",
        "v")``, or ``("qk", "v")`` for shared-QK mechanisms (LSH). The
        gradients are returned under these names.

    Returns
    -------
    TorchImplementation
        A NumPy callable with a ``.vjp`` computed by autograd.
    """
    return TorchImplementation(fn, device, tuple(inputs))


class TorchImplementation(FrameworkImplementation):
    """A torch function seen as a NumPy implementation (see :func:`from_torch`)."""

    adapter = "from_torch"

    def __call__(self, *sequences, **kwargs) -> Result:
        torch = _torch()
        with torch.no_grad():
            positional = [self._tensor(x) for x in named(self.inputs, sequences).values()]
            out, lse = split_result(self.fn(*positional, **self._keywords(kwargs)))
        return Result(out=_numpy(out), lse=None if lse is None else _numpy(lse))

    def vjp(self, dout, *sequences, dlse=None, **kwargs) -> dict:
        """Gradients of every floating-point array argument for cotangents ``dout`` (and ``dlse``).

        An argument the function does not use gets a zero gradient. ``dlse``
        is used only when the function returns a log-sum-exp.
        """
        torch = _torch()
        arrays = {**named(self.inputs, sequences), **{n: x for n, x in kwargs.items() if isinstance(x, np.ndarray)}}
        tensors = {n: self._tensor(x) for n, x in arrays.items()}
        leaves = {n: t.requires_grad_() for n, t in tensors.items() if t.is_floating_point()}
        others = {n: x for n, x in kwargs.items() if n not in tensors}
        positional = [tensors.pop(n) for n in self.inputs]
        out, lse = split_result(self.fn(*positional, **tensors, **others))
        outputs, cotangents = [out], [self._tensor(dout).to(out.dtype)]
        if lse is not None and dlse is not None:
            outputs.append(lse)
            cotangents.append(self._tensor(dlse).to(lse.dtype))
        grads = torch.autograd.grad(outputs, list(leaves.values()), cotangents, allow_unused=True)
        return {name: np.zeros(arrays[name].shape) if g is None else _numpy(g) for name, g in zip(leaves, grads)}

    def _keywords(self, kwargs: dict) -> dict:
        return {n: self._tensor(x) if isinstance(x, np.ndarray) else x for n, x in kwargs.items()}

    def _tensor(self, x: np.ndarray):
        """A NumPy array as a tensor of the matching dtype on the adapter's device."""
        torch = _torch()
        if x.dtype.name == "bfloat16":
            return torch.tensor(x.astype(np.float32), device=self.device).to(torch.bfloat16)
        if x.dtype.kind in "iu":
            return torch.tensor(x.astype(np.int64), device=self.device)
        return torch.tensor(x, device=self.device)


def _numpy(tensor) -> np.ndarray:
    """A tensor as a NumPy array (bfloat16 and float16 widened to float32, exactly)."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.element_size() < 4:
        tensor = tensor.float()
    return tensor.numpy()
