"""lucidrains' local-attention (``LocalAttention``): blocked local attention with look-around,
the executable specification.

Roy, Saffar, Vaswani & Grangier 2021 (local heads of the Routing
Transformer) and Wang's ``local-attention`` package
(github.com/lucidrains/local-attention, ``local_attention/local_attention.py``,
``LocalAttention.forward``): the sequence is cut into windows of
``window_size`` tokens; query block ``w`` sees key blocks
``w - look_backward ... w + look_forward``. Steps (spec/segmented.md, "local-attention"):

* (0) ``autopad``: pad N to a multiple of ``window_size`` with zero tokens;
* (1) ``shared_qk``: keys l2-normalised, ``k / max(|k|, 1e-12)``;
* (2) ``rotary``: RoPE (half layout, every dim, base 10000) with query i at
  position i and key j at position j;
* (3) the pattern: key block in the look-around, ``j <= i`` when ``causal``,
  ``exact_windowsize`` trims to ``i - ws lb <= j <= i + ws lf``; padding keys never;
* (4) scores ``scale q . k``; with ``shared_qk`` a query's own key has the
  fixed score ``self_score`` (-5e4 in the package): it is kept apart as one
  more partial result of constant log-sum-exp and merged (refattn.merge),
  so it passes no gradient to q or k;
* (5) softmax over the pattern, values, padded rows dropped.

The ``"lucidrains"`` preset reproduces two measured defects of
local-attention 1.11.2 as flagged options: ``rotary_query_shift`` (its
``apply_rotary_pos_emb`` takes ``freqs[-q_len:]``, so queries get the
positions of the last look-around block: every query shifted by
``window_size * look_forward``) and ``attend_padding`` (autopadding without
an input mask leaves the zero padding keys unmasked: real queries attend to
them, score 0 and value 0). Canonical semantics has neither.

Einsum letters: b batch, h head, n token, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.presets import FROM_PRESET
from ...core.results import Cotangents, Grads, Result
from ...core.shapes import repeat_kv_heads, sum_kv_heads
from ...core.softmax import merge
from ...dense import dense_attention, dense_attention_vjp
from ...position import apply_rope
from ..pattern import SelfAttentionInputs, merge_cotangents, self_attention_qkv

#: preset -> (attend_padding, rotary_query_shift)
PRESETS = {None: (False, False), "lucidrains": (True, True)}
L2NORM_EPS = 1e-12  # torch.nn.functional.normalize's default eps


def local_attention(
    q, k, v, *,
    window_size, look_backward=1, look_forward=None, exact_windowsize=False, shared_qk=False, self_score=-5e4,
    rotary=False, autopad=False, preset=None, attend_padding=FROM_PRESET, rotary_query_shift=FROM_PRESET,
    causal=False,
    scale=None, precision=None, backend="reference") -> Result:
    """Blocked local attention with look-around (lucidrains' ``LocalAttention``).

    Parameters
    ----------
    q, k, v : ndarray (B, Hq, N, D), (B, Hkv, N, D), (B, Hkv, N, Dv)
    window_size : int >= 1
        ``ws``: block length; N must be a multiple unless ``autopad``.
    causal : bool
        Keep keys ``j <= i``; then ``look_forward`` must be 0.
    look_backward : int >= 0
    look_forward : int >= 0, optional
        Default 0 when causal, else 1 (the package's default).
    exact_windowsize : bool
        Trim to ``i - ws * look_backward <= j <= i + ws * look_forward``.
    shared_qk : bool
        l2-normalise keys and give each query's own key the score ``self_score``.
    self_score : float
        The fixed self score of ``shared_qk`` (the package's ``TOKEN_SELF_ATTN_VALUE``).
    rotary : bool
        Rotate q and k by RoPE over all D dims (D even), half layout, base 10000.
    autopad : bool
        Pad N to a multiple of ``window_size`` with zero tokens.
    preset : {None, "lucidrains"}
        ``"lucidrains"`` sets ``attend_padding`` and ``rotary_query_shift``.
    attend_padding : bool
        Padding keys are attended (score 0, value 0) instead of masked.
    rotary_query_shift : bool
        Queries rotated at position ``i + window_size * look_forward``.
    scale : float > 0, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        ``out`` (B, Hq, N, Dv) and ``lse`` (B, Hq, N) of the final logits
        (the self score included). ``aux`` is empty.
    """
    return registry.call_forward("local", locals())


local_attention_vjp = registry.vjp_function(
    local_attention, "local", grads="""    ``q``, ``k``, ``v``, shapes of the inputs.""",
)


@dataclass(frozen=True)
class LocalInputs(SelfAttentionInputs):
    """Checked arguments of :func:`local_attention`."""

    window_size: int
    causal: bool
    look_backward: int
    look_forward: int
    exact_windowsize: bool
    shared_qk: bool
    self_score: float
    rotary: bool
    attend_padding: bool
    rotary_query_shift: bool
    scale: float

    @property
    def padded_len(self) -> int:
        """(0) N rounded up to a multiple of ``window_size``."""
        return -(-self.shape.q_len // self.window_size) * self.window_size

    @property
    def query_shift(self) -> int:
        """Added to every query's rotary position: ``ws * look_forward`` with the lucidrains defect, else 0."""
        return self.window_size * self.look_forward if self.rotary_query_shift else 0


def _count(x, name: str, smallest: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < smallest:
        raise SpecError(name, f"an int >= {smallest}", checks.summary(x))
    return int(x)


def check_local_inputs(q, k, v, *, window_size, causal, look_backward, look_forward, exact_windowsize, shared_qk,
                       self_score, rotary, autopad, preset, attend_padding, rotary_query_shift, scale) -> LocalInputs:  # fmt: skip
    """Check every argument of ``local_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = self_attention_qkv(q, k, v)
    window_size = _count(window_size, "window_size", 1)
    causal = checks.flag(causal, "causal")
    look_backward = _count(look_backward, "look_backward", 0)
    look_forward = (0 if causal else 1) if look_forward is None else _count(look_forward, "look_forward", 0)
    if causal and look_forward > 0:
        raise SpecError("look_forward", "0 when causal (a causal query cannot look forward)", checks.summary(look_forward))
    flags = {name: checks.flag(value, name) for name, value in
             (("exact_windowsize", exact_windowsize), ("shared_qk", shared_qk), ("rotary", rotary), ("autopad", autopad))}  # fmt: skip
    self_score = checks.real_number(self_score, "self_score", minimum=-np.inf, inclusive=False)
    if not flags["autopad"] and shape.q_len % window_size:
        raise SpecError("window_size", f"a divisor of N = {shape.q_len} (or autopad=True)", checks.summary(window_size))
    if flags["rotary"] and shape.head_dim % 2:
        raise SpecError("q", "an even head dim for rotary=True", f"head dim {shape.head_dim}")
    if preset not in PRESETS:
        raise SpecError("preset", f"one of {list(PRESETS)}", checks.summary(preset))
    defaults = dict(zip(("attend_padding", "rotary_query_shift"), PRESETS[preset]))
    chosen = {name: defaults[name] if value is FROM_PRESET else checks.flag(value, name)
              for name, value in (("attend_padding", attend_padding), ("rotary_query_shift", rotary_query_shift))}  # fmt: skip
    scale = checks.scale(scale, shape.head_dim)
    checks.scores_within_range(q, k, scale)
    return LocalInputs(q, k, v, shape, window_size, causal, look_backward, look_forward, flags["exact_windowsize"],
                       flags["shared_qk"], self_score, flags["rotary"], chosen["attend_padding"],
                       chosen["rotary_query_shift"], scale)  # fmt: skip


# --------------------------------------------------------------------------
# The pattern (step 3).
# --------------------------------------------------------------------------


def pattern(x: LocalInputs) -> np.ndarray:
    """(3) (N, Np) bool: which of the padded keys query i sees (its own key included)."""
    ws, lb, lf = x.window_size, x.look_backward, x.look_forward
    i = np.arange(x.shape.q_len)[:, None]
    j = np.arange(x.padded_len)[None, :]
    allowed = (j // ws >= i // ws - lb) & (j // ws <= i // ws + lf)
    if x.causal:
        allowed &= j <= i
    if x.exact_windowsize:
        allowed &= j >= i - ws * lb
        if not x.causal:
            allowed &= j <= i + ws * lf
    if not x.attend_padding:
        allowed &= j < x.shape.q_len
    return allowed


# --------------------------------------------------------------------------
# The reference backend.
# --------------------------------------------------------------------------


def _steps(x: LocalInputs, num: Numerics) -> dict:
    n, n_padded = x.shape.q_len, x.padded_len
    pad = [(0, 0), (0, 0), (0, n_padded - n), (0, 0)]
    q, k, v = num.load(x.q), np.pad(num.load(x.k), pad), np.pad(num.load(x.v), pad)  # (0) keys padded to Np
    norm = None
    if x.shared_qk:  # (1)
        norm = np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), L2NORM_EPS)  # (B, Hkv, Np, 1)
        k = num.store(k / norm)
    if x.rotary:  # (2)
        q = num.store(apply_rope(q, np.arange(n) + x.query_shift, precision=num))
        k = num.store(apply_rope(k, np.arange(n_padded), precision=num))
    allowed = pattern(x)
    if x.shared_qk:
        allowed = allowed & ~np.eye(n, n_padded, dtype=bool)  # the own key is the separate partial of (4)
    return dict(q=q, k=k, v=v, norm=norm, allowed=allowed)


def _self_partial(x: LocalInputs, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4) The own key alone: out ``v_i``, lse ``self_score`` (B, Hq, N)."""
    n = x.shape.q_len
    own_v = repeat_kv_heads(v[:, :, :n], x.shape.group)
    return own_v, np.full(own_v.shape[:3], x.self_score)


def forward(x: LocalInputs, num: Numerics) -> Result:
    """Steps (0)-(5) in precision ``num``."""
    f = _steps(x, num)
    others = dense_attention(f["q"], f["k"], f["v"], mask=f["allowed"], scale=x.scale, precision=num)  # (4)-(5)
    if not x.shared_qk:
        return others
    out, lse = merge([(others.out, others.lse), _self_partial(x, f["v"])])
    return Result(out=num.store(out), lse=lse)


def vjp(x: LocalInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """(5')-(0'): merge, dense attention, rotation (its transpose is the rotation back) and l2-normalisation."""
    f = _steps(x, num)
    n = x.shape.q_len
    dout = num.load(cotangents.dout)
    dlse = np.zeros(dout.shape[:3]) if cotangents.dlse is None else num.load(cotangents.dlse)
    attend = dict(mask=f["allowed"], scale=x.scale, precision=num)
    dv_own = 0.0
    if x.shared_qk:
        others = dense_attention(f["q"], f["k"], f["v"], **attend)
        own = _self_partial(x, f["v"])
        merged_out, merged_lse = merge([(others.out, others.lse), own])
        (dout, dlse), (d_own_out, _) = merge_cotangents([(others.out, others.lse), own], merged_lse, merged_out,
                                                        dout, dlse)  # fmt: skip
        dv_own = sum_kv_heads(d_own_out, x.shape.group)  # (B, Hkv, N, Dv): v_i passed through with weight w_self
    grads = dense_attention_vjp(dout, f["q"], f["k"], f["v"], dlse=dlse, **attend)
    dq, dk, dv = grads["q"], grads["k"], grads["v"]
    dv[:, :, :n] += dv_own
    if x.rotary:  # (2') rotation by -angle is the transpose
        dq = apply_rope(dq, -(np.arange(n) + x.query_shift), precision=num)
        dk = apply_rope(dk, -np.arange(x.padded_len), precision=num)
    if x.shared_qk:  # (1') d(k / |k|) = (dk_hat - k_hat (k_hat . dk_hat)) / |k| where |k| > eps, else dk_hat / eps
        k_hat, norm = f["k"] if not x.rotary else _unrotated_keys(x, num), f["norm"]
        radial = np.where(norm > L2NORM_EPS, np.sum(k_hat * dk, axis=-1, keepdims=True), 0.0)
        dk = (dk - k_hat * radial) / norm
    return Grads(q=dq, k=dk[:, :, :n], v=dv[:, :, :n])


def _unrotated_keys(x: LocalInputs, num: Numerics) -> np.ndarray:
    """The l2-normalised keys before rotation, (B, Hkv, Np, D)."""
    pad = [(0, 0), (0, 0), (0, x.padded_len - x.shape.q_len), (0, 0)]
    k = np.pad(num.load(x.k), pad)
    return num.store(k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), L2NORM_EPS))
