"""Input checks shared by every mechanism.

Each check either returns a cleaned value or raises :class:`SpecError` naming
the argument, what was expected and what was given. Nothing is broadcast,
truncated or padded silently.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .errors import MAX_GIVEN_CHARS, SpecError
from .precision import STORAGE_DTYPES

CAUSAL_ALIGNMENTS = ("bottom_right", "top_left")
#: Token positions are bounded so that every distance p_j - p_i is an exact
#: float64 (|p_j - p_i| <= 2**53) and an int64 that cannot overflow.
MAX_ABS_POSITION = 2**52
#: A window side larger than this reaches past any sequence (and any position,
#: :data:`MAX_ABS_POSITION`), so it is clamped to it: the same result as
#: unbounded, with no integer overflow in any backend.
MAX_WINDOW = 2**53
#: Scores may reach at most this fraction of the largest finite number of the
#: precision a backend computes in, so that ``s - max`` and the running sums
#: of an online softmax stay finite.
SCORE_HEADROOM = 1.0 / 16.0


def summary(x) -> str:
    """A short description of a value for an error message: an array's shape and dtype, or a cut ``repr``."""
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    text = f"{type(x).__name__} {x!r}" if not isinstance(x, str) else repr(x)
    return text if len(text) <= MAX_GIVEN_CHARS else text[: MAX_GIVEN_CHARS - 3] + "..."


def float_array(x, name: str) -> np.ndarray:
    """``x``, checked to be a finite real array (any float dtype, bfloat16 included, or integers).

    The array itself is returned, not a float64 copy: the reference converts
    as its precision says, and a kernel given float32 at 64K tokens must not
    hold float64 copies of its inputs.
    """
    if not isinstance(x, np.ndarray):
        raise SpecError(name, "a numpy array", summary(x))
    if x.dtype not in STORAGE_DTYPES.values() and x.dtype.kind not in "iu":
        raise SpecError(name, "a real floating-point array", f"dtype {x.dtype}")
    if x.dtype.kind not in "iu":
        finite = np.isfinite(x)
        if not np.all(finite):
            bad = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise SpecError(name, "finite values", f"{x[bad]} at index {bad}")
    return x


@dataclass(frozen=True)
class AttentionShape:
    """The sizes of one attention call, read from ``q`` (B, Hq, Nq, D), ``k`` and ``v``."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head: query head h reads kv head h // group."""
        return self.q_heads // self.kv_heads

    @property
    def scores(self) -> tuple[int, int, int, int]:
        """Shape of the score matrix (B, Hq, Nq, Nk)."""
        return (self.batch, self.q_heads, self.q_len, self.kv_len)


def qkv(q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray, AttentionShape]:
    """Check q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); return float64 copies."""
    arrays = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, np.ndarray) and x.ndim != 4:
            raise SpecError(name, "4 dimensions (B, H, N, D)", f"shape {x.shape}")
        arrays[name] = float_array(x, name)
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    b, hq, nq, d = q.shape
    if k.shape[0] != b:
        raise SpecError("k", f"batch {b} (as q)", f"batch {k.shape[0]} (shape {k.shape})")
    if v.shape[:3] != k.shape[:3]:
        raise SpecError("v", f"(B, H, N) = {k.shape[:3]} (as k)", f"shape {v.shape}")
    if k.shape[3] != d:
        raise SpecError("k", f"head dim {d} (as q)", f"head dim {k.shape[3]}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise SpecError("k", f"a head count dividing q's {hq} heads (GQA/MQA)", f"{hkv} heads")
    if min(q.shape) == 0 or min(k.shape) == 0 or v.shape[3] == 0:
        raise SpecError("q, k, v", "non-empty dimensions", f"shapes {q.shape}, {k.shape}, {v.shape}")
    shape = AttentionShape(b, hq, hkv, nq, k.shape[2], d, v.shape[3])
    return q, k, v, shape


def broadcastable(x, name: str, target: tuple[int, ...], kind: str) -> np.ndarray:
    """Check ``x`` broadcasts to ``target`` (B, H, Nq, Nk) by right-aligned rules.

    ``kind`` is ``"bool"`` (masks, keep-masks) or ``"float"`` (biases).
    Returns ``x`` (bool, or float64) with its own shape, not broadcast.
    """
    if not isinstance(x, np.ndarray):
        raise SpecError(name, f"a {kind} numpy array broadcastable to {target}", summary(x))
    if kind == "bool" and x.dtype != np.bool_:
        raise SpecError(name, "dtype bool (True = may attend)", f"dtype {x.dtype}")
    if not 2 <= x.ndim <= len(target):
        raise SpecError(name, f"2 to {len(target)} dimensions broadcastable to {target}", f"shape {x.shape}")
    for size, want in zip(x.shape[::-1], target[::-1]):
        if size not in (1, want):
            raise SpecError(name, f"a shape broadcastable to {target}", f"shape {x.shape}")
    return x if kind == "bool" else float_array(x, name)


def real_number(x, name: str, *, minimum: float, inclusive: bool = True, maximum: float | None = None) -> float:
    """A finite real number in [minimum, maximum) (or (minimum, ...) if not inclusive)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise SpecError(name, "a real number", summary(x))
    x = float(x)
    low_ok = x >= minimum if inclusive else x > minimum
    high_ok = maximum is None or x < maximum
    if not (np.isfinite(x) and low_ok and high_ok):
        low = f"[{minimum}" if inclusive else f"({minimum}"
        high = f"{maximum})" if maximum is not None else "inf)"
        raise SpecError(name, f"a finite number in {low}, {high}", repr(x))
    return x


def scale(x, head_dim: int) -> float:
    """The logit scale: ``None`` means 1/sqrt(D); otherwise a finite number > 0. A Python float either way,
    so that it scales float32 scores in float32 (a NumPy float64 scalar would promote them to float64)."""
    if x is None:
        return 1.0 / math.sqrt(head_dim)
    return real_number(x, "scale", minimum=0.0, inclusive=False)


def window(x) -> tuple[int | None, int | None] | None:
    """``window=(left, right)``: each side a non-negative int, or None for unbounded."""
    if x is None:
        return None
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise SpecError("window", "a pair (left, right) of non-negative ints or None", summary(x))
    for side in x:
        if side is not None and (isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < 0):
            raise SpecError("window", "a pair (left, right) of non-negative ints or None", summary(tuple(x)))
    return tuple(None if side is None else min(int(side), MAX_WINDOW) for side in x)


def integer(x, name: str, *, minimum: int) -> int:
    """An integer (Python or NumPy, not a bool) of at least ``minimum``."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) or x < minimum:
        raise SpecError(name, f"an integer >= {minimum}", summary(x))
    return int(x)


def integer_array(x, name: str, ndim: int, shape: str) -> np.ndarray:
    """``x``, checked to be an integer numpy array of ``ndim`` dimensions (``shape`` names them)."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "iu" or x.ndim != ndim:
        raise SpecError(name, f"an integer numpy array of shape {shape}", summary(x))
    return x


def choice(x, name: str, options) -> str:
    """One of a fixed set of string options."""
    if not isinstance(x, str) or x not in options:
        raise SpecError(name, f"one of {list(options)}", summary(x))
    return x


def compute_dtype(*arrays: np.ndarray) -> np.dtype:
    """The precision kernels compute in for these inputs: float32 if any is float32 or narrower, else float64."""
    narrow = any(x.dtype.kind not in "iu" and x.dtype.itemsize <= 4 for x in arrays)
    return np.dtype(np.float32 if narrow else np.float64)


def scores_within_range(q, k, scale: float, names: str = "q, k", *, q_factor=1.0, k_factor=1.0,
                        normalised=()) -> None:  # fmt: skip
    """Raise :class:`SpecError` if the scores ``scale · q·k`` could overflow the precision kernels compute in.

    Every product a kernel forms is bounded by Cauchy-Schwarz over the last
    axis (the head dim): ``|q_i·k_j| ≤ P = max_i ‖q_i‖ · max_j ‖k_j‖``, and so
    is every partial sum of it. Kernels form ``q·k`` and then scale it, so both
    ``P`` and the largest score ``|scale| · P`` must stay below
    :data:`SCORE_HEADROOM` of the largest finite number of
    :func:`compute_dtype` (float64 for float64 inputs, float32 for float32,
    float16 and bfloat16), where ``s − max`` and the running sums of an online
    softmax stay finite. Beyond that a backend would produce ``inf`` scores and
    then NaN, or a silent fully masked row; every backend raises here instead,
    before computing. Call it from ``check_inputs`` once the scale is known.

    Parameters
    ----------
    q, k : ndarray (..., N, D), tuple of them, or float
        The vectors whose dot products form the scores, as the kernels use
        them. A tuple lists terms whose largest norms add: a sum (Transformer-XL's
        ``q + u``), terms scored separately and added (Shaw's ``q·k_j + q·a_ij``)
        or rows concatenated along the sequence (memory slots). A number is
        the largest norm of rows the kernel normalises first (LSH's unit keys).
    scale : float
        The factor applied to ``q·k``.
    names : str
        The arguments the message names.
    q_factor, k_factor : float or ndarray (N,)
        What the kernel multiplies each row by before the product, one number
        or one per position along the sequence axis (xPos's
        ``max_t ζ_t^(±n / scale_base)``, log-n's ``log n``).
    normalised : tuple of (ndarray, float)
        Arrays ``x`` and factors ``c`` whose squared row norms ``‖c · x_i‖²`` the
        kernel forms to normalise them (LSH's keys, routing's routing
        vectors); they must stay in range too.
    """
    arrays = [x for side in (q, k) for x in (side if isinstance(side, tuple) else (side,)) if isinstance(x, np.ndarray)]
    arrays += [x for x, _ in normalised]
    dtype = compute_dtype(*arrays)
    limit = float(np.finfo(dtype).max) * SCORE_HEADROOM
    within = f"below {limit:.3g} (the {dtype} range a kernel computes in)"
    for x, factor in normalised:
        norm = float(abs(factor)) * _largest_row_norm(x)
        squared = norm * norm  # inf, not OverflowError, beyond float64
        if not squared <= limit:
            raise SpecError(names, f"squared norms of the vectors a kernel normalises {within}",
                            f"values whose squared norms reach {squared:.3g}")  # fmt: skip
    product = _largest_norm(q, q_factor) * _largest_norm(k, k_factor)
    largest = abs(scale) * product
    if not max(product, largest) <= limit:
        raise SpecError(names, f"scores |scale * q.k| and products |q.k| {within}",
                        f"values whose scores may reach {largest:.3g} (|q.k| up to {product:.3g}, scale {scale:.3g})")


def _largest_norm(x, factor) -> float:
    """The largest norm of the rows ``factor · x`` (or of sums of rows of a tuple's terms), in float64."""
    if isinstance(x, tuple):
        return sum(_largest_norm(term, factor) for term in x)
    if not isinstance(x, np.ndarray):
        return float(x) * float(np.max(np.abs(factor)))
    with np.errstate(over="ignore"):
        return float(np.max(_row_norms(x) * np.abs(np.asarray(factor, np.float64))))


def _largest_row_norm(x: np.ndarray) -> float:
    """``max_i ‖x_i‖₂`` over the last axis, in float64 (inf only when it exceeds float64)."""
    return float(np.max(_row_norms(x)))


#: Rows per slice of :func:`_row_norms`: its float64 temporaries stay small (at N = 64K a whole-array float64
#: copy of q was 1.7 s of an H-1D call, most of it page faults).
ROW_NORM_SLICE = 1 << 12


def _row_norms(x: np.ndarray) -> np.ndarray:
    """``‖x_i‖₂`` over the last axis, (..., N), float64, computed without overflow (inf only beyond float64)."""
    top = float(max(np.max(x, initial=0.0), -np.min(x, initial=0.0)))
    if top == 0.0:
        return np.zeros(x.shape[:-1])
    rows = x.reshape(-1, x.shape[-1])
    norms = np.empty(rows.shape[0])
    with np.errstate(over="ignore"):
        for start in range(0, rows.shape[0], ROW_NORM_SLICE):
            part = rows[start : start + ROW_NORM_SLICE].astype(np.float64) / top
            norms[start : start + ROW_NORM_SLICE] = np.sqrt(np.einsum("nd,nd->n", part, part))
    return top * norms.reshape(x.shape[:-1])


def flag(x, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise SpecError(name, "True or False", summary(x))
    return bool(x)


def cotangent(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A cotangent (``dout``, ``dlse``) of exactly the output's shape."""
    if isinstance(x, np.ndarray) and x.shape != shape:
        raise SpecError(name, f"shape {shape} (the output's)", f"shape {x.shape}")
    return float_array(x, name)


def positions(x, name: str, length: int | None = None) -> np.ndarray:
    """``x`` as int64, checked to be a 1-D integer array of ``length`` token positions.

    Positions are the tokens' positions in their sequence, not array indices:
    cached decoding passes ``offset + arange(Nq)``, packed sequences restart at
    0, and they may be negative or unsorted. ``length=None`` accepts any
    non-empty length. Booleans and floats are rejected; magnitudes are bounded
    by :data:`MAX_ABS_POSITION`.
    """
    count = "at least 1 position" if length is None else f"shape ({length},), one position per token"
    if not isinstance(x, np.ndarray):
        raise SpecError(name, f"a 1-D integer numpy array of positions, {count}", summary(x))
    if x.dtype.kind not in "iu":
        raise SpecError(name, "an integer dtype (positions are token indices)", f"dtype {x.dtype}")
    if x.ndim != 1 or (x.size == 0 if length is None else x.shape[0] != length):
        raise SpecError(name, f"a 1-D array of positions, {count}", f"shape {x.shape}")
    if max(abs(int(x.min())), abs(int(x.max()))) > MAX_ABS_POSITION:
        raise SpecError(name, "positions of magnitude at most 2**52 (exact distances)", f"values {x.min()} to {x.max()}")
    return x.astype(np.int64)
