"""Nyströmformer: the executable specification.

Xiong et al. 2021, "Nyströmformer: A Nyström-Based Algorithm for
Approximating Self-Attention", eqs. (14)-(16): with landmarks Q̃, K̃ the means
of m contiguous segments,

    out = softmax(Q K̃ᵀ s) · Z⁺ · softmax(Q̃ K̃ᵀ s) ... · softmax(Q̃ Kᵀ s) V  (+ conv(V))

where Z⁺ is the iterative Moore–Penrose approximation of the middle kernel
(eq. 16), run for a given number of iterations from a given initialisation:
it is never replaced by an exact pseudo-inverse (six iterations are not the
pinv, and that is the mechanism). Steps match spec/low_rank.md, "Nyströmformer".

Einsum letters: b batch, h head, n token, s landmark (segment), t landmark,
d head dim, e value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import Numerics
from ...core.presets import FROM_PRESET
from ...core.results import Cotangents, Grads, Result
from ...core.softmax import masked_softmax
from ...dense import dense_attention, dense_attention_vjp
from .presets import MASK_SCOPES, PADDINGS, PINV_INITS, PRESETS


def nystrom_attention(q, k, v, *, num_landmarks, pinv_iterations=6, conv_kernel=None, key_padding_mask=None,
                      scale=None, preset=None, pinv_init=FROM_PRESET, padding=FROM_PRESET, landmark_eps=FROM_PRESET,
                      mask_scope=FROM_PRESET, full_rank_shortcut=FROM_PRESET, precision=None,
                      backend="reference") -> Result:  # fmt: skip
    """Nyström self-attention ``k₁ Z⁺ (k₃ V) + conv(V)``.

    Parameters
    ----------
    q, k : ndarray (B, H, N, D)
        Self-attention: one head count and one length for q, k and v.
    v : ndarray (B, H, N, Dv)
    num_landmarks : int >= 1
        m: landmarks are the means of m contiguous segments of N / m tokens.
        m must divide N unless ``padding="front"``.
    pinv_iterations : int >= 1
        Iterations of ``Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))``.
    conv_kernel : ndarray (H, K), K odd, optional
        Depthwise convolution over the sequence of V added to the output
        (``out_n += Σ_t w[h, t] v_{n + t − K//2}``, zeros outside).
    key_padding_mask : bool ndarray (B, N), optional
        ``True`` = a real token. See ``mask_scope``.
    scale : float > 0, optional
        Logit scale; default ``1 / sqrt(D)``.
    preset : {None, "lucidrains", "hf"}
        Sets the five parameters below (spec/low_rank.md table); explicit
        values win.
    pinv_init : {"per_matrix", "batch_global"}
        Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞) with the norms of each (b, h) matrix
        (canonical), or their maxima over the whole batch × heads tensor
        (lucidrains, HF: batch items are coupled).
    padding : {"none", "front"}
        ``"front"``: prepend zero tokens up to a multiple of m (lucidrains);
        they enter the landmarks and keys unless a mask excludes them, and
        their output rows are dropped.
    landmark_eps : float >= 0
        With a mask, landmark means divide by ``count + landmark_eps``
        (lucidrains 1e-8).
    mask_scope : {"all", "kernel3"}
        ``"all"``: padded tokens are left out of the landmark means, keys of
        kernel 3 and the convolution's values, and landmarks with no real
        token are left out of kernels 1 and 2. ``"kernel3"``: only kernel 3's
        keys are masked (HF).
    full_rank_shortcut : bool
        When m equals the (padded) length, plain softmax attention instead (HF).

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv), float64. ``lse`` is None (the output is not a
        softmax over keys). ``aux`` is empty.
    """
    return registry.call_forward("nystrom", locals())


nystrom_attention_vjp = registry.vjp_function(
    nystrom_attention, "nystrom", grads="""    ``q``, ``k``, ``v`` and, when given, ``conv_kernel`` (shapes of the inputs).
    The maxima in Z₀'s norms hold their argmax fixed.""",
)


@dataclass(frozen=True)
class NystromInputs:
    """Checked inputs, the preset's values resolved."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    num_landmarks: int
    pinv_iterations: int
    conv_kernel: np.ndarray | None
    key_padding_mask: np.ndarray | None
    scale: float
    pinv_init: str
    padding: str
    landmark_eps: float
    mask_scope: str
    full_rank_shortcut: bool

    def cotangent_shapes(self) -> dict:
        return {"dout": self.q.shape[:3] + self.v.shape[3:], "dlse": None}

    @property
    def front(self) -> int:
        """Zero tokens prepended (step 0)."""
        n, m = self.q.shape[2], self.num_landmarks
        return (-n) % m if self.padding == "front" else 0

    @property
    def shortcut(self) -> bool:
        return self.full_rank_shortcut and self.num_landmarks == self.q.shape[2] + self.front


def _positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise SpecError(name, "an int >= 1", repr(x))
    return int(x)


def check_inputs(q, k, v, *, num_landmarks, pinv_iterations, conv_kernel, key_padding_mask, scale, preset,
                 **preset_controlled) -> NystromInputs:  # fmt: skip
    """Check every argument of ``nystrom_attention``; raise :class:`SpecError` on the first bad one."""
    q, k, v, shape = checks.qkv(q, k, v)
    if shape.q_heads != shape.kv_heads or shape.q_len != shape.kv_len:
        raise SpecError("k", f"self-attention shapes: H = {shape.q_heads} heads and N = {shape.q_len} tokens (as q)",
                        f"shape {k.shape}")  # fmt: skip
    if not (preset is None or isinstance(preset, str)) or preset not in PRESETS:
        raise SpecError("preset", f"None or one of {[p for p in PRESETS if p]}", repr(preset))
    p = dict(PRESETS[preset])
    p.update({name: value for name, value in preset_controlled.items() if value is not FROM_PRESET})
    pinv_init = checks.choice(p["pinv_init"], "pinv_init", PINV_INITS)
    padding = checks.choice(p["padding"], "padding", PADDINGS)
    mask_scope = checks.choice(p["mask_scope"], "mask_scope", MASK_SCOPES)
    landmark_eps = checks.real_number(p["landmark_eps"], "landmark_eps", minimum=0.0)
    full_rank_shortcut = checks.flag(p["full_rank_shortcut"], "full_rank_shortcut")
    m = _positive_int(num_landmarks, "num_landmarks")
    n = shape.q_len
    if m > n or (n % m and padding != "front"):
        raise SpecError("num_landmarks", f"a divisor of N = {n} (or padding='front' and m <= N)", repr(m))
    pinv_iterations = _positive_int(pinv_iterations, "pinv_iterations")
    if conv_kernel is not None:
        checks.float_array(conv_kernel, "conv_kernel")
        if conv_kernel.ndim != 2 or conv_kernel.shape[0] != shape.q_heads or conv_kernel.shape[1] % 2 == 0:
            raise SpecError("conv_kernel", f"shape (H={shape.q_heads}, K) with K odd", f"shape {conv_kernel.shape}")
    if key_padding_mask is not None:
        want = (shape.batch, n)
        if not isinstance(key_padding_mask, np.ndarray) or key_padding_mask.dtype != np.bool_ or key_padding_mask.shape != want:
            given = f"shape {getattr(key_padding_mask, 'shape', None)}, dtype {getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}"
            raise SpecError("key_padding_mask", f"a bool array of shape {want} (True = real token)", given)
    return NystromInputs(q, k, v, m, pinv_iterations, conv_kernel, key_padding_mask, checks.scale(scale, shape.head_dim),
                         pinv_init, padding, landmark_eps, mask_scope, full_rank_shortcut)  # fmt: skip


# --------------------------------------------------------------------------
# Shared pieces (also used by numba.py): padding, landmarks, the iteration, the convolution.
# --------------------------------------------------------------------------


def padded(x: NystromInputs, num: Numerics) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Step (0): q, k, v with ``front`` zero tokens prepended, and the mask (False on them), or None."""
    p = x.front
    q, k, v = (np.pad(num.load(a), ((0, 0), (0, 0), (p, 0), (0, 0))) for a in (x.q, x.k, x.v))  # (B, H, Np, *)
    real = None if x.key_padding_mask is None else np.pad(x.key_padding_mask, ((0, 0), (p, 0)))  # (B, Np)
    return q, k, v, real


def landmark_weights(x: NystromInputs, real: np.ndarray | None, length: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Step (1)'s averaging matrix R (B, m, Np), ``landmarks = R x``, and which landmarks have a token (B, m)."""
    m = x.num_landmarks
    segment = np.arange(length) // (length // m)  # (Np,)
    member = (segment[None, :] == np.arange(m)[:, None]).astype(np.float64)[None]  # (1, m, Np)
    if real is None or x.mask_scope == "kernel3":
        return np.broadcast_to(member / (length // m), (1, m, length)), None
    member = member * real[:, None, :]  # (B, m, Np)
    count = member.sum(axis=-1, keepdims=True)  # (B, m, 1)
    return member / np.where(count > 0, count + x.landmark_eps, 1.0), count[..., 0] > 0


def _init_norms(a: np.ndarray, x: NystromInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row sums and column sums of |A| (B, H, m), and ‖A‖∞, ‖A‖₁ (B, H, 1, 1): per matrix, or maxima over the batch."""
    absolute = np.abs(a)
    row_sums, col_sums = absolute.sum(axis=-1), absolute.sum(axis=-2)  # (B, H, m)
    axes = (0, 1, 2) if x.pinv_init == "batch_global" else (2,)
    norm_inf = np.max(row_sums, axis=axes, keepdims=True)[..., None]  # (B, H, 1, 1) or (1, 1, 1, 1)
    norm_one = np.max(col_sums, axis=axes, keepdims=True)[..., None]
    return row_sums, col_sums, norm_inf, norm_one


def pinv_iterates(a: np.ndarray, x: NystromInputs, num: Numerics) -> list[np.ndarray]:
    """Step (3): Z₀ ... Z_T of the iteration on A (B, H, m, m); Z_T approximates A⁺."""
    _, _, norm_inf, norm_one = _init_norms(a, x)
    z = num.store(np.swapaxes(a, -1, -2) / (norm_one * norm_inf))  # Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)
    eye = np.eye(a.shape[-1])
    iterates = [z]
    for _ in range(x.pinv_iterations):
        az = num.store(a @ z)
        inner = num.store(az @ (7 * eye - az))
        middle = num.store(az @ (15 * eye - inner))
        z = num.store(0.25 * z @ (13 * eye - middle))
        iterates.append(z)
    return iterates


def pinv_vjp(a: np.ndarray, iterates: list[np.ndarray], dz: np.ndarray, x: NystromInputs) -> np.ndarray:
    """Step (3'): dA from dZ_T, back through each iteration and Z₀ (argmax of the norms held fixed)."""
    eye = np.eye(a.shape[-1])
    t = lambda m: np.swapaxes(m, -1, -2)  # noqa: E731 (transpose of the matrix axes)
    da = np.zeros_like(a)
    for z in reversed(iterates[:-1]):
        # z' = ¼ z y3, y3 = 13I − az y2, y2 = 15I − az y1, y1 = 7I − az, az = A z.
        az = a @ z
        y1 = 7 * eye - az
        y2 = 15 * eye - az @ y1
        y3 = 13 * eye - az @ y2
        d_y3 = 0.25 * t(z) @ dz
        d_az = -d_y3 @ t(y2)
        d_y2 = -t(az) @ d_y3
        d_az -= d_y2 @ t(y1)
        d_az -= t(az) @ (-d_y2)
        da += d_az @ t(z)
        dz = 0.25 * dz @ t(y3) + t(a) @ d_az
    # Z₀ = c Aᵀ, c = 1 / (‖A‖₁ ‖A‖∞); each norm is the sum of |A| along its argmax row or column.
    row_sums, col_sums, norm_inf, norm_one = _init_norms(a, x)
    c = 1.0 / (norm_one * norm_inf)
    da += c * t(dz)
    dc = np.sum(dz * t(a), axis=(-1, -2), keepdims=True)  # (B, H, 1, 1)
    if x.pinv_init == "batch_global":
        dc = np.sum(dc, keepdims=True)
    sign = np.sign(a)
    for sums, d_norm, along_rows in ((row_sums, -dc * c / norm_inf, True), (col_sums, -dc * c / norm_one, False)):
        flat = sums.reshape(-1) if x.pinv_init == "batch_global" else None
        winners = [np.unravel_index(np.argmax(flat), sums.shape)] if flat is not None else [
            (b, h, np.argmax(sums[b, h])) for b, h in np.ndindex(sums.shape[:2])]  # fmt: skip
        for b, h, i in winners:
            g = d_norm.reshape(-1)[0] if flat is not None else d_norm[b, h, 0, 0]
            if along_rows:
                da[b, h, i, :] += g * sign[b, h, i, :]
            else:
                da[b, h, :, i] += g * sign[b, h, :, i]
    return da


def depthwise_conv(v: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Step (5): ``out[b, h, n] = Σ_t kernel[h, t] v[b, h, n + t − K//2]``, zeros outside (B, H, N, Dv)."""
    half = kernel.shape[1] // 2
    n = v.shape[2]
    padded_v = np.pad(v, ((0, 0), (0, 0), (half, half), (0, 0)))
    return sum(kernel[None, :, t, None, None] * padded_v[:, :, t : t + n] for t in range(kernel.shape[1]))


def depthwise_conv_vjp(v: np.ndarray, kernel: np.ndarray, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step (5'): gradients of :func:`depthwise_conv` with respect to v and the kernel."""
    half, n = kernel.shape[1] // 2, v.shape[2]
    padded_v = np.pad(v, ((0, 0), (0, 0), (half, half), (0, 0)))
    d_padded = np.zeros_like(padded_v)
    d_kernel = np.zeros(kernel.shape)
    for t in range(kernel.shape[1]):
        d_padded[:, :, t : t + n] += kernel[None, :, t, None, None] * dout
        d_kernel[:, t] = np.einsum("bhne,bhne->h", dout, padded_v[:, :, t : t + n])
    return d_padded[:, :, half : half + n], d_kernel


def conv_values(x: NystromInputs, v: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """The values the convolution sees: padded tokens zeroed under ``mask_scope="all"``."""
    if real is None or x.mask_scope == "kernel3":
        return v
    return np.where(real[:, None, :, None], v, 0.0)


# --------------------------------------------------------------------------
# The reference backend.
# --------------------------------------------------------------------------


def forward(x: NystromInputs, num: Numerics) -> Result:
    """The reference backend: steps (0)-(6) in precision ``num``."""
    return Result(out=_forward_steps(x, num)["out"], lse=None, aux={})


def _kernel_masks(x: NystromInputs, real, has_token):
    """Allowed entries of kernels 1, 2, 3 (broadcastable bool arrays), None where nothing is masked."""
    mask3 = None if real is None else real[:, None, None, :]  # (B, 1, 1, Np)
    if has_token is None:
        return None, None, mask3
    mask1 = has_token[:, None, None, :]  # (B, 1, 1, m)
    mask2 = has_token[:, None, :, None] & has_token[:, None, None, :]  # (B, 1, m, m)
    return mask1, mask2, mask3 & has_token[:, None, :, None]


def _forward_steps(x: NystromInputs, num: Numerics) -> dict:
    """Steps (0)-(6) of spec/low_rank.md, "Nyströmformer"; every intermediate the VJP needs."""
    # (0) Front padding to a multiple of m.
    q, k, v, real = padded(x, num)  # (B, H, Np, D), (B, H, Np, Dv), (B, Np) or None
    s = dict(q=q, k=k, v=v, real=real)
    if x.shortcut:
        mask = None if real is None else real[:, None, None, :]
        s["out"] = dense_attention(q, k, v, mask=mask, scale=x.scale, precision=num).out
    else:
        # (1) Landmarks: segment means (over real tokens under mask_scope "all").
        r, has_token = landmark_weights(x, real, q.shape[2])  # (B or 1, m, Np), (B, m) or None
        q_land = num.store(np.einsum("bsn,bhnd->bhsd", r, q, optimize=True))  # (B, H, m, D)
        k_land = num.store(np.einsum("bsn,bhnd->bhsd", r, k, optimize=True))  # (B, H, m, D)
        # (2) The three softmax kernels.
        mask1, mask2, mask3 = _kernel_masks(x, real, has_token)
        k1, _ = masked_softmax(num.store(x.scale * np.einsum("bhnd,bhsd->bhns", q, k_land, optimize=True)), mask1, num)
        k2, _ = masked_softmax(num.store(x.scale * np.einsum("bhsd,bhtd->bhst", q_land, k_land, optimize=True)), mask2, num)
        k3, _ = masked_softmax(num.store(x.scale * np.einsum("bhsd,bhnd->bhsn", q_land, k, optimize=True)), mask3, num)
        # (3) Z ≈ k₂⁺ by the iteration.
        iterates = pinv_iterates(k2, x, num)
        # (4) out = k₁ (Z (k₃ V)).
        summary = num.store(k3 @ v)  # (B, H, m, Dv)
        mixed = num.store(iterates[-1] @ summary)  # (B, H, m, Dv)
        s.update(r=r, q_land=q_land, k_land=k_land, k1=k1, k2=k2, k3=k3, iterates=iterates, summary=summary, mixed=mixed)
        s["out"] = num.store(k1 @ mixed)  # (B, H, Np, Dv)
    # (5) The depthwise convolution of the values.
    if x.conv_kernel is not None:
        s["out"] = num.store(s["out"] + depthwise_conv(conv_values(x, v, real), num.load(x.conv_kernel)))
    # (6) Drop the padded rows.
    s["out"] = s["out"][:, :, x.front :]
    return s


def softmax_vjp(p: np.ndarray, dp: np.ndarray) -> np.ndarray:
    """dS of ``P = softmax(S)`` row-wise: ``P ⊙ (dP − Σ_j P dP)`` (0 on masked entries and empty rows)."""
    return p * (dp - np.sum(p * dp, axis=-1, keepdims=True))


def vjp(x: NystromInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (6')-(0') in precision ``num``."""
    f = _forward_steps(x, num)
    q, k, v, real = f["q"], f["k"], f["v"], f["real"]
    # (6') Padded rows get no cotangent.
    dout = np.pad(num.load(cotangents.dout), ((0, 0), (0, 0), (x.front, 0), (0, 0)))  # (B, H, Np, Dv)
    grads = Grads()
    dv = np.zeros_like(v)
    # (5') Convolution.
    if x.conv_kernel is not None:
        dv_conv, grads["conv_kernel"] = depthwise_conv_vjp(conv_values(x, v, real), num.load(x.conv_kernel), dout)
        dv += conv_values(x, dv_conv, real)
    if x.shortcut:
        mask = None if real is None else real[:, None, None, :]
        dense = dense_attention_vjp(dout, q, k, v, mask=mask, scale=x.scale, precision=num)
        dq, dk, dv = dense["q"], dense["k"], dv + dense["v"]
    else:
        # (4') out = k₁ M, M = Z X, X = k₃ V.
        dk1 = dout @ np.swapaxes(f["mixed"], -1, -2)
        d_mixed = np.swapaxes(f["k1"], -1, -2) @ dout
        dz = d_mixed @ np.swapaxes(f["summary"], -1, -2)
        d_summary = np.swapaxes(f["iterates"][-1], -1, -2) @ d_mixed
        dk3 = d_summary @ np.swapaxes(v, -1, -2)
        dv += np.swapaxes(f["k3"], -1, -2) @ d_summary
        # (3') The iteration.
        dk2 = pinv_vjp(f["k2"], f["iterates"], dz, x)
        # (2') Softmaxes and logits.
        ds1, ds2, ds3 = (x.scale * softmax_vjp(f[name], d) for name, d in (("k1", dk1), ("k2", dk2), ("k3", dk3)))
        dq = np.einsum("bhns,bhsd->bhnd", ds1, f["k_land"])
        dk_land = np.einsum("bhns,bhnd->bhsd", ds1, q) + np.einsum("bhst,bhsd->bhtd", ds2, f["q_land"])
        dq_land = np.einsum("bhst,bhtd->bhsd", ds2, f["k_land"]) + np.einsum("bhsn,bhnd->bhsd", ds3, k)
        dk = np.einsum("bhsn,bhsd->bhnd", ds3, f["q_land"])
        # (1') Landmarks are R x.
        dq = dq + np.einsum("bsn,bhsd->bhnd", f["r"], dq_land)
        dk = dk + np.einsum("bsn,bhsd->bhnd", f["r"], dk_land)
    # (0') Padded tokens are constants.
    grads.update(q=num.store(dq)[:, :, x.front :], k=num.store(dk)[:, :, x.front :], v=num.store(dv)[:, :, x.front :])
    return grads


def implied_attention(q, k, v, **params) -> np.ndarray:
    """The matrix Â = k₁ Z k₃ (B, H, N, N) that multiplies V (the convolution left out), padded rows and columns dropped."""
    from ...core.precision import FLOAT64

    arguments = dict(conv_kernel=None, key_padding_mask=None, scale=None, preset=None, pinv_iterations=6,
                     **{name: FROM_PRESET for name in PRESETS[None]})  # fmt: skip
    arguments.update(params)
    x = check_inputs(q, k, v, **arguments)
    s = _forward_steps(x, FLOAT64)
    if x.shortcut:
        mask = None if s["real"] is None else s["real"][:, None, None, :]
        weights, _ = masked_softmax(x.scale * np.einsum("bhnd,bhkd->bhnk", s["q"], s["k"]), mask)
        return weights[:, :, x.front :, x.front :]
    return (s["k1"] @ s["iterates"][-1] @ s["k3"])[:, :, x.front :, x.front :]
