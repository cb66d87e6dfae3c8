"""The Shaw conformance cases catch the mistakes their flags name, and the numba backend passes them.

The cases are the committed suite's. ``SmallShaw`` is a Shaw
attention written here in PyTorch from the paper (autograd gives its
gradients), independently of refattn's reference; ``SmallShaw(bug=FLAG)``
makes the one mistake that the Shaw flag ``FLAG`` names, each marked
``# bug FLAG`` next to the line it replaces. Every wrong variant must fail
at least one case carrying its flag, while the correct one passes them all.
"""

import math
from functools import partial

import numpy as np
import pytest

from refattn.conformance import flags as catalogue
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import default_suite_folder, verify
from refattn.position.shaw import shaw_attention, shaw_attention_vjp
from refattn.position.shaw.cases import cases

torch = pytest.importorskip("torch")

#: The Shaw flags, from the catalogue.
FLAGS = {name: text for name, text in catalogue.catalogue().items() if name.startswith("SHAW_")}

#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "SHAW_CLIP": "wraps distances beyond K around the table (modulo 2K + 1) instead of clipping them",
    "SHAW_DIRECTION": "reads the tables at q_position - k_position (Hugging Face BERT's distance), unmirrored",
    "SHAW_VALUE_TERM": "leaves the relative value term out (out = P v)",
    "SHAW_SCALE": "adds q · rel_k[r] after scaling q · k",
    "SHAW_TABLE_GRADIENT": "keeps only query head 0's contribution to the table gradients",
    "SHAW_POSITIONS": "ignores the given positions and uses arange(Nq) and arange(Nk)",
}


class SmallShaw:
    """Shaw attention in PyTorch, float64, from eqs. (3)-(5); ``bug`` names one Shaw flag's mistake."""

    def __init__(self, bug=None):
        self.bug = bug

    def __call__(self, q, k, v, **params):
        out, lse = self._forward(*(torch.tensor(x) for x in (q, k, v)), **self._tensors(params))
        return out.detach().numpy(), lse.detach().numpy()

    def vjp(self, dout, q, k, v, *, dlse=None, **params):
        inputs = {name: torch.tensor(x, requires_grad=True) for name, x in dict(q=q, k=k, v=v).items()}
        tensors = self._tensors(params)
        for name in ("rel_k", "rel_v", "bias"):
            if tensors.get(name) is not None:
                inputs[name] = tensors[name].requires_grad_()
        out, lse = self._forward(inputs["q"], inputs["k"], inputs["v"], **tensors)
        loss = (out * torch.tensor(dout)).sum()
        if dlse is not None:
            loss = loss + torch.where(torch.isfinite(lse), lse * torch.tensor(dlse), 0.0).sum()
        loss.backward()
        return {name: (torch.zeros_like(x) if x.grad is None else x.grad).numpy() for name, x in inputs.items()}

    @staticmethod
    def _tensors(params):
        return {name: torch.tensor(x) if isinstance(x, np.ndarray) else x for name, x in params.items()}

    def _forward(self, q, k, v, *, rel_k, rel_v, q_positions, k_positions, max_relative_position, mask=None,
                 bias=None, causal=False, causal_alignment="bottom_right", window=None, scale=None, softcap=0.0,
                 dropout_keep=None, dropout_p=0.0):  # fmt: skip
        batch, heads, nq, d = q.shape
        nk, group = k.shape[2], heads // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        clip = max_relative_position
        if self.bug == "SHAW_POSITIONS":
            q_positions, k_positions = torch.arange(nq), torch.arange(nk)  # bug SHAW_POSITIONS
        distance = k_positions[None, :] - q_positions[:, None]  # (Nq, Nk)
        if self.bug == "SHAW_DIRECTION":
            distance = -distance  # bug SHAW_DIRECTION
        index = distance.clamp(-clip, clip) + clip
        if self.bug == "SHAW_CLIP":
            index = (distance + clip) % (2 * clip + 1)  # bug SHAW_CLIP
        rel_k_rows = torch.stack([self._for_head(rel_k, h)[index] for h in range(heads)])  # (H, Nq, Nk, D)
        rel_v_rows = torch.stack([self._for_head(rel_v, h)[index] for h in range(heads)])  # (H, Nq, Nk, Dv)

        scale = 1 / math.sqrt(d) if scale is None else scale
        position_term = torch.einsum("bhqd,hqkd->bhqk", q, rel_k_rows)
        s = scale * (q @ k.transpose(-1, -2) + position_term)
        if self.bug == "SHAW_SCALE":
            s = scale * (q @ k.transpose(-1, -2)) + position_term  # bug SHAW_SCALE
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        if bias is not None:
            s = s + bias
        s = s.masked_fill(~self._allowed(batch, heads, nq, nk, mask, causal, causal_alignment, window), -math.inf)
        row_max = s.amax(-1, keepdim=True).detach()
        has_key = torch.isfinite(row_max)
        exp = torch.exp(s - torch.where(has_key, row_max, 0.0))
        total = exp.sum(-1, keepdim=True)
        safe_total = torch.where(has_key, total, 1.0)
        p = exp / safe_total
        lse = torch.where(has_key, torch.where(has_key, row_max, 0.0) + torch.log(safe_total), -math.inf)[..., 0]
        if dropout_keep is not None:
            p = p * dropout_keep / (1 - dropout_p)
        out = p @ v + torch.einsum("bhqk,hqke->bhqe", p, rel_v_rows)
        if self.bug == "SHAW_VALUE_TERM":
            out = p @ v  # bug SHAW_VALUE_TERM
        return out, lse

    def _for_head(self, table, head):
        if self.bug == "SHAW_TABLE_GRADIENT" and head > 0:
            return table.detach()  # bug SHAW_TABLE_GRADIENT
        return table

    @staticmethod
    def _allowed(batch, heads, nq, nk, mask, causal, causal_alignment, window):
        aligned = torch.arange(nq)[:, None] + (nk - nq if causal_alignment == "bottom_right" else 0)
        key = torch.arange(nk)[None, :]
        allowed = torch.ones(batch, heads, nq, nk, dtype=torch.bool)
        if causal:
            allowed = allowed & (key <= aligned)
        if window is not None and window[0] is not None:
            allowed = allowed & (key >= aligned - window[0])
        if window is not None and window[1] is not None:
            allowed = allowed & (key <= aligned + window[1])
        return allowed if mask is None else allowed & mask


@pytest.fixture(scope="module")
def suite():
    return load_suite(default_suite_folder()).select(mechanisms="shaw")


def test_every_shaw_flag_is_used_and_has_a_wrong_implementation():
    used = {flag for case in cases() for flag in case.flags}
    assert set(FLAGS) <= used
    assert used <= set(FLAGS) | set(catalogue.FLAGS)
    assert set(BUGS) == set(FLAGS)


def test_the_small_implementation_passes_every_case(suite):
    report = verify(SmallShaw(), suite=suite, grad=True)
    assert report.ok, report.format()


@pytest.mark.parametrize("flag", sorted(BUGS))
def test_wrong_implementation_fails_a_flagged_case(flag, suite):
    report = verify(SmallShaw(bug=flag), suite=suite.select(flags=flag), grad=True)
    assert any(case.status == "fail" for case in report.cases), f"no {flag} case catches a kernel that {BUGS[flag]}"


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_numba_backend_passes_the_suite(dtype, suite):
    report = verify(partial(shaw_attention, backend="numba"), vjp=partial(shaw_attention_vjp, backend="numba"), suite=suite,
                    grad=True, dtype=dtype)  # fmt: skip
    assert report.ok, report.format()
