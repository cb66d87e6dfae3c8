"""The RoPE and xPos conformance cases: every flag is caught, and HF's RoPE passes in float32.

A wrong implementation of each flag fails a flagged case.

:class:`SmallRotary` is RoPE and xPos written from the papers in vectorised
NumPy, independently of refattn's rotary code (attention itself is refattn's
dense reference, verified on its own). ``SmallRotary(bug=FLAG)`` makes the
mistake that ``FLAG`` names (``FLAGS`` in refattn/position/{rope,xpos}/cases.py); each mistake
is the line marked ``# bug FLAG``. The committed cases are checked with the
verifier, as a user's kernel would be. HF Llama's RoPE, written in torch from its code, passes the
RoPE cases in float32 and (its angles being float32) fails them in float64.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from refattn import dense_attention, dense_attention_vjp
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from refattn.position.rope.cases import FLAGS as ROPE_FLAGS
from refattn.position.xpos.cases import FLAGS as XPOS_FLAGS

#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "ROPE_LAYOUT": "pairs the dims in the other layout (half <-> interleaved)",
    "ROPE_PARTIAL": "pairs dim t with t + D/2 in the half layout, splitting the head dim instead of rotary_dim",
    "ROPE_FREQUENCY_EXPONENT": "spaces the frequencies over the head dim, base^(-2t/D), when rotary_dim < D",
    "ROPE_BASE": "ignores base and uses 10000",
    "ROPE_POSITION_OFFSET": "rotates the queries at positions 0 .. Nq - 1",
    "ROPE_POSITION_SCALING": "multiplies the positions by position_scale instead of dividing",
    "ROPE_EXPLICIT_POSITIONS": "rotates by the index arange(N) instead of the given positions",
    "ROPE_LARGE_POSITIONS": "forms the angles in bfloat16",
    "ROPE_TRANSPOSED_GRADIENT": "rotates dq and dk forward by R(theta) instead of back by R(theta)^T",
    "XPOS_SCALE_DIRECTION": "downscales the queries and upscales the keys",
    "XPOS_SCALE_BASE": "ignores scale_base and uses 512",
    "XPOS_DECAY_RATES": "computes zeta_t over the head dim, (2t/D + gamma)/(1 + gamma), when rotary_dim < D",
    "XPOS_SCALE_LAYOUT": "lays the factors out in the other layout than the rotation pairs",
    "XPOS_CENTRED_POSITIONS": "clamps negative positions to 0",
}


class SmallRotary:
    """RoPE (``xpos=False``) or xPos (``xpos=True``) attention, with an optional bug."""

    def __init__(self, xpos: bool, bug: str | None = None):
        self.xpos, self.bug = xpos, bug

    def _pairs(self, d, r, layout):
        if self.bug == "ROPE_LAYOUT":
            layout = {"half": "interleaved", "interleaved": "half"}[layout]  # bug ROPE_LAYOUT
        t = np.arange(r // 2)
        if layout == "interleaved":
            return 2 * t, 2 * t + 1
        if self.bug == "ROPE_PARTIAL":
            return t, t + d // 2  # bug ROPE_PARTIAL
        return t, t + r // 2

    def _tables(self, positions, d, r, p, downscale):
        """cos, sin of the angles and the xPos factors (1 for RoPE), each (N, r/2)."""
        positions = np.asarray(positions, np.float64)
        if self.bug == "XPOS_CENTRED_POSITIONS":
            positions = np.maximum(positions, 0.0)  # bug XPOS_CENTRED_POSITIONS
        spacing = d if self.bug == "ROPE_FREQUENCY_EXPONENT" else r  # bug ROPE_FREQUENCY_EXPONENT
        base = 10000.0 if self.bug == "ROPE_BASE" else p["base"]  # bug ROPE_BASE
        frequencies = base ** (-np.arange(0, r, 2) / spacing)  # (r/2,)
        scaled = positions / p["position_scale"]
        if self.bug == "ROPE_POSITION_SCALING":
            scaled = positions * p["position_scale"]  # bug ROPE_POSITION_SCALING
        theta = scaled[:, None] * frequencies[None, :]
        if self.bug == "ROPE_LARGE_POSITIONS":
            bf16 = ml_dtypes.bfloat16
            theta = (scaled.astype(bf16)[:, None] * frequencies.astype(bf16)).astype(np.float64)  # bug ROPE_LARGE_POSITIONS
        factors = np.ones_like(theta)
        if self.xpos:
            width = d if self.bug == "XPOS_DECAY_RATES" else r  # bug XPOS_DECAY_RATES
            zeta = (np.arange(0, r, 2) / width + p["gamma"]) / (1 + p["gamma"])
            scale_base = 512.0 if self.bug == "XPOS_SCALE_BASE" else p["scale_base"]  # bug XPOS_SCALE_BASE
            sign = -1.0 if downscale != (self.bug == "XPOS_SCALE_DIRECTION") else 1.0  # bug XPOS_SCALE_DIRECTION
            factors = zeta[None, :] ** (sign * positions[:, None] / scale_base)
        return np.cos(theta), np.sin(theta), factors

    def _transform(self, x, positions, p, downscale, transpose=False):
        """``S R x`` (or ``(S R)^T x = R^T S x``) on x (B, H, N, D)."""
        d = x.shape[-1]
        r = p["rotary_dim"] or d
        cos, sin, factors = self._tables(positions, d, r, p, downscale)
        first, second = self._pairs(d, r, p["layout"])
        if transpose and self.bug != "ROPE_TRANSPOSED_GRADIENT":  # bug ROPE_TRANSPOSED_GRADIENT
            sin = -sin
        factor_first, factor_second = first, second
        if self.bug == "XPOS_SCALE_LAYOUT":
            other_layout = {"half": "interleaved", "interleaved": "half"}[p["layout"]]
            factor_first, factor_second = self._pairs(d, r, other_layout)  # bug XPOS_SCALE_LAYOUT
        out = x.astype(np.float64)
        a, b = out[..., first].copy(), out[..., second].copy()
        out[..., first], out[..., second] = a * cos - b * sin, b * cos + a * sin
        # The factor of pair t multiplies the dims where pair t's factors are laid out.
        factor_of_dim = np.ones((x.shape[2], d))
        factor_of_dim[:, factor_first], factor_of_dim[:, factor_second] = factors, factors
        return out * factor_of_dim

    def _split(self, kwargs):
        p = dict(rotary_dim=None, base=10000.0, position_scale=1.0, scale_base=512.0, gamma=0.4, layout="half")
        p.update({name: kwargs.pop(name) for name in list(kwargs) if name in p})
        q_positions, k_positions = kwargs.pop("q_positions"), kwargs.pop("k_positions")
        if self.bug == "ROPE_POSITION_OFFSET":
            q_positions = np.arange(len(q_positions))  # bug ROPE_POSITION_OFFSET
        if self.bug == "ROPE_EXPLICIT_POSITIONS":
            q_positions, k_positions = np.arange(len(q_positions)), np.arange(len(k_positions))  # bug ROPE_EXPLICIT_POSITIONS
        return p, q_positions, k_positions, kwargs

    def __call__(self, q, k, v, **kwargs):
        p, q_positions, k_positions, dense = self._split(dict(kwargs))
        q = self._transform(q, q_positions, p, downscale=False)
        k = self._transform(k, k_positions, p, downscale=True)
        return dense_attention(q, k, v.astype(np.float64), **dense)

    def vjp(self, dout, q, k, v, dlse=None, **kwargs):
        p, q_positions, k_positions, dense = self._split(dict(kwargs))
        grads = dense_attention_vjp(dout, self._transform(q, q_positions, p, False), self._transform(k, k_positions, p, True),
                                    v.astype(np.float64), dlse=dlse, **dense)  # fmt: skip
        grads["q"] = self._transform(grads["q"], q_positions, p, downscale=False, transpose=True)
        grads["k"] = self._transform(grads["k"], k_positions, p, downscale=True, transpose=True)
        return grads


@pytest.fixture(scope="module")
def suite():
    """The committed rope and xpos cases."""
    return load_suite(default_suite_folder()).select(mechanisms=["rope", "xpos"])


def _check(implementation: SmallRotary, suite, mechanism: str):
    return verify(implementation, suite=suite, mechanism=mechanism, grad=True, vjp=implementation.vjp)


@pytest.mark.parametrize("mechanism", ["rope", "xpos"])
def test_the_correct_small_implementation_passes_every_case(suite, mechanism):
    report = _check(SmallRotary(xpos=mechanism == "xpos"), suite, mechanism)
    assert report.ok and report.counts()["pass"] == len(report.cases), report.format()


def test_every_flag_has_a_wrong_implementation():
    assert set(BUGS) == set(ROPE_FLAGS) | set(XPOS_FLAGS)


@pytest.mark.parametrize("flag", sorted(BUGS))
def test_wrong_implementation_fails_a_flagged_case(flag, suite):
    flagged = suite.select(flags=flag)
    assert flagged.cases, f"no case carries {flag}"
    failed = []
    for mechanism in ("rope", "xpos"):
        if any(case.mechanism == mechanism for case in flagged.cases):
            report = _check(SmallRotary(xpos=mechanism == "xpos", bug=flag), flagged, mechanism)
            failed += [case.id for case in report.cases if case.status == "fail"]
    assert failed, f"no {flag} case catches a kernel that {BUGS[flag]}"


# --------------------------------------------------------------------------
# A published implementation through the verifier: HF Llama's RoPE in torch.
# --------------------------------------------------------------------------

#: The RoPE cases in the half layout with no option that torch's SDPA lacks (soft-cap, dropout keep-mask).
HF_CASES = ["rope/half_layout", "rope/causal", "rope/partial_half", "rope/odd_head_dim", "rope/frequency_exponent",
            "rope/base_500000", "rope/linear_position_scaling", "rope/decode_offset", "rope/packed_positions",
            "rope/cross_positions", "rope/large_positions"]  # fmt: skip


def hf_llama_rope_attention(q, k, v, *, q_positions, k_positions, rotary_dim=None, base=10000.0, position_scale=1.0,
                            layout="half", causal=False, causal_alignment="bottom_right", softcap=0.0,
                            dropout_p=0.0):  # fmt: skip
    """HF Llama's RoPE as its code computes it (float32 inv_freq and angles, ``rotate_half``,
    linear scaling dividing inv_freq, GPT-NeoX-style partial rotary), then torch's SDPA with
    GQA heads repeated and a bottom-right causal mask."""
    import torch

    assert layout == "half"
    if causal_alignment != "bottom_right" or softcap or dropout_p:
        raise NotImplementedError("HF Llama's attention is bottom-right causal, without soft-cap or given dropout")
    r = rotary_dim or q.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r)) / position_scale

    def rotate(x, positions):
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x_rot, x_pass = x[..., :r], x[..., r:]
        half = torch.cat((-x_rot[..., r // 2 :], x_rot[..., : r // 2]), dim=-1)
        return torch.cat((x_rot * cos + half * sin, x_pass), dim=-1)

    group = q.shape[1] // k.shape[1]
    queries = rotate(q, q_positions)
    keys = torch.repeat_interleave(rotate(k, k_positions), group, dim=1)
    values = torch.repeat_interleave(v, group, dim=1)
    nq, nk = q.shape[2], k.shape[2]
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
    out = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed)
    scores = (queries @ keys.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return out, torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def test_hf_llama_rope_passes_in_float32_but_not_in_float64(suite):
    # Its float32 angles are within the float32 budgets, which include the float32 rounding
    # of the angles; in float64 its inv_freq alone is off by far more than 1e-10.
    pytest.importorskip("torch")
    from refattn.conformance.adapters import from_torch

    hf = from_torch(hf_llama_rope_attention)
    chosen = suite.select(ids=HF_CASES)
    float32 = verify(hf, suite=chosen, dtype="float32", grad=True)
    assert float32.ok and float32.counts()["pass"] == len(HF_CASES), float32.format()
    float64 = verify(hf, suite=chosen, dtype="float64", grad=True)
    assert float64.counts()["fail"] == len(HF_CASES)
