"""The segmented-family conformance cases catch the mistakes their flags name.

The cases are a fresh export of the five cases.py modules. ``Small`` is each
mechanism written here in PyTorch (float64, autograd for the gradients) from
spec/segmented.md as one softmax per row over an explicit weight per key
(0 = not a key, m = a key counted m times), independently of refattn's
references and kernels; ``Small(bug=FLAG)`` makes the one mistake that ``FLAG``
names, each marked ``# bug FLAG`` where it changes a line. Every wrong variant
must fail at least one case carrying its flag, while the correct one passes them
all, gradients included.
"""

import math

import numpy as np
import pytest

import refattn.segmented  # noqa: F401  (registers the family)
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import verify
from refattn.core.results import Result
from refattn.segmented.bigbird import cases as bigbird_cases
from refattn.segmented.local import cases as local_cases
from refattn.segmented.longformer import cases as longformer_cases
from refattn.segmented.segments import cases as segments_cases
from refattn.segmented.sliding import cases as sliding_cases

torch = pytest.importorskip("torch")

MODULES = {"segmented": segments_cases, "sliding_window": sliding_cases, "longformer": longformer_cases,
           "bigbird": bigbird_cases, "local": local_cases}  # fmt: skip

#: What each wrong variant gets wrong, in the words of a bug report, per mechanism.
BUGS = {
    "segmented": {
        "SEGMENT_BOUNDARY": "puts token i in segment (i + 1) // L",
        "LAST_SEGMENT_SHORT": "divides the last segment's mean by L although it is short",
        "LAST_SEGMENT_PADDED": "divides a padded last segment's mean by its real token count",
        "INTER_SEGMENT_SUM": "adds the summary attention's output twice",
        "INTER_SEGMENT_GATE": "applies the gate to the summary term and 1 - g to the local one",
        "INTER_SEGMENT_LSE_MERGE": "averages the local and the summary outputs instead of one softmax",
        "INTER_SEGMENT_CONCAT": "concatenates [summary, local] instead of [local, summary]",
        "CAUSAL_SUMMARY_EXCLUDE": "lets a causal token see its own segment's whole summary",
        "CAUSAL_SUMMARY_PREFIX": "uses the whole own segment's summary instead of the prefix",
        "POOLING_FIRST_TOKEN": "pools the last token of each segment",
        "POOLING_GIVEN": "ignores the given pooling matrix and takes means",
    },
    "sliding_window": {
        "WINDOW_COUNT_HF_CAUSAL": "keeps W + 1 keys for HF's causal window",
        "WINDOW_COUNT_HF_BIDIRECTIONAL": "keeps W // 2 keys per side for HF's bidirectional window",
        "WINDOW_COUNT_MISTRAL": "keeps W keys for Mistral's window",
        "WINDOW_COUNT_LONGFORMER": "keeps W keys per side for Longformer's attention_window",
    },
    "longformer": {
        "LONGFORMER_BAND": "takes attention_window keys per side",
        "LONGFORMER_GLOBAL_ONCE": "counts a global key inside the band twice",
        "LONGFORMER_GLOBAL_ROWS": "restricts global rows to their band and the global keys",
        "LONGFORMER_GLOBAL_PROJECTIONS": "lets local rows see the global keys through k_global, v_global",
        "LONGFORMER_PADDING": "pads to a window multiple without masking the padding keys",
    },
    "bigbird": {
        "BIGBIRD_GLOBAL_BLOCKS": "gives the first and last query blocks the middle blocks' pattern",
        "BIGBIRD_UNION": "counts a random block that is also sliding twice (canonical)",
        "BIGBIRD_RANDOM_PER_HEAD": "uses head 0's random blocks for every head",
        "BIGBIRD_HF_REPEATED_BLOCKS": "counts each listed block once under the hf preset",
        "BIGBIRD_HF_SHORT_FULL": "stays block sparse for short sequences under the hf preset",
        "BIGBIRD_ETC_GLOBAL_TOKENS": "keeps ITC's global blocks 0 and nb - 1 among the sequence in ETC",
    },
    "local": {
        "LOCAL_LOOK_AROUND": "swaps look_backward and look_forward",
        "LOCAL_EXACT_WINDOW": "keeps whole look-around blocks with exact_windowsize",
        "LOCAL_SHARED_QK_SELF_SCORE": "masks a query's own key (-inf) instead of scoring it -5e4",
        "LOCAL_ROTARY_POSITIONS": "shifts the queries' rotary positions by window_size * look_forward",
        "LOCAL_AUTOPAD_MASKED": "attends the zero padding keys",
        "LOCAL_LUCIDRAINS_ROTARY_SHIFT": "uses absolute query positions under the lucidrains preset",
        "LOCAL_LUCIDRAINS_PADDING_ATTENDED": "masks the padding keys under the lucidrains preset",
    },
}


# --------------------------------------------------------------------------
# One softmax per row over explicitly weighted keys.
# --------------------------------------------------------------------------


def _attend(q, k, v, weights, scale, fixed=None, fixed_score=-5e4):
    """q (B, Hq, N, D), k (B, Hkv, M, D), v (B, Hkv, M, Dv); weights broadcastable to (B, Hq, N, M):
    a key counted w times (0: not a key); ``fixed`` (N, M) bool: the logit is the constant ``fixed_score``."""
    scale = q.shape[3] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    if fixed is not None:
        logits = torch.where(torch.tensor(fixed), torch.tensor(fixed_score, dtype=torch.float64), logits)
    weights = torch.tensor(np.broadcast_to(weights, logits.shape).astype(np.float64))
    logits = torch.where(weights > 0, logits + torch.log(torch.clamp(weights, min=1e-300)), -math.inf)
    lse = torch.logsumexp(logits, -1)
    p = torch.where(weights > 0, torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return torch.einsum("bhij,bhje->bhie", p, v), lse


DIFFERENTIABLE = ("gate", "projection", "q_global", "k_global", "v_global")


class Small:
    """The five mechanisms in PyTorch; ``bug`` names one flag's mistake."""

    def __init__(self, mechanism, bug=None):
        self.mechanism, self.bug = mechanism, bug

    def __call__(self, q, k, v, **params):
        with torch.no_grad():
            tensors = {n: torch.tensor(x, dtype=torch.float64) for n, x in params.items()
                       if n in DIFFERENTIABLE and x is not None}  # fmt: skip
            rest = {n: x for n, x in params.items() if n not in DIFFERENTIABLE}
            out, lse = self._forward(*(torch.tensor(x, dtype=torch.float64) for x in (q, k, v)), **tensors, **rest)
        return Result(out=out.numpy(), lse=lse.numpy())

    def vjp(self, dout, q, k, v, *, dlse=None, **params):
        leaves = {"q": q, "k": k, "v": v, **{n: x for n, x in params.items() if n in DIFFERENTIABLE and x is not None}}
        leaves = {n: torch.tensor(x, dtype=torch.float64, requires_grad=True) for n, x in leaves.items()}
        rest = {n: x for n, x in params.items() if n not in DIFFERENTIABLE}
        out, lse = self._forward(**leaves, **rest)
        loss = (out * torch.tensor(dout)).sum()
        if dlse is not None:
            loss = loss + torch.where(torch.isfinite(lse), lse * torch.tensor(dlse), 0.0).sum()
        loss.backward()
        return {n: t.grad.numpy() for n, t in leaves.items()}

    def _forward(self, q, k, v, **params):
        return getattr(self, "_" + self.mechanism)(q, k, v, **params)

    # --- segmented ----------------------------------------------------------------

    def _segmented(self, q, k, v, *, segment_len, causal=False, last_segment="short", pooling="mean",
                   integration="none", current_summary="exclude", gate=None, projection=None, scale=None):  # fmt: skip
        n, length, bug = q.shape[2], segment_len, self.bug
        segment = np.array([(i + 1 if bug == "SEGMENT_BOUNDARY" else i) // length for i in range(n)])  # bug SEGMENT_BOUNDARY
        count = -(-n // length)
        pool_first = isinstance(pooling, str) and pooling == "first"
        local = np.array([[segment[i] == segment[j] and (not causal or j <= i) for j in range(n)] for i in range(n)])
        local_out, local_lse = _attend(q, k, v, local, scale)
        if integration == "none":
            return local_out, local_lse
        pooled = np.zeros((count, n))
        for s in range(count):
            members = [j for j in range(n) if j // length == s]
            divisor = length if last_segment == "pad" else len(members)
            if bug == "LAST_SEGMENT_SHORT":
                divisor = length  # bug LAST_SEGMENT_SHORT
            if bug == "LAST_SEGMENT_PADDED":
                divisor = len(members)  # bug LAST_SEGMENT_PADDED
            first = members[-1] if bug == "POOLING_FIRST_TOKEN" else members[0]  # bug POOLING_FIRST_TOKEN
            for j in members:
                pooled[s, j] = (j == first) if pool_first else 1.0 / divisor
        if isinstance(pooling, np.ndarray) and bug != "POOLING_GIVEN":  # bug POOLING_GIVEN
            pooled = pooling
        seen = np.array([[not causal or s < i // length or (bug == "CAUSAL_SUMMARY_EXCLUDE" and s == i // length)
                          for s in range(count)] for i in range(n)])  # bug CAUSAL_SUMMARY_EXCLUDE
        prefix = causal and current_summary == "prefix"
        if prefix:
            rows = np.zeros((n, n))
            for i in range(n):
                members = [j for j in range(n) if j // length == i // length and (j <= i or bug == "CAUSAL_SUMMARY_PREFIX")]
                for j in members:  # bug CAUSAL_SUMMARY_PREFIX (above: the whole segment)
                    rows[i, j] = (j == members[0]) if pool_first else 1.0 / len(members)
            pooled = np.concatenate([pooled, rows])
            seen = np.concatenate([seen, np.eye(n, dtype=bool)], axis=1)
        pooled = torch.tensor(pooled)
        summary_k, summary_v = torch.einsum("sn,bhnd->bhsd", pooled, k), torch.einsum("sn,bhne->bhse", pooled, v)
        if integration == "concat":
            own = summary_v[:, :, [count + i if prefix else i // length for i in range(n)]]
            own = own.repeat_interleave(q.shape[1] // k.shape[1], 1)
            parts = [own, local_out] if bug == "INTER_SEGMENT_CONCAT" else [local_out, own]  # bug INTER_SEGMENT_CONCAT
            return torch.cat(parts, -1) @ projection, local_lse
        if integration == "lse_merge":
            if bug == "INTER_SEGMENT_LSE_MERGE":
                over_out, _ = _attend(q, summary_k, summary_v, seen, scale)
                return (local_out + over_out) / 2, local_lse  # bug INTER_SEGMENT_LSE_MERGE
            return _attend(q, torch.cat([k, summary_k], 2), torch.cat([v, summary_v], 2),
                           np.concatenate([local, seen], axis=1), scale)  # fmt: skip
        over_out, _ = _attend(q, summary_k, summary_v, seen, scale)
        if integration == "sum":
            return local_out + over_out * (2 if bug == "INTER_SEGMENT_SUM" else 1), local_lse  # bug INTER_SEGMENT_SUM
        if bug == "INTER_SEGMENT_GATE":
            return (1 - gate) * local_out + gate * over_out, local_lse  # bug INTER_SEGMENT_GATE
        return gate * local_out + (1 - gate) * over_out, local_lse

    # --- sliding windows -----------------------------------------------------------

    def _sliding_window(self, q, k, v, *, window_size, convention, scale=None):
        w, bug = window_size, self.bug
        rules = {
            "hf_causal": (w if bug == "WINDOW_COUNT_HF_CAUSAL" else w - 1, 0),  # bug WINDOW_COUNT_HF_CAUSAL
            "hf_bidirectional": (w // 2, w // 2) if bug == "WINDOW_COUNT_HF_BIDIRECTIONAL" else (w, w),
            "mistral": (w - 1 if bug == "WINDOW_COUNT_MISTRAL" else w, 0),  # bug WINDOW_COUNT_MISTRAL
            "longformer": (w, w) if bug == "WINDOW_COUNT_LONGFORMER" else (w // 2, w // 2),
        }  # bugs WINDOW_COUNT_HF_BIDIRECTIONAL and WINDOW_COUNT_LONGFORMER in their rows
        left, right = rules[convention]
        nq, nk = q.shape[2], k.shape[2]
        offset = nk - nq  # bottom-right
        allowed = np.array([[i + offset - left <= j <= i + offset + right for j in range(nk)] for i in range(nq)])
        return _attend(q, k, v, allowed, scale)

    # --- Longformer ----------------------------------------------------------------

    def _longformer(self, q, k, v, *, attention_window, global_tokens=None, q_global=None, k_global=None,
                    v_global=None, preset=None, scale=None):  # fmt: skip
        b_size, n, bug = q.shape[0], q.shape[2], self.bug
        global_tokens = np.zeros((b_size, n), bool) if global_tokens is None else global_tokens
        side = attention_window if bug == "LONGFORMER_BAND" else attention_window // 2  # bug LONGFORMER_BAND
        padded = -(-n // attention_window) * attention_window if preset == "hf" else n
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, padded - n))  # noqa: E731
        q, k, v = pad(q), pad(k), pad(v)
        glob = np.pad(global_tokens, [(0, 0), (0, padded - n)])
        real = np.arange(padded) < (padded if bug == "LONGFORMER_PADDING" else n)  # bug LONGFORMER_PADDING
        weights = np.zeros((b_size, 1, padded, padded))
        for b in range(b_size):
            for i in range(padded):
                for j in range(padded):
                    band = abs(i - j) <= side and real[j]
                    weights[b, 0, i, j] = (band and not glob[b, j]) + (glob[b, j] and real[j])
                    if bug == "LONGFORMER_GLOBAL_ONCE" and band and glob[b, j]:
                        weights[b, 0, i, j] = 2  # bug LONGFORMER_GLOBAL_ONCE
        shared = q_global is None
        qg, kg, vg = (q, k, v) if shared else (pad(q_global), pad(k_global), pad(v_global))
        if bug == "LONGFORMER_GLOBAL_PROJECTIONS" and not shared:
            both = np.where(glob[:, None, None, :], 1.0, 0.0)  # bug LONGFORMER_GLOBAL_PROJECTIONS
            local_out, local_lse = _attend(q, torch.cat([k, kg], 2), torch.cat([v, vg], 2),
                                           np.concatenate([weights - both * (weights > 0), both.repeat(padded, 2)], -1), scale)  # fmt: skip
        else:
            local_out, local_lse = _attend(q, k, v, weights, scale)
        every = np.broadcast_to(real, (padded, padded))
        if bug == "LONGFORMER_GLOBAL_ROWS":
            every = weights  # bug LONGFORMER_GLOBAL_ROWS
        global_out, global_lse = _attend(qg, kg, vg, every, scale)
        rows = torch.tensor(glob)[:, None, :]
        out = torch.where(rows[..., None], global_out, local_out)[:, :, :n]
        return out, torch.where(rows, global_lse, local_lse)[:, :, :n]

    # --- BigBird -------------------------------------------------------------------

    def _bigbird(self, q, k, v, *, block_size, random_blocks=None, extra_global_tokens=0, count_repeated_blocks=False,
                 short_sequence_full=False, random_blocks_avoid_pattern=False, preset=None, scale=None):  # fmt: skip
        g, heads, bug = extra_global_tokens, q.shape[1], self.bug
        n = q.shape[2] - g
        nb, r = n // block_size, random_blocks.shape[2]
        if count_repeated_blocks and bug == "BIGBIRD_HF_REPEATED_BLOCKS":
            count_repeated_blocks = False  # bug BIGBIRD_HF_REPEATED_BLOCKS
        if short_sequence_full and n <= (5 + 2 * r) * block_size and bug != "BIGBIRD_HF_SHORT_FULL":  # bug BIGBIRD_HF_SHORT_FULL
            return _attend(q, k, v, np.ones((n, n)), scale)
        glob = [] if g and bug != "BIGBIRD_ETC_GLOBAL_TOKENS" else [0, nb - 1]  # bug BIGBIRD_ETC_GLOBAL_TOKENS
        counts = np.zeros((heads, nb, nb))
        for h in range(heads):
            row_of = 0 if bug == "BIGBIRD_RANDOM_PER_HEAD" else h  # bug BIGBIRD_RANDOM_PER_HEAD
            for t in range(nb):
                if t in glob and bug != "BIGBIRD_GLOBAL_BLOCKS":  # bug BIGBIRD_GLOBAL_BLOCKS
                    counts[h, t] = 1
                    continue
                for s in set(glob + [t - 1, t, t + 1]) & set(range(nb)):
                    counts[h, t, s] = 1
                row = t if g else t - 1
                for s in (random_blocks[row_of, row] if 0 <= row < random_blocks.shape[1] else []):
                    repeat = count_repeated_blocks or bug == "BIGBIRD_UNION"  # bug BIGBIRD_UNION
                    counts[h, t, s] = counts[h, t, s] + 1 if repeat else 1
        weights = np.repeat(np.repeat(counts, block_size, 1), block_size, 2)
        weights = np.pad(weights, ((0, 0), (g, 0), (g, 0)), constant_values=1)[None]  # ETC: extra tokens see all
        return _attend(q, k, v, weights, scale)

    # --- local-attention ----------------------------------------------------------

    def _local(self, q, k, v, *, window_size, causal=False, look_backward=1, look_forward=None, exact_windowsize=False,
               shared_qk=False, self_score=-5e4, rotary=False, autopad=False, preset=None, attend_padding=False,
               rotary_query_shift=False, scale=None):  # fmt: skip
        ws, n, bug = window_size, q.shape[2], self.bug
        lb, lf = look_backward, (0 if causal else 1) if look_forward is None else look_forward
        if bug == "LOCAL_LOOK_AROUND":
            lb, lf = lf, lb  # bug LOCAL_LOOK_AROUND
        if bug == "LOCAL_AUTOPAD_MASKED" or (bug == "LOCAL_LUCIDRAINS_PADDING_ATTENDED" and attend_padding):
            attend_padding = not attend_padding  # bugs LOCAL_AUTOPAD_MASKED, LOCAL_LUCIDRAINS_PADDING_ATTENDED
        if bug == "LOCAL_ROTARY_POSITIONS" or (bug == "LOCAL_LUCIDRAINS_ROTARY_SHIFT" and rotary_query_shift):
            rotary_query_shift = not rotary_query_shift  # bugs LOCAL_ROTARY_POSITIONS, LOCAL_LUCIDRAINS_ROTARY_SHIFT
        padded = -(-n // ws) * ws
        k, v = (torch.nn.functional.pad(x, (0, 0, 0, padded - n)) for x in (k, v))
        if shared_qk:
            k = k / torch.clamp(torch.linalg.norm(k, dim=-1, keepdim=True), min=1e-12)
        if rotary:
            q = _rope(q, np.arange(n) + (ws * lf if rotary_query_shift else 0))
            k = _rope(k, np.arange(padded))
        whole_blocks = bug == "LOCAL_EXACT_WINDOW"
        allowed = np.array([[i // ws - lb <= j // ws <= i // ws + lf and (not causal or j <= i)
                             and (not exact_windowsize or whole_blocks or (j >= i - ws * lb and (causal or j <= i + ws * lf)))
                             and (j < n or attend_padding) for j in range(padded)] for i in range(n)])  # bug LOCAL_EXACT_WINDOW
        fixed = None
        if shared_qk:
            fixed = np.eye(n, padded, dtype=bool)
            if bug == "LOCAL_SHARED_QK_SELF_SCORE":
                allowed, fixed = allowed & ~fixed, None  # bug LOCAL_SHARED_QK_SELF_SCORE
        return _attend(q, k, v, allowed, scale, fixed, self_score)


def _rope(x, positions):
    """Half-layout RoPE over every dim, base 10000."""
    d = x.shape[-1]
    angles = torch.tensor(positions[:, None] * (1.0 / 10000 ** (np.arange(0, d, 2) / d))[None, :])
    cos, sin = torch.cos(angles).repeat(1, 2), torch.sin(angles).repeat(1, 2)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segmented_suite")
    export(folder, mechanisms=list(MODULES))
    return load_suite(folder)


@pytest.mark.parametrize("mechanism", sorted(MODULES))
def test_every_flag_is_used_and_has_a_wrong_implementation(mechanism):
    module = MODULES[mechanism]
    used = {flag for case in module.cases() for flag in case.flags}
    assert set(module.FLAGS) <= used
    assert set(module.FLAGS) == set(BUGS[mechanism])
    assert all(len(text) > 40 for text in module.FLAGS.values())


@pytest.mark.parametrize("mechanism", sorted(MODULES))
def test_the_small_implementation_passes_every_case(mechanism, suite):
    report = verify(Small(mechanism), suite=suite.select(mechanisms=mechanism), grad=True)
    assert report.ok, report.format()


@pytest.mark.parametrize("mechanism, flag", [(m, f) for m in sorted(BUGS) for f in sorted(BUGS[m])])
def test_wrong_implementation_fails_a_flagged_case(mechanism, flag, suite):
    report = verify(Small(mechanism, bug=flag), suite=suite.select(flags=flag))
    assert any(case.status == "fail" for case in report.cases), f"no {flag} case catches a kernel that {BUGS[mechanism][flag]}"
