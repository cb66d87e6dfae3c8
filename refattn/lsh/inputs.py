"""Checked inputs of one LSH-attention call, shared by every LSH backend.

The registry calls :func:`check_lsh_inputs` once, before any backend runs, so
bad input is rejected identically whichever backend is asked for.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..core import checks
from ..core.errors import SpecError
from ..core.presets import FROM_PRESET
from .presets import (
    DUP_COUNTS,
    KEY_NORMS,
    MASK_MODES,
    PADDING_BUCKETS,
    PADDING_MARKS,
    PARAMETERS,
    PRESETS,
    SHORT_SEQUENCE,
    Preset,
    preset_values,
)


@dataclass(frozen=True)
class LSHInputs:
    """Checked arguments of one call; arrays in the caller's dtype.

    ``factors`` are the bucket counts of the hash factors (one for an int
    ``num_buckets``); ``rotations`` is (B, H, R, D, P) with ``R = num_hashes``,
    broadcast along the batch when it was given as (H, R, D, P); ``valid`` is
    ``key_padding_mask`` broadcast to (B, N), or None.
    """

    qk: np.ndarray  # (B, H, N, D)
    v: np.ndarray  # (B, H, N, Dv)
    rotations: np.ndarray  # (B, H, R, D, P), P = sum(factors) // 2
    factors: tuple[int, ...]
    num_hashes: int
    chunk_len: int
    num_chunks_before: int
    num_chunks_after: int
    causal: bool
    valid: np.ndarray | None  # (B, N) bool, True = real token
    scale: float
    key_norm: str
    key_norm_eps: float
    self_mask_value: float
    mask_value: float | None
    mask_mode: str
    mask_padded_queries: bool
    padding_marks: str
    padding_bucket: str
    dup_correction: bool
    dup_count: str
    short_sequence: str
    return_rounds: bool

    def cotangent_shapes(self) -> dict:
        """Shapes of ``dout`` and ``dlse``: those of ``out`` (B, H, N, Dv) and ``lse`` (B, H, N)."""
        return {"dout": self.v.shape, "dlse": self.v.shape[:3]}

    @property
    def length(self) -> int:
        return self.qk.shape[2]

    @property
    def num_buckets(self) -> int:
        """Buckets of one round from hashing: the product of the factors."""
        return int(np.prod(self.factors))

    @property
    def short(self) -> bool:
        """Whether this call takes the short-sequence path (one dense round)."""
        return self.short_sequence == "full" and self.length <= self.chunk_len

    @property
    def has_padding_bucket(self) -> bool:
        """Whether padded tokens get the extra bucket (step (3))."""
        return has_padding_bucket(self.valid, self.padding_bucket)


def has_padding_bucket(valid: np.ndarray | None, rule: str) -> bool:
    """Whether step (3) adds the padding bucket: ``rule`` is ``padding_bucket``, ``valid`` the (B, N) mask.

    ``"if_mask"`` (trax): whenever a mask is given. ``"if_padded"`` (HF): when
    some token of the *batch* is padded, so one padded sequence moves every
    sequence's round offsets. ``"none"`` (lucidrains): never.
    """
    if valid is None or rule == "none":
        return False
    return rule == "if_mask" or not bool(np.all(valid))


def _integer(x, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < minimum:
        raise SpecError(name, f"an integer >= {minimum}", checks.summary(x))
    return int(x)


def bucket_factors(num_buckets) -> tuple[int, ...]:
    """``num_buckets`` as a tuple of even factors: ``8`` -> ``(8,)``, ``[4, 6]`` -> ``(4, 6)``."""
    expected = "an even int >= 2, or a non-empty list of them (factorised buckets)"
    given = list(num_buckets) if isinstance(num_buckets, (list, tuple)) else [num_buckets]
    if not given:
        raise SpecError("num_buckets", expected, checks.summary(num_buckets))
    for factor in given:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 2 or factor % 2:
            raise SpecError("num_buckets", expected, checks.summary(num_buckets))
    return tuple(int(f) for f in given)


def checked_rotations(rotations, batch: int, heads: int, num_hashes: int, head_dim: int, factors: tuple[int, ...]) -> np.ndarray:
    """(H, R, D, P) or (B, H, R, D, P) -> (B, H, R, D, P), P = sum of factor / 2."""
    half = sum(factors) // 2
    wanted = f"(H, R, D, P) = {(heads, num_hashes, head_dim, half)} or (B, H, R, D, P) = {(batch, heads, num_hashes, head_dim, half)}"
    if not isinstance(rotations, np.ndarray) or rotations.ndim not in (4, 5):
        given = f"shape {rotations.shape}" if isinstance(rotations, np.ndarray) else type(rotations).__name__
        raise SpecError("rotations", wanted, given)
    if rotations.shape[-4:] != (heads, num_hashes, head_dim, half) or (rotations.ndim == 5 and rotations.shape[0] != batch):
        raise SpecError("rotations", wanted, f"shape {rotations.shape}")
    rotations = checks.float_array(rotations, "rotations")
    return np.broadcast_to(rotations, (batch, heads, num_hashes, head_dim, half))


def checked_key_padding_mask(mask, batch: int, length: int) -> np.ndarray | None:
    if mask is None:
        return None
    wanted = f"a bool array of shape (B, N) = {(batch, length)} or (1, N), True = real token"
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        given = f"dtype {mask.dtype}, shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise SpecError("key_padding_mask", wanted, given)
    if mask.shape[0] not in (1, batch) or mask.shape[1] != length:
        raise SpecError("key_padding_mask", wanted, f"shape {mask.shape}")
    return np.broadcast_to(mask, (batch, length))


def _optional_finite(x, name: str) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not np.isfinite(x):
        raise SpecError(name, "a finite number, or None (masked entries excluded exactly)", checks.summary(x))
    return float(x)


def _finite(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not np.isfinite(x):
        raise SpecError(name, "a finite number", checks.summary(x))
    return float(x)


def resolve_preset(preset, overrides: dict) -> tuple[Preset, dict]:
    """The preset and every preset-controlled value, explicit arguments winning.

    ``overrides`` maps parameter names to the caller's arguments, with
    :data:`FROM_PRESET` where the caller gave none.
    """
    if not (preset is None or isinstance(preset, str)) or preset not in PRESETS:
        raise SpecError("preset", f"None or one of {[p for p in PRESETS if p]}", checks.summary(preset))
    chosen = PRESETS[preset]
    values = preset_values(chosen)
    values.update({name: value for name, value in overrides.items() if value is not FROM_PRESET})
    return chosen, values


def _check_length_rule(rule: str, preset: str | None, length: int, num_hashes: int, chunk_len: int) -> None:
    if rule == "rounds_multiple" and (num_hashes * length) % chunk_len:
        raise SpecError(
            "chunk_len",
            f"a divisor of num_hashes · N = {num_hashes * length} (the {preset} preset reshapes the sorted rounds into chunks)",
            repr(chunk_len),
        )
    if rule == "double_chunk" and length % (2 * chunk_len):
        raise SpecError(
            "chunk_len", f"N = {length} divisible by 2 · chunk_len (the {preset} preset asserts it)", repr(chunk_len)
        )


def check_lsh_inputs(
    qk, v, *, rotations, num_buckets, num_hashes, chunk_len, causal, key_padding_mask, num_chunks_before,
    num_chunks_after, key_norm, key_norm_eps, scale, self_mask_value, mask_value, mask_mode, mask_padded_queries,
    padding_marks, padding_bucket, dup_correction, dup_count, short_sequence, preset, return_rounds,
) -> LSHInputs:  # fmt: skip
    """Check every argument of ``lsh_attention``; raise :class:`SpecError` on the first bad one.

    The preset-controlled arguments (``presets.PARAMETERS``) are
    :data:`~refattn.core.presets.FROM_PRESET` where the caller gave none.
    """
    arguments = locals()
    for name, x in (("qk", qk), ("v", v)):
        if isinstance(x, np.ndarray) and x.ndim != 4:
            raise SpecError(name, "4 dimensions (B, H, N, D)", f"shape {x.shape}")
        checks.float_array(x, name)
    if v.shape[:3] != qk.shape[:3]:
        raise SpecError("v", f"(B, H, N) = {qk.shape[:3]} (as qk)", f"shape {v.shape}")
    if min(qk.shape) == 0 or v.shape[3] == 0:
        raise SpecError("qk, v", "non-empty dimensions", f"shapes {qk.shape}, {v.shape}")
    batch, heads, length, head_dim = qk.shape
    factors = bucket_factors(num_buckets)
    num_hashes = _integer(num_hashes, "num_hashes", 1)
    chunk_len = _integer(chunk_len, "chunk_len", 1)
    rotations = checked_rotations(rotations, batch, heads, num_hashes, head_dim, factors)
    chosen, p = resolve_preset(preset, {name: arguments[name] for name in PARAMETERS})
    inputs = LSHInputs(
        qk=qk,
        v=v,
        rotations=rotations,
        factors=factors,
        num_hashes=num_hashes,
        chunk_len=chunk_len,
        num_chunks_before=_integer(p["num_chunks_before"], "num_chunks_before", 0),
        num_chunks_after=_integer(p["num_chunks_after"], "num_chunks_after", 0),
        causal=checks.flag(causal, "causal"),
        valid=checked_key_padding_mask(key_padding_mask, batch, length),
        scale=checks.scale(p["scale"], head_dim),
        key_norm=checks.choice(p["key_norm"], "key_norm", KEY_NORMS),
        key_norm_eps=checks.real_number(p["key_norm_eps"], "key_norm_eps", minimum=0.0, inclusive=False),
        self_mask_value=_finite(p["self_mask_value"], "self_mask_value"),
        mask_value=_optional_finite(p["mask_value"], "mask_value"),
        mask_mode=checks.choice(p["mask_mode"], "mask_mode", MASK_MODES),
        mask_padded_queries=checks.flag(p["mask_padded_queries"], "mask_padded_queries"),
        padding_marks=checks.choice(p["padding_marks"], "padding_marks", PADDING_MARKS),
        padding_bucket=checks.choice(p["padding_bucket"], "padding_bucket", PADDING_BUCKETS),
        dup_correction=checks.flag(p["dup_correction"], "dup_correction"),
        dup_count=checks.choice(p["dup_count"], "dup_count", DUP_COUNTS),
        short_sequence=checks.choice(p["short_sequence"], "short_sequence", SHORT_SEQUENCE),
        return_rounds=checks.flag(return_rounds, "return_rounds"),
    )
    if not inputs.short:
        _check_length_rule(chosen.length_rule, chosen.name, length, num_hashes, chunk_len)
    # (6) forms |x|² to make the keys u = x / ρ, |u| <= 1; (7) s = scale · x·u.
    checks.scores_within_range(qk, 1.0, inputs.scale, "qk", normalised=((qk, 1.0),))
    return inputs
