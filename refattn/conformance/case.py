"""The conformance case type. Imports nothing of refattn, so that every
mechanism's ``cases.py`` can use it without depending on the rest of
``refattn.conformance``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np


@dataclass(frozen=True)
class Case:
    """One named, deterministic conformance case.

    Attributes
    ----------
    id : str
        Unique, stable, ``"<mechanism>/<name>"``; also the file stem.
    mechanism : str
        Registry name of the mechanism.
    description : str
        One sentence: what the case exercises.
    flags : tuple of str
        Bug classes the case is built to catch (described in
        ``refattn/conformance/flags.py``).
    seed : int
        Seed of ``numpy.random.default_rng`` handed to ``arrays``; the
        cotangents are drawn from the same generator afterwards.
    arrays : callable
        ``arrays(rng) -> dict[str, ndarray]``: every array argument of the
        forward (``q``, ``k``, ``v``, ``bias``, ``mask``, ...).
    params : dict
        JSON-serialisable keyword arguments (``causal``, ``window``, ...).
    differentiable : tuple of str
        Array arguments that get gradients (stored as ``input.*``); the
        other arrays are ``param.*``.
    preset : str or None
        Compatibility preset, for mechanisms that have them.
    grad : bool
        Whether the case stores gradients.
    not_a_derivative : str or None
        Why the stored VJP is, at this case, not the derivative of the forward
        (so finite differences cannot check it), or None. Two reasons occur:
        a decision exactly on a tie (the VJP holds the decision fixed, while a
        perturbation in any direction moves it), and a preset whose source
        detaches a term from its gradient (the VJP reproduces the source).
    """

    id: str
    mechanism: str
    description: str
    flags: tuple[str, ...]
    seed: int
    arrays: Callable[[np.random.Generator], dict]
    params: dict = field(default_factory=dict)
    differentiable: tuple[str, ...] = ("q", "k", "v")
    preset: str | None = None
    grad: bool = True
    not_a_derivative: str | None = None

    @property
    def exact_ties(self) -> bool:
        """Whether the case is a tie case (flag :data:`EXACT_TIES`): its decisions sit on exact ties."""
        return EXACT_TIES in self.flags


#: The flag of a tie case: some of its decisions sit on exact ties, made by
#: duplicated (or all-zero) tokens, whose order the spec fixes. Export gives such a
#: case rounding trials that keep duplicated values bit-identical
#: (refattn.conformance.tolerance.tie_preserving_inputs), and the verifier names a
#: failed decision of such a case a tie-order difference. Every mechanism with tie
#: cases quotes :data:`EXACT_TIES_DESCRIPTION` in its ``FLAGS``.
EXACT_TIES = "EXACT_TIES"
EXACT_TIES_DESCRIPTION = (
    "Some decisions of the case sit on exact ties, made by duplicated or all-zero tokens, which every precision "
    "reproduces bit for bit; the spec fixes their order (the lower position, or the lower index, first). Fails an "
    "implementation that breaks those ties in another order (torch.topk leaves the order of equal values "
    "unspecified). A failed decision of such a case is reported as a tie-order difference."
)


# --------------------------------------------------------------------------
# Case building, shared by every mechanism's cases.py.
#
# A case's arrays are drawn from ``default_rng(seed)`` with the seed the
# CRC-32 of the case id, so adding, removing or reordering cases never
# changes another case's data. ``draw`` draws q, k, v first and then the
# extra arrays in the order given: that order is part of each case's data.
# --------------------------------------------------------------------------


class Dims(NamedTuple):
    """Sizes of one case: q (b, hq, nq, d), k (b, hkv, nk, d), v (b, hkv, nk, dv); dv = d when None."""

    b: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    dv: int | None = None

    @property
    def scores(self) -> tuple[int, int, int, int]:
        """The full score shape (B, Hq, Nq, Nk)."""
        return (self.b, self.hq, self.nq, self.nk)

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.hq, self.nq, self.d)

    @property
    def k_shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.hkv, self.nk, self.d)

    @property
    def v_shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.hkv, self.nk, self.d if self.dv is None else self.dv)


#: ``maker(rng, dims) -> ndarray``: one array of a case.
ArrayMaker = Callable[[np.random.Generator, Dims], np.ndarray]


def case_seed(case_id: str) -> int:
    """The seed of a case: the CRC-32 of its id."""
    return zlib.crc32(case_id.encode())


def normal(shape_of: Callable[[Dims], tuple], std: float = 1.0) -> ArrayMaker:
    """A float array of standard deviation ``std`` and shape ``shape_of(dims)``."""
    return lambda rng, dims: std * rng.standard_normal(shape_of(dims))


def random_mask(shape_of: Callable[[Dims], tuple], keep: float) -> ArrayMaker:
    """A boolean mask, each entry True with probability ``keep``."""
    return lambda rng, dims: rng.random(shape_of(dims)) < keep


def every_row_has_a_key(mask_maker: ArrayMaker) -> ArrayMaker:
    """``mask_maker``'s mask with one random key allowed in every query row (no fully masked row)."""

    def make(rng, dims):
        mask = mask_maker(rng, dims)
        rows = mask.reshape(-1, mask.shape[-1])
        rows[np.arange(rows.shape[0]), rng.integers(0, mask.shape[-1], rows.shape[0])] = True
        return mask

    return make


def with_empty_rows(mask_maker: ArrayMaker, rows: list[tuple[int, int, int]]) -> ArrayMaker:
    """``mask_maker``'s (B, H, Nq, Nk) mask with the rows (b, h, i) fully masked."""

    def make(rng, dims):
        mask = mask_maker(rng, dims)
        for b, h, i in rows:
            mask[b, h, i, :] = False
        return mask

    return make


def key_padding(lengths: tuple[int, ...]) -> ArrayMaker:
    """(B, 1, 1, Nk) mask: batch element b attends to its first ``lengths[b]`` keys."""
    return lambda rng, dims: (np.arange(dims.nk) < np.array(lengths)[:, None])[:, None, None, :]


def query_and_key_padding(lengths: tuple[int, ...]) -> ArrayMaker:
    """(B, 1, Nq, Nk) mask for self-attention over padded sequences: padded queries see nothing."""

    def make(rng, dims):
        valid = np.arange(dims.nq) < np.array(lengths)[:, None]  # (B, N)
        return (valid[:, :, None] & valid[:, None, :])[:, None]

    return make


def draw(dims: Dims, extra: dict[str, ArrayMaker] | None = None, *, std: float = 1.0, v_std: float = 1.0):
    """``arrays(rng)``: q and k of standard deviation ``std``, v of ``v_std``, then ``extra`` in order."""

    def arrays(rng: np.random.Generator) -> dict:
        out = {
            "q": std * rng.standard_normal(dims.q_shape),
            "k": std * rng.standard_normal(dims.k_shape),
            "v": v_std * rng.standard_normal(dims.v_shape),
        }
        for name, make in (extra or {}).items():
            out[name] = make(rng, dims)
        return out

    return arrays


def make_case(mechanism: str, name: str, description: str, flags: tuple[str, ...],
              arrays: Callable[[np.random.Generator], dict], **fields) -> Case:  # fmt: skip
    """The case ``<mechanism>/<name>``, seeded by its id; ``fields`` are :class:`Case`'s other fields."""
    case_id = f"{mechanism}/{name}"
    return Case(id=case_id, mechanism=mechanism, description=description, flags=tuple(flags),
                seed=case_seed(case_id), arrays=arrays, **fields)  # fmt: skip
