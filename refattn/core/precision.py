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

from dataclasses import dataclass

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
    """How one precision stores and computes intermediates."""

    name: str
    storage: np.dtype
    compute: np.dtype

    def load(self, x) -> np.ndarray:
        """An input as this precision sees it: rounded to storage, held in compute dtype."""
        return self.store(np.asarray(x))

    def store(self, x) -> np.ndarray:
        """Round a step's result to the storage dtype (identity in float64)."""
        x = np.asarray(x)
        if self.storage != np.float64:
            x = x.astype(self.storage)
        return x.astype(self.compute, copy=False)


FLOAT64 = Numerics("float64", STORAGE_DTYPES["float64"], np.dtype(np.float64))


def numerics(precision: str | None) -> Numerics:
    """The :class:`Numerics` for ``precision`` (``None`` means float64)."""
    if precision is None or precision == "float64":
        return FLOAT64
    if precision not in STORAGE_DTYPES:
        raise SpecError("precision", f"None or one of {list(PRECISIONS)}", repr(precision))
    return Numerics(precision, STORAGE_DTYPES[precision], np.dtype(np.float32))
