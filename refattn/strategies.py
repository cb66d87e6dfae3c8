"""Hypothesis strategies for attention problems (public: fuzz your own kernel with them).

Every registered mechanism has a strategy of complete problems,
:func:`problems`, found through the registry in ``<package>/strategies.py``
(``problems(precision=...)``): inputs, parameters and explicit randomness
(rotations, centroids, projections, keep-masks). This module keeps the
building blocks they share: awkward sizes (:func:`shapes`), value scales,
masks, windows, the dense problem most mechanisms extend
(:func:`dense_problems`), and the rule for discrete decisions
(:func:`tie_margin`).

Arrays are drawn from ``numpy.random.default_rng(seed)`` with the seed drawn
by Hypothesis, so examples are cheap, reproducible and shrink by seed, while
shapes, options and value scales shrink structurally (toward one head, short
sequences, small head dims and no options).

Example
-------
>>> from hypothesis import given
>>> from refattn.strategies import problems
>>> @given(problems("dense", precision="float32"))
... def test_mine(problem):
...     out = problem.call(my_attention)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from .conformance.tolerance import unit_roundoff
from .core import checks, registry
from .core.errors import SpecError
from .core.precision import PRECISIONS

#: Head dims that catch kernels assuming powers of two or multiples of 8.
AWKWARD_HEAD_DIMS = (1, 3, 8, 17, 59, 64)
#: (Hq, Hkv) pairs: MHA, GQA 4:2, 8:2 and MQA 8:1, 3:1.
HEAD_LAYOUTS = ((1, 1), (2, 2), (4, 2), (8, 2), (8, 1), (3, 1))
#: Standard deviations of q and k: tiny, ordinary and large logits.
VALUE_SCALES = (0.01, 1.0, 4.0, 30.0)
#: A discrete decision (bucket, cluster, top-k member) is drawn only when its
#: margin, in its mechanism's units (a gap divided by the size rounding can
#: move it by, e.g. :func:`refattn.lsh.bucket_margins`), is at least this many
#: unit roundoffs of the precision under test: rounding the inputs and
#: computing in another order then cannot flip it, so an implementation in
#: that precision must reproduce every decision exactly.
TIE_ROUNDOFFS = 16.0
#: Largest seed handed to ``numpy.random.default_rng``.
MAX_SEED = 2**32 - 1


def tie_margin(precision: str) -> float:
    """The smallest decision margin drawn for ``precision`` (:data:`TIE_ROUNDOFFS` unit roundoffs)."""
    return TIE_ROUNDOFFS * unit_roundoff(checks.choice(precision, "precision", PRECISIONS))


def seeds() -> st.SearchStrategy[int]:
    """Seeds of ``numpy.random.default_rng``; they shrink toward 0."""
    return st.integers(0, MAX_SEED)


@st.composite
def generators(draw) -> np.random.Generator:
    """A ``numpy.random.default_rng`` seeded by a drawn seed."""
    return np.random.default_rng(draw(seeds()))


@dataclass(frozen=True)
class MechanismProblem:
    """One drawn problem of a registered mechanism: arguments of its public function.

    Attributes
    ----------
    mechanism : str
        Registry name.
    arguments : dict
        Every argument the problem sets: the positional inputs (``q``, ``k``,
        ``v``; ``qk``, ``v``...), keyword arrays (masks, positions, rotations,
        centroids) and JSON parameters (``causal``, ``window``, ``preset``...).
        Arguments left out take the function's defaults.
    """

    mechanism: str
    arguments: dict = field(default_factory=dict)

    @property
    def positional(self) -> tuple[str, ...]:
        """The inputs passed positionally, in order (the mechanism's ``positional``)."""
        return registry.get(self.mechanism).positional

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The array arguments: positional inputs first, then keyword arrays."""
        arrays = {name: x for name, x in self.arguments.items() if isinstance(x, np.ndarray)}
        return {**{name: arrays.pop(name) for name in self.positional}, **arrays}

    @property
    def params(self) -> dict:
        """The other arguments (JSON values: numbers, strings, lists, None)."""
        return {name: x for name, x in self.arguments.items() if not isinstance(x, np.ndarray)}

    @property
    def preset(self) -> str | None:
        return self.arguments.get("preset")

    def call(self, function, *leading, **extra):
        """``function(*leading, *positional inputs, **keyword arguments, **extra)``."""
        arrays = self.arrays
        positional = [arrays.pop(name) for name in self.positional]
        return function(*leading, *positional, **arrays, **self.params, **extra)

    def describe(self) -> str:
        """One line per argument: arrays by dtype and shape, parameters by value."""
        lines = [f"{name}: {x.dtype}{list(x.shape)}" for name, x in self.arrays.items()]
        return "\n".join(lines + [f"{name} = {value!r}" for name, value in self.params.items()])


def problems(mechanism: str, precision: str = "float64") -> st.SearchStrategy[MechanismProblem]:
    """Problems of ``mechanism`` whose discrete decisions are far from ties at ``precision``.

    Raises
    ------
    SpecError
        For an unknown mechanism or precision, or a mechanism without strategies.
    """
    registered = registry.get(mechanism)
    checks.choice(precision, "precision", PRECISIONS)
    try:
        module = importlib.import_module(registered.strategies)
    except ModuleNotFoundError as error:
        if error.name != registered.strategies:
            raise
        raise SpecError("mechanism", f"a mechanism with Hypothesis strategies ({registered.strategies})", repr(mechanism)) from None
    return module.problems(precision=precision)


@dataclass(frozen=True)
class Shape:
    """Sizes of one attention call."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int

    @property
    def scores(self) -> tuple[int, int, int, int]:
        return (self.batch, self.q_heads, self.q_len, self.kv_len)


@dataclass(frozen=True)
class Problem:
    """One drawn dense-attention problem: arrays, keyword parameters, its shape."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    params: dict = field(default_factory=dict)
    shape: Shape | None = None

    @property
    def qkv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.q, self.k, self.v

    def of(self, mechanism: str, **arguments) -> MechanismProblem:
        """This problem as one of ``mechanism`` (a dense-like one), with its own ``arguments`` added."""
        return MechanismProblem(mechanism, {"q": self.q, "k": self.k, "v": self.v, **self.params, **arguments})


@st.composite
def shapes(draw, max_batch: int = 2, max_len: int = 33, head_dims=AWKWARD_HEAD_DIMS, head_layouts=HEAD_LAYOUTS) -> Shape:
    """Awkward attention sizes: GQA/MQA layouts, ``Nq != Nk``, ``N = 1``, odd lengths, odd D."""
    q_heads, kv_heads = draw(st.sampled_from(head_layouts))
    head_dim = draw(st.sampled_from(head_dims))
    value_dim = draw(st.one_of(st.just(head_dim), st.sampled_from(head_dims)))
    return Shape(
        batch=draw(st.integers(1, max_batch)),
        q_heads=q_heads,
        kv_heads=kv_heads,
        q_len=draw(st.integers(1, max_len)),
        kv_len=draw(st.integers(1, max_len)),
        head_dim=head_dim,
        value_dim=value_dim,
    )


def random_qkv(shape: Shape, seed: int, value_scale: float = 1.0, dtype=np.float64):
    """q, k ~ N(0, value_scale²) and v ~ N(0, 1) for ``shape``."""
    rng = np.random.default_rng(seed)
    q = value_scale * rng.standard_normal((shape.batch, shape.q_heads, shape.q_len, shape.head_dim))
    k = value_scale * rng.standard_normal((shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim))
    v = rng.standard_normal((shape.batch, shape.kv_heads, shape.kv_len, shape.value_dim))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@st.composite
def masks(draw, shape: Shape):
    """A bool mask broadcastable to (B, Hq, Nq, Nk): full, per-key padding, or per-head,
    sometimes with whole rows masked out."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b, h, nq, nk = shape.scores
    form = draw(st.sampled_from(["full", "padding", "per_head_2d"]))
    density = draw(st.sampled_from([0.2, 0.6, 0.95]))
    if form == "full":
        mask = rng.random((b, h, nq, nk)) < density
    elif form == "padding":
        mask = rng.random((b, 1, 1, nk)) < density
    else:
        mask = rng.random((h, nq, nk)) < density
    if draw(st.booleans()) and mask.shape[-2] > 1:
        mask[..., 0, :] = False  # a fully masked row
    return mask


@st.composite
def windows(draw, max_side: int = 40):
    """``(left, right)`` windows, sides possibly None (unbounded) or wider than any sequence drawn."""
    side = st.one_of(st.none(), st.integers(0, max_side))
    return (draw(side), draw(side))


@st.composite
def dense_problems(
    draw,
    max_len: int = 33,
    options: tuple[str, ...] = ("mask", "bias", "causal", "window", "softcap", "scale", "dropout"),
    dtype=np.float64,
) -> Problem:
    """A dense-attention problem with any subset of ``options`` switched on.

    Only keyword arguments that :func:`refattn.dense_attention` accepts are produced.
    """
    shape = draw(shapes(max_len=max_len))
    value_scale = draw(st.sampled_from(VALUE_SCALES))
    q, k, v = random_qkv(shape, draw(st.integers(0, 2**32 - 1)), value_scale, dtype)
    params = {}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if "mask" in options and draw(st.booleans()):
        params["mask"] = draw(masks(shape))
    if "bias" in options and draw(st.booleans()):
        bias_shape = draw(st.sampled_from([shape.scores, (1, shape.q_heads, 1, shape.kv_len), shape.scores[-2:]]))
        params["bias"] = rng.standard_normal(bias_shape)
    if "causal" in options and draw(st.booleans()):
        params["causal"] = True
        params["causal_alignment"] = draw(st.sampled_from(["bottom_right", "top_left"]))
    if "window" in options and draw(st.booleans()):
        params["window"] = draw(windows())
        params.setdefault("causal_alignment", draw(st.sampled_from(["bottom_right", "top_left"])))
    if "softcap" in options and draw(st.booleans()):
        params["softcap"] = draw(st.sampled_from([0.5, 5.0, 50.0]))
    if "scale" in options and draw(st.booleans()):
        params["scale"] = draw(st.sampled_from([0.05, 1.0, 3.0]))
    if "dropout" in options and draw(st.booleans()):
        params["dropout_p"] = draw(st.sampled_from([0.1, 0.5]))
        params["dropout_keep"] = rng.random(shape.scores) >= params["dropout_p"]
    return Problem(q, k, v, params, shape)


@st.composite
def positions(draw, q_len: int, kv_len: int, max_offset: int = 100, spread: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(q_positions, k_positions)``, int64: a KV cache at an offset (queries the last ``Nq`` positions), or
    sorted positions with gaps (packed, scattered) within ``spread`` times the length, shrinking to the first."""
    offset = draw(st.integers(-max_offset, max_offset))
    if draw(st.booleans()):
        return offset + kv_len - q_len + np.arange(q_len), offset + np.arange(kv_len)
    rng = draw(generators())
    k_positions = offset + np.sort(rng.choice(spread * kv_len, size=kv_len, replace=False))
    q_positions = offset + np.sort(rng.integers(0, spread * kv_len, size=q_len))
    return q_positions, k_positions
