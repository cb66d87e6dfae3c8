"""Longformer attention: a sliding band plus global tokens, the executable specification.

Beltagy, Peters & Cohan 2020, "Longformer: The Long-Document Transformer",
section 3.1: with window size ``w`` every token attends to ``w / 2`` tokens
on each side; tokens chosen as *global* attend to every token and every
token attends to them (symmetric), and global attention has its own
projections ``Q_g, K_g, V_g``. Equations in spec/segmented.md, "Longformer";
step numbers below match.

* (1) band: query ``i`` sees keys ``|i - j| <= w / 2``;
* (2) local rows (``i`` not global) see the band and every global key, each
  key once ("nothing counted twice": a global key inside the band is one
  key), with the local projections ``q, k, v``;
* (3) global rows see every key, with ``q_global, k_global, v_global``;
* (4) ``out`` and ``lse`` are the local rows' and the global rows' own.

The ``"hf"`` preset is HF transformers' ``LongformerModel``: it pads the
sequence to a multiple of ``attention_window`` with padding tokens that are
masked as keys (``LongformerModel._pad_to_window_size``), runs the layer,
and drops the padded rows. Real tokens' outputs do not change (a property);
the preset reproduces the padding so that an implementation that pads is
checked as it runs.

Einsum letters: b batch, h head, n token, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.results import Cotangents, Grads, Result
from ...dense import dense_attention, dense_attention_vjp
from ..pattern import SelfAttentionInputs, self_attention_qkv

PRESETS = (None, "hf")
GLOBAL_PROJECTIONS = ("q_global", "k_global", "v_global")


def longformer_attention(
    q, k, v, *,
    attention_window, global_tokens=None, q_global=None, k_global=None, v_global=None, preset=None,
    scale=None, precision=None, backend="reference") -> Result:
    """Sliding-band attention with symmetric global tokens (Longformer).

    Parameters
    ----------
    q : ndarray (B, Hq, N, D)
    k : ndarray (B, Hkv, N, D)
    v : ndarray (B, Hkv, N, Dv)
        The local projections (every row's band, and every row's view of the global keys).
    attention_window : int
        ``w``, even, ``>= 0``: ``w / 2`` keys on each side (HF's ``config.attention_window``).
        The ``"hf"`` preset needs ``w >= 2``.
    global_tokens : bool ndarray (B, N), optional
        Which tokens are global; None means none is.
    q_global : ndarray (B, Hq, N, D), optional
    k_global : ndarray (B, Hkv, N, D), optional
    v_global : ndarray (B, Hkv, N, Dv), optional
        The global projections, given all three or none (then the global rows
        use ``q, k, v``). Only the global rows of ``q_global`` are read.
    preset : {None, "hf"}
        ``"hf"``: pad to a multiple of ``attention_window`` as HF's
        ``LongformerModel`` does (padded keys masked, padded rows dropped).
    scale : float > 0, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv) and ``lse`` (B, Hq, N): of the local softmax on
        local rows, of the global softmax on global rows. ``aux`` is empty.
    """
    return registry.call_forward("longformer", locals())


longformer_attention_vjp = registry.vjp_function(
    longformer_attention, "longformer", grads="""    ``q``, ``k``, ``v`` and, when given, ``q_global``, ``k_global``,
    ``v_global`` (shapes of the inputs).""",
)


@dataclass(frozen=True)
class LongformerInputs(SelfAttentionInputs):
    """Checked arguments of :func:`longformer_attention`."""

    attention_window: int
    global_tokens: np.ndarray  # (B, N) bool
    projections: dict  # q_global, k_global, v_global when given
    preset: str | None
    scale: float

    @property
    def one_sided(self) -> int:
        """(1) ``w / 2``: keys on each side of the query."""
        return self.attention_window // 2

    @property
    def padded_len(self) -> int:
        """N, or (``"hf"``) N rounded up to a multiple of ``attention_window``."""
        n, w = self.shape.q_len, self.attention_window
        return n if self.preset is None else -(-n // w) * w


def check_longformer_inputs(q, k, v, *, attention_window, global_tokens, q_global, k_global, v_global, preset,
                            scale) -> LongformerInputs:  # fmt: skip
    """Check every argument of ``longformer_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = self_attention_qkv(q, k, v)
    if preset not in PRESETS:
        raise SpecError("preset", f"one of {list(PRESETS)}", checks.summary(preset))
    smallest = 2 if preset == "hf" else 0
    w = attention_window
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < smallest or w % 2:
        raise SpecError("attention_window", f"an even int >= {smallest} (w / 2 keys per side)", checks.summary(w))
    n = shape.q_len
    if global_tokens is None:
        global_tokens = np.zeros((shape.batch, n), dtype=bool)
    elif not isinstance(global_tokens, np.ndarray) or global_tokens.dtype != np.bool_ or global_tokens.shape != (shape.batch, n):
        raise SpecError("global_tokens", f"a bool array (B, N) = ({shape.batch}, {n})", checks.summary(global_tokens))
    given = {"q_global": q_global, "k_global": k_global, "v_global": v_global}
    if any(x is None for x in given.values()) and any(x is not None for x in given.values()):
        raise SpecError("q_global, k_global, v_global", "all three or none", f"{[n for n, x in given.items() if x is not None]}")
    projections = {}
    if q_global is not None:
        for name, like in (("q_global", q), ("k_global", k), ("v_global", v)):
            x = checks.float_array(given[name], name)
            if x.shape != like.shape:
                raise SpecError(name, f"shape {like.shape} (as {name[0]})", f"shape {x.shape}")
            projections[name] = x
    scale = checks.scale(scale, shape.head_dim)
    checks.scores_within_range(q, k, scale)
    if projections:
        checks.scores_within_range(projections["q_global"], projections["k_global"], scale, "q_global, k_global")
    return LongformerInputs(q, k, v, shape, int(w), global_tokens, projections, preset, scale)


# --------------------------------------------------------------------------
# The pattern (steps 1-3).
# --------------------------------------------------------------------------


def local_mask(x: LongformerInputs, n: int) -> np.ndarray:
    """(1)-(2) (B, 1, n, n): band ``|i - j| <= w/2`` OR key j global; keys past N (padding) never."""
    position = np.arange(n)
    band = np.abs(position[:, None] - position[None, :]) <= x.one_sided  # (n, n)
    global_keys = _padded(x.global_tokens, n)  # (B, n)
    real = position < x.shape.q_len  # (n,)
    return ((band[None] | global_keys[:, None, :]) & real[None, None, :])[:, None]


def global_mask(x: LongformerInputs, n: int) -> np.ndarray:
    """(3) (1, 1, 1, n): a global row sees every real key."""
    return (np.arange(n) < x.shape.q_len)[None, None, None, :]


def _padded(a: np.ndarray, n: int) -> np.ndarray:
    """``a`` (B, H, N, ...) or (B, N) with zeros appended along the token axis up to ``n`` (the hf preset)."""
    axis = 1 if a.ndim == 2 else 2
    width = [(0, 0)] * a.ndim
    width[axis] = (0, n - a.shape[axis])
    return np.pad(a, width)


# --------------------------------------------------------------------------
# The reference backend.
# --------------------------------------------------------------------------


def _global_qkv(x: LongformerInputs, num: Numerics, n: int):
    q, k, v = (x.projections.get(f"{name}_global", getattr(x, name)) for name in ("q", "k", "v"))
    return tuple(_padded(num.load(a), n) for a in (q, k, v))


def forward(x: LongformerInputs, num: Numerics) -> Result:
    """Steps (1)-(4) in precision ``num``."""
    n = x.padded_len
    q, k, v = (_padded(num.load(a), n) for a in (x.q, x.k, x.v))
    attend = dict(scale=x.scale, precision=num)
    local = dense_attention(q, k, v, mask=local_mask(x, n), **attend)  # (2)
    over_all = dense_attention(*_global_qkv(x, num, n), mask=global_mask(x, n), **attend)  # (3)
    is_global = x.global_tokens[:, None, :]  # (B, 1, N)
    real = slice(0, x.shape.q_len)
    out = np.where(is_global[..., None], over_all.out[:, :, real], local.out[:, :, real])  # (4)
    lse = np.where(is_global, over_all.lse[:, :, real], local.lse[:, :, real])
    return Result(out=out, lse=lse)


def vjp(x: LongformerInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """(4')-(1'): the local rows' cotangents through the local attention, the global rows' through the global one."""
    n, real = x.padded_len, slice(0, x.shape.q_len)
    q, k, v = (_padded(num.load(a), n) for a in (x.q, x.k, x.v))
    dout = num.load(cotangents.dout)
    dlse = np.zeros(dout.shape[:3]) if cotangents.dlse is None else num.load(cotangents.dlse)
    is_global = x.global_tokens[:, None, :]  # (B, 1, N)
    attend = dict(scale=x.scale, precision=num)

    def rows(selected, cotangent):
        return _padded(np.where(selected, cotangent, 0.0), n)

    local = dense_attention_vjp(rows(~is_global[..., None], dout), q, k, v, dlse=rows(~is_global, dlse),
                                mask=local_mask(x, n), **attend)  # fmt: skip
    over_all = dense_attention_vjp(rows(is_global[..., None], dout), *_global_qkv(x, num, n),
                                   dlse=rows(is_global, dlse), mask=global_mask(x, n), **attend)  # fmt: skip
    grads = Grads({name: local[name][:, :, real] for name in ("q", "k", "v")})
    for name in ("q", "k", "v"):
        if x.projections:
            grads[f"{name}_global"] = over_all[name][:, :, real]
        else:
            grads[name] = grads[name] + over_all[name][:, :, real]
    return grads
