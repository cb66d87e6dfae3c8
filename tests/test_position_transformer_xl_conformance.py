"""Transformer-XL conformance cases: well formed, passed by an independent implementation and by the
Numba backend, and failed by a wrong variant of each flag this mechanism adds.

:class:`SmallTransformerXL` is written from the spec in torch (float64), independently of
refattn's reference: each pair's row of ``r`` is gathered by indexing, and the
gradients come from autograd. ``SmallTransformerXL(bug=FLAG)`` makes the
mistake the flag names, as tests/wrong_impls.py does for dense's flags; the
one line of each mistake is marked ``# bug FLAG``.
"""

import zlib
from functools import partial

import numpy as np
import pytest

import refattn.conformance.flags as catalogue
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from refattn.position.transformer_xl import MECHANISM, cases, transformer_xl_attention, transformer_xl_attention_vjp

#: The Transformer-XL flags, from the catalogue.
FLAGS = {name: text for name, text in catalogue.catalogue().items() if name.startswith("XL_")}

#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "XL_REL_SHIFT": "reads r in ascending order of distance (row t for distance t)",
    "XL_BIAS_TERMS": "adds u to q in the position term and v_bias in the content term (swapped)",
    "XL_MEMORY": "measures distances from query indices, i - j, without the memory offset",
    "XL_EXPLICIT_POSITIONS": "derives distances from indices, i + Nk - Nq - j, instead of the positions",
    "XL_SOFTCAP_SCOPE": "soft-caps the content term alone and adds the position term after the cap",
    "XL_TABLE_GRADIENTS": "returns the gradient of r of batch element 0 only",
}


class SmallTransformerXL:
    """Transformer-XL attention in torch: ``impl(q, k, v, **params) -> (out, lse)`` and ``impl.vjp``."""

    def __init__(self, bug=None):
        self.bug = bug

    def __call__(self, q, k, v, **params):
        out, lse = self._forward(self._tensors(q, k, v, params), params)
        return out.numpy(), lse.numpy()

    def vjp(self, dout, q, k, v, dlse=None, **params):
        import torch

        tensors = self._tensors(q, k, v, params)
        for tensor in tensors.values():
            tensor.requires_grad_(True)
        out, lse = self._forward(tensors, params)
        loss = (out * torch.tensor(np.asarray(dout, np.float64))).sum()
        if dlse is not None:
            finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
            loss = loss + (finite_lse * torch.tensor(np.asarray(dlse, np.float64))).sum()
        loss.backward()
        grads = {name: tensor.grad.numpy() for name, tensor in tensors.items()}
        if self.bug == "XL_TABLE_GRADIENTS":
            first = dict(params, **_first_batch(params), dlse=None if dlse is None else dlse[:1])
            grads["r"] = SmallTransformerXL().vjp(dout[:1], q[:1], k[:1], v[:1], **first)["r"]  # bug XL_TABLE_GRADIENTS
        return grads

    @staticmethod
    def _tensors(q, k, v, params):
        import torch

        names = ("r", "u", "v_bias", "bias")
        arrays = dict(q=q, k=k, v=v, **{name: params[name] for name in names if params.get(name) is not None})
        return {name: torch.tensor(np.asarray(x, np.float64)) for name, x in arrays.items()}

    def _forward(self, t, params):
        import torch

        q, k, v, r, u, v_bias = t["q"], t["k"], t["v"], t["r"], t["u"], t["v_bias"]
        b, hq, nq, d = q.shape
        nk, n_rows = k.shape[2], r.shape[1]
        group = hq // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if self.bug == "XL_BIAS_TERMS":
            u, v_bias = v_bias, u  # bug XL_BIAS_TERMS
        # Distances and rows.
        distance = torch.from_numpy(params["q_positions"][:, None] - params["k_positions"][None, :])
        i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
        if self.bug == "XL_MEMORY":
            distance = i - j  # bug XL_MEMORY
        if self.bug == "XL_EXPLICIT_POSITIONS":
            distance = i + nk - nq - j  # bug XL_EXPLICIT_POSITIONS
        rows = distance if self.bug == "XL_REL_SHIFT" else n_rows - 1 - distance  # bug XL_REL_SHIFT
        has_row = (rows >= 0) & (rows < n_rows)
        # Scores: content term, and position term with each pair's row gathered.
        scale = params.get("scale") or 1 / d**0.5
        content = torch.einsum("bhid,bhjd->bhij", q + u[:, None], k)
        r_of_pair = r[:, rows.clamp(0, n_rows - 1)]  # (Hq, Nq, Nk, D)
        position = torch.einsum("bhid,hijd->bhij", q + v_bias[:, None], r_of_pair) * has_row
        scores = scale * (content + position)
        cap = params.get("softcap") or 0.0
        if cap > 0 and self.bug == "XL_SOFTCAP_SCOPE":
            scores = cap * torch.tanh(scale * content / cap) + scale * position  # bug XL_SOFTCAP_SCOPE
        elif cap > 0:
            scores = cap * torch.tanh(scores / cap)
        if "bias" in t:
            scores = scores + t["bias"]
        # Mask, softmax, dropout, values.
        allowed = torch.from_numpy(np.broadcast_to(_allowed(params, nq, nk), scores.shape).copy())
        masked = scores.masked_fill(~allowed, -float("inf"))
        lse = torch.logsumexp(masked, dim=-1)
        weights = torch.exp(masked - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        if params.get("dropout_keep") is not None:
            weights = weights * torch.from_numpy(params["dropout_keep"]) / (1 - params["dropout_p"])
        return weights @ v, lse


def _allowed(params, nq, nk):
    """The user mask AND causality AND the window, index-based (spec/README.md)."""
    offset = nk - nq if params.get("causal_alignment", "bottom_right") == "bottom_right" else 0
    i, j = np.arange(nq)[:, None] + offset, np.arange(nk)[None, :]
    allowed = np.ones((nq, nk), bool) if params.get("mask") is None else params["mask"]
    if params.get("causal"):
        allowed = allowed & (j <= i)
    left, right = params.get("window") or (None, None)
    if left is not None:
        allowed = allowed & (j >= i - left)
    if right is not None:
        allowed = allowed & (j <= i + right)
    return allowed


def _first_batch(params):
    """Batch-dependent parameters restricted to batch element 0."""
    return {name: params[name][:1] for name in ("bias", "mask", "dropout_keep")
            if params.get(name) is not None and np.ndim(params[name]) == 4}  # fmt: skip


CORRECT = SmallTransformerXL()
WRONG = {flag: SmallTransformerXL(bug=flag) for flag in BUGS}


@pytest.fixture(scope="module")
def suite():
    """The committed transformer_xl cases."""
    return load_suite(default_suite_folder()).select(mechanisms="transformer_xl")


def test_cases_are_well_formed():
    all_cases = cases.cases()
    assert [case.id for case in MECHANISM.cases()] == [case.id for case in all_cases]
    for case in all_cases:
        assert case.id.startswith("transformer_xl/") and case.mechanism == "transformer_xl"
        assert case.seed == zlib.crc32(case.id.encode())
        assert set(case.flags) <= set(FLAGS) | set(catalogue.FLAGS), case.id
    assert set(FLAGS) <= {flag for case in all_cases for flag in case.flags}, "every flag described is carried"


def test_cases_store_positions_as_integer_parameters(suite):
    for case in suite.cases:
        assert {"q", "k", "v", "r", "u", "v_bias"} <= set(case.inputs), case.id
        assert case.array_params["q_positions"].dtype == case.array_params["k_positions"].dtype == np.int64


def test_the_independent_implementation_passes_every_case(suite):
    pytest.importorskip("torch")
    report = verify(CORRECT, suite=suite, grad=True)
    assert report.ok, report.format()


@pytest.mark.parametrize("flag", sorted(BUGS))
def test_wrong_implementation_fails_a_flagged_case(flag, suite):
    pytest.importorskip("torch")
    flagged = suite.select(flags=flag)
    assert flagged.cases
    report = verify(WRONG[flag], suite=flagged, grad=True)
    failed = [case for case in report.cases if case.status == "fail"]
    assert failed, f"no {flag} case catches a kernel that {BUGS[flag]}:\n{report.format()}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numba_backend_passes_every_case(suite, dtype):
    report = verify(partial(transformer_xl_attention, backend="numba"), suite=suite, dtype=dtype, grad=True,
                    vjp=partial(transformer_xl_attention_vjp, backend="numba"))  # fmt: skip
    assert report.ok, report.format()
