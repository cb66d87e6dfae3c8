"""Precision emulation: run the float64 reference as a lower-precision kernel would.

The reference computes in float64. To set tolerances for float32, float16 and
bfloat16 implementations we need the error the *same algorithm* makes in that
precision, so the reference can be evaluated under a :class:`Numerics` that

* stores every named intermediate in the *storage* dtype (inputs are rounded
  to it on entry, and each step's result is rounded to it), and
* computes each step (contractions, exp, sums) in the *compute* dtype:
  float64 for float64, float32 otherwise. This is what GPU kernels do for
  half types (float32 accumulation on tensor cores, FlashAttention's float32
  softmax statistics) and what a CPU float32 kernel does.

The emulated result is always returned as float64 by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np

from .errors import SpecError

STORAGE_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
PRECISIONS = tuple(STORAGE_DTYPES)


@dataclass(frozen=True)
class Numerics:
    """How one precision stores and computes intermediates.

    With ``jitter`` (a random generator), every input and every stored step
    is first moved by a random relative amount of at most one unit roundoff,
    so that it may round to the neighbouring value: the result is what an
    equally correct kernel that rounds at other points, or sums in another
    order, may compute. Inputs are jittered too because a contraction summed
    in another order is, by backward error analysis, the exact contraction of
    operands moved by a few unit roundoffs; moving only the result would miss
    the error of a dot product that cancels (``q·k`` near 0 with large
    ``|q|·|k|``). Tolerances take the largest error over a few such
    evaluations (refattn.conformance.tolerance), not the plain evaluation's
    error, which can be small by luck.
    """

    name: str
    storage: np.dtype
    compute: np.dtype
    jitter: np.random.Generator | None = field(default=None, compare=False)

    def load(self, x) -> np.ndarray:
        """An input as this precision sees it: rounded to storage, held in compute dtype."""
        return self.store(x)

    def store(self, x) -> np.ndarray:
        """Round a step's result to the storage dtype (identity in float64 without jitter)."""
        x = np.asarray(x)
        if self.jitter is not None:
            u = float(ml_dtypes.finfo(self.storage).eps) / 2.0
            x = x.astype(np.float64) * (1.0 + u * self.jitter.uniform(-1.0, 1.0, x.shape))  # keeps 0 and ±inf
        if self.storage != np.float64:
            x = x.astype(self.storage)
        return x.astype(self.compute, copy=False)


FLOAT64 = Numerics("float64", STORAGE_DTYPES["float64"], np.dtype(np.float64))


def numerics(precision: str | Numerics | None) -> Numerics:
    """The :class:`Numerics` for ``precision`` (``None`` means float64; a Numerics is itself)."""
    if isinstance(precision, Numerics):
        return precision
    if precision is None or precision == "float64":
        return FLOAT64
    if precision not in STORAGE_DTYPES:
        raise SpecError("precision", f"None or one of {list(PRECISIONS)}", repr(precision))
    return Numerics(precision, STORAGE_DTYPES[precision], np.dtype(np.float32))


def jittered(precision: str, seed: int) -> Numerics:
    """``numerics(precision)`` with randomised rounding (see :class:`Numerics`), seeded."""
    return replace(numerics(precision), jitter=np.random.default_rng(seed))
