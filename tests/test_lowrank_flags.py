"""The low-rank conformance cases catch the mistakes their flags name.

The cases are a fresh export of the four low-rank mechanisms' ``cases.py``
(what ``refattn export --check`` holds the committed suite to). ``Small*`` are
the mechanisms written here in PyTorch, float64, from spec/low_rank.md and the
libraries' sources, independently of refattn's reference (explicit (N, N)
matrices, autograd for the gradients). ``Small*(bug=FLAG)`` makes the one
mistake that the flag ``FLAG`` names, each marked ``# bug FLAG`` next to the
line it replaces. Every wrong variant must fail at least one case carrying its
flag, while the correct ones pass them all, gradients included.

Performer's stabilisers cancel exactly when ``feature_eps = 0`` (canonical),
so a wrong *choice* of maximum is invisible there; the mistake
``PERFORMER_STABILIZER`` names is one that does not cancel: keys stabilised by
their own maxima (the queries' row rule applied to keys), which rescales each
key's weight by a different constant.
"""

import math
import types

import numpy as np
import pytest

from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import verify
from refattn.lowrank.generic.cases import FLAGS as LOWRANK_FLAGS
from refattn.lowrank.linformer.cases import FLAGS as LINFORMER_FLAGS
from refattn.lowrank.nystrom.cases import FLAGS as NYSTROM_FLAGS
from refattn.lowrank.performer.cases import FLAGS as PERFORMER_FLAGS

torch = pytest.importorskip("torch")

MECHANISMS = ("lowrank", "linformer", "nystrom", "performer")
FLAGS = {**LOWRANK_FLAGS, **LINFORMER_FLAGS, **NYSTROM_FLAGS, **PERFORMER_FLAGS}

#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "LOWRANK_NORMALIZATION": "divides by the row sums U(W1) whatever `normalized` says",
    "LOWRANK_FACTOR_ORDER": "reads W's memory as (Nk, r) and transposes it",
    "LINFORMER_SHARING": "projects the values with E whatever F is given",
    "LINFORMER_PROJECTION_SLICING": "slices the projections' trailing Nk columns instead of the leading ones",
    "LINFORMER_PADDING_BEFORE_PROJECTION": "ignores the key padding mask (lucidrains, fairseq)",
    "NYSTROM_PINV_ITERATIONS": "takes the exact pseudo-inverse of kernel 2 instead of the iterations",
    "NYSTROM_BATCH_COUPLED_INIT": "takes Z₀'s norms per matrix whatever pinv_init says",
    "NYSTROM_FRONT_PADDING": "appends the zero tokens at the end instead of the front",
    "NYSTROM_MASK_SCOPE": "masks kernel 3's keys only, whatever mask_scope says",
    "NYSTROM_CONV": "flips the convolution kernel (a true convolution, not PyTorch's cross-correlation)",
    "NYSTROM_FULL_RANK_SHORTCUT": "never takes the full-rank shortcut",
    "PERFORMER_CAUSAL_KEY_MAX": "uses the causal prefix maximum whatever key_stabilizer says",
    "PERFORMER_STABILIZER": "stabilises each key by its own maximum over features, like the queries",
    "PERFORMER_FEATURE_EPS": "adds ε to the query features only",
    "PERFORMER_DENOMINATOR": "ignores denominator_feature_eps and denominator_guard",
}


def _tensor(x):
    return torch.tensor(x, dtype=torch.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x


def _softmax(logits, allowed=None):
    """Row softmax over the last axis; disallowed entries get 0, and a row with none allowed is all 0."""
    if allowed is None:
        return torch.softmax(logits, dim=-1)
    allowed = torch.as_tensor(allowed)
    shifted = torch.where(allowed, logits, torch.full_like(logits, -math.inf))
    top = shifted.amax(-1, keepdim=True).detach()
    exp = torch.where(allowed, torch.exp(shifted - torch.where(torch.isfinite(top), top, 0.0)), 0.0)
    total = exp.sum(-1, keepdim=True)
    return exp / torch.where(total > 0, total, 1.0)


def _repeat_heads(x, heads):
    """(B, Hkv, ...) -> (B, heads, ...): query head h reads kv head h // (heads // Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


class Small:
    """One mechanism in PyTorch; ``bug`` names one flag's mistake. ``POSITIONAL``: what verify() passes positionally."""

    POSITIONAL = ("q", "k", "v")

    def __init__(self, bug=None):
        self.bug = bug

    def __call__(self, *arrays, **params):
        with torch.no_grad():
            out, lse = self._forward(**self._inputs(arrays, params))
        return types.SimpleNamespace(out=out.numpy(), lse=None if lse is None else lse.numpy(), aux={})

    def vjp(self, dout, *arrays, dlse=None, **params):
        inputs = self._inputs(arrays, params)
        leaves = {n: x.requires_grad_() for n, x in inputs.items() if isinstance(x, torch.Tensor) and x.dtype == torch.float64}
        out, lse = self._forward(**inputs)
        loss = (out * torch.tensor(dout, dtype=torch.float64)).sum()
        if dlse is not None:
            loss = loss + (lse * torch.tensor(dlse, dtype=torch.float64)).sum()
        loss.backward()
        return {n: (torch.zeros_like(x) if x.grad is None else x.grad).numpy() for n, x in leaves.items()}

    def _inputs(self, arrays, params):
        return {n: _tensor(x) for n, x in {**dict(zip(self.POSITIONAL, arrays)), **params}.items()}


class SmallLowRank(Small):
    """``U (W V) ⊘ U (W 1)`` or ``U (W V)``."""

    POSITIONAL = ("u", "w", "v")  # the mechanism's positional inputs

    def _forward(self, u, w, v, normalized=True):
        if self.bug == "LOWRANK_FACTOR_ORDER":
            w = w.reshape(w.shape[:2] + w.shape[2:][::-1]).transpose(-1, -2)  # bug LOWRANK_FACTOR_ORDER
        implied = u @ w  # (B, H, Nq, Nk)
        if normalized or self.bug == "LOWRANK_NORMALIZATION":  # bug LOWRANK_NORMALIZATION (the `or`)
            implied = implied / implied.sum(-1, keepdim=True)
        return implied @ v, None


class SmallLinformer(Small):
    """softmax(scale · Q (E K)ᵀ) (F V), padded keys zeroed first."""

    def _forward(self, q, k, v, e, f=None, key_padding_mask=None, slice_projections=False, scale=None, causal=False):
        assert not causal, "Linformer cannot be causal"
        n = k.shape[2]
        columns = slice(-n, None) if self.bug == "LINFORMER_PROJECTION_SLICING" else slice(0, n)  # bug LINFORMER_PROJECTION_SLICING
        e = e[..., columns]
        f = e if f is None else f[..., columns]
        if self.bug == "LINFORMER_SHARING":
            f = e  # bug LINFORMER_SHARING
        if key_padding_mask is not None and self.bug != "LINFORMER_PADDING_BEFORE_PROJECTION":  # bug LINFORMER_PADDING_BEFORE_PROJECTION
            keep = torch.as_tensor(key_padding_mask)[:, None, :, None]
            k, v = k * keep, v * keep
        project = lambda p, x: torch.einsum("pn,bhnd->bhpd" if p.dim() == 2 else "hpn,bhnd->bhpd", p, x)  # noqa: E731
        k_proj, v_proj = (_repeat_heads(project(p, x), q.shape[1]) for p, x in ((e, k), (f, v)))
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        logits = scale * q @ k_proj.transpose(-1, -2)
        return torch.softmax(logits, -1) @ v_proj, torch.logsumexp(logits, -1)


class SmallNystrom(Small):
    """k₁ Z (k₃ V) + conv(V), written from lucidrains' NystromAttention and HF's NystromformerSelfAttention."""

    def _forward(self, q, k, v, num_landmarks, pinv_iterations=6, conv_kernel=None, key_padding_mask=None, scale=None,
                 pinv_init="per_matrix", padding="none", landmark_eps=0.0, mask_scope="all", full_rank_shortcut=False,
                 preset=None):  # fmt: skip (the preset's values arrive written out)
        b, h, n, _ = q.shape
        m = num_landmarks
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        extra = (-n) % m if padding == "front" else 0
        where = (extra, 0)
        if self.bug == "NYSTROM_FRONT_PADDING":
            where = (0, extra)  # bug NYSTROM_FRONT_PADDING
        q, k, v = (torch.nn.functional.pad(x, (0, 0) + where) for x in (q, k, v))
        real = None
        if key_padding_mask is not None:
            real = torch.nn.functional.pad(torch.as_tensor(key_padding_mask), where, value=False)  # (B, Np)
        length = n + extra
        if self.bug == "NYSTROM_MASK_SCOPE":
            mask_scope = "kernel3"  # bug NYSTROM_MASK_SCOPE
        masked_all = real is not None and mask_scope == "all"
        shortcut = full_rank_shortcut and m == length
        if self.bug == "NYSTROM_FULL_RANK_SHORTCUT":
            shortcut = False  # bug NYSTROM_FULL_RANK_SHORTCUT
        if shortcut:
            keys = None if real is None else real[:, None, None, :]
            out = _softmax(scale * q @ k.transpose(-1, -2), keys) @ v
        else:
            out = self._nystrom(q, k, v, m, pinv_iterations, real if masked_all else None, real, landmark_eps, pinv_init, scale)
        if conv_kernel is not None:
            values = v * real[:, None, :, None] if masked_all else v
            out = out + self._conv(values, conv_kernel)
        return (out[:, :, extra:] if where[0] else out[:, :, :n]), None

    def _nystrom(self, q, k, v, m, iterations, landmark_real, key_real, eps, pinv_init, scale):
        b, h, length, d = q.shape
        segment = length // m
        if landmark_real is None:  # plain segment means
            q_land, k_land = (x.reshape(b, h, m, segment, d).mean(3) for x in (q, k))
            has = torch.ones(b, m, dtype=torch.bool)
        else:  # means over the real tokens of each segment, count + eps
            weight = landmark_real.to(torch.float64)[:, None, :, None]
            count = landmark_real.reshape(b, m, segment).sum(-1).to(torch.float64)  # (B, m)
            divisor = torch.where(count > 0, count + eps, 1.0)[:, None, :, None]
            q_land, k_land = ((x * weight).reshape(b, h, m, segment, d).sum(3) / divisor for x in (q, k))
            has = count > 0
        allowed3 = has[:, None, :, None] if key_real is None else has[:, None, :, None] & key_real[:, None, None, :]
        kernel1 = _softmax(scale * q @ k_land.transpose(-1, -2), has[:, None, None, :])
        kernel2 = _softmax(scale * q_land @ k_land.transpose(-1, -2), has[:, None, :, None] & has[:, None, None, :])
        kernel3 = _softmax(scale * q_land @ k.transpose(-1, -2), allowed3)
        return kernel1 @ (self._pinv(kernel2, iterations, pinv_init) @ (kernel3 @ v))

    def _pinv(self, a, iterations, pinv_init):
        if self.bug == "NYSTROM_PINV_ITERATIONS":
            return torch.linalg.pinv(a)  # bug NYSTROM_PINV_ITERATIONS
        if self.bug == "NYSTROM_BATCH_COUPLED_INIT":
            pinv_init = "per_matrix"  # bug NYSTROM_BATCH_COUPLED_INIT
        row_sums, col_sums = a.abs().sum(-1), a.abs().sum(-2)  # (B, H, m)
        if pinv_init == "batch_global":  # lucidrains: torch.max(col) * torch.max(row)
            z = a.transpose(-1, -2) / (row_sums.max() * col_sums.max())
        else:
            z = a.transpose(-1, -2) / (row_sums.amax(-1) * col_sums.amax(-1))[..., None, None]
        eye = torch.eye(a.shape[-1], dtype=a.dtype)
        for _ in range(iterations):
            az = a @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
        return z

    def _conv(self, v, kernel):
        """out[n] = Σ_t kernel[h, t] v[n + t − K//2] (PyTorch's Conv2d with groups = heads)."""
        if self.bug == "NYSTROM_CONV":
            kernel = kernel.flip(-1)  # bug NYSTROM_CONV
        weight = kernel[:, None, :, None]  # (H, 1, K, 1)
        return torch.nn.functional.conv2d(v, weight, padding=(kernel.shape[1] // 2, 0), groups=v.shape[1])


class SmallPerformer(Small):
    """D⁻¹ Â V with Â_ij = φ(q_i)·φ(k_j) as query i sees key j, written from performer-pytorch's softmax_kernel."""

    def _forward(self, q, k, v, omega, causal=False, query_stabilizer="row", key_stabilizer=None, feature_eps=0.0,
                 denominator_feature_eps=0.0, denominator_guard=0.0, preset=None):  # fmt: skip (values written out)
        if key_stabilizer is None:
            key_stabilizer = "prefix" if causal else "global"
        if self.bug == "PERFORMER_CAUSAL_KEY_MAX" and causal:
            key_stabilizer = "prefix"  # bug PERFORMER_CAUSAL_KEY_MAX
        heads, nq, nk = q.shape[1], q.shape[2], k.shape[2]
        d, ratio = q.shape[-1], omega.shape[0] ** -0.5
        q, k, v = q * d**-0.25, _repeat_heads(k, heads) * d**-0.25, _repeat_heads(v, heads)
        q_proj, k_proj = q @ omega.T, k @ omega.T  # (B, H, N, m)
        q_half, k_half = (0.5 * (x * x).sum(-1, keepdim=True) for x in (q, k))
        q_level = q_proj.amax(-1, keepdim=True).detach() if query_stabilizer == "row" else 0.0
        phi_q = ratio * (torch.exp(q_proj - q_half - q_level) + feature_eps)
        key_eps = 0.0 if self.bug == "PERFORMER_FEATURE_EPS" else feature_eps  # bug PERFORMER_FEATURE_EPS
        key_max = k_proj.amax(-1).detach()  # (B, H, Nk)
        level = {"none": torch.zeros_like(key_max), "global": key_max.amax(-1, keepdim=True).expand_as(key_max),
                 "prefix": torch.cummax(key_max, -1).values}[key_stabilizer]  # fmt: skip
        allowed = torch.ones(nq, nk, dtype=torch.bool)
        if causal:
            allowed = torch.tril(allowed)
        # The level query i applies to key j: its own level for "prefix" (L_i), else key j's (L_j).
        seen = level[..., :, None].expand(-1, -1, nq, nk) if key_stabilizer == "prefix" else level[..., None, :].expand(-1, -1, nq, nk)
        if self.bug == "PERFORMER_STABILIZER":
            seen = key_max[..., None, :].expand(-1, -1, nq, nk)  # bug PERFORMER_STABILIZER
        exponent = torch.where(allowed[..., None], (k_proj - k_half)[..., None, :, :] - seen[..., None], -math.inf)  # (B, H, Nq, Nk, m)
        phi_k = ratio * torch.where(allowed[..., None], torch.exp(exponent) + key_eps, 0.0)
        implied = torch.einsum("bhqf,bhqkf->bhqk", phi_q, phi_k)
        denominator = implied.sum(-1)
        if self.bug != "PERFORMER_DENOMINATOR":  # bug PERFORMER_DENOMINATOR
            denominator = denominator + denominator_feature_eps * phi_q.sum(-1)
            denominator = torch.where(denominator.abs() <= denominator_guard, denominator + 2 * denominator_guard, denominator)
        return implied @ v / denominator[..., None], None


SMALL = {"lowrank": SmallLowRank, "linformer": SmallLinformer, "nystrom": SmallNystrom, "performer": SmallPerformer}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lowrank_suite")
    export(folder, mechanisms=list(MECHANISMS))
    return load_suite(folder)


def test_every_lowrank_flag_is_used_and_has_a_wrong_implementation(suite):
    used = {flag for case in suite.cases for flag in case.flags}
    assert set(FLAGS) <= used
    assert set(BUGS) == set(FLAGS)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_small_implementation_passes_every_case(mechanism, suite):
    report = verify(SMALL[mechanism](), suite=suite, mechanism=mechanism, grad=True)
    assert report.ok, report.format()
    assert all(case.status == "pass" for case in report.cases)


@pytest.mark.parametrize("flag", sorted(BUGS))
def test_wrong_implementation_fails_a_flagged_case(flag, suite):
    flagged = suite.select(flags=flag)
    mechanism = flagged.cases[0].mechanism
    report = verify(SMALL[mechanism](bug=flag), suite=flagged, mechanism=mechanism, grad=True)
    assert any(case.status == "fail" for case in report.cases), f"no {flag} case catches a kernel that {BUGS[flag]}"
