"""The LSH conformance cases catch the mistakes their flags name.

The cases are a fresh export of refattn/lsh/cases.py (what ``refattn export --check``
holds the committed suite to). ``SmallLSH`` is LSH attention
written here in PyTorch from spec/lsh.md, window by window and independently of
refattn's reference (autograd gives its gradients); ``SmallLSH(bug=FLAG)``
makes the one mistake that the flag ``FLAG`` names, each marked ``# bug FLAG``
next to the line it replaces. Every wrong variant must fail at least one case
carrying its flag, while the correct one passes them all, gradients included.
LSH cases have one shared ``qk`` input: verify() calls ``impl(qk, v, ...)``.
"""

import math

import numpy as np
import pytest

import refattn.lsh  # noqa: F401  (registers "lsh")
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import verify
from refattn.core.results import Result
from refattn.lsh.cases import FLAGS, cases

torch = pytest.importorskip("torch")

#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "LSH_FACTORISED_BUCKETS": "combines factorised buckets with the first factor most significant",
    "WRAPPED_LOOKBACK": "drops neighbouring chunks before the first and after the last instead of wrapping",
    "SELF_ONLY_ROW": "excludes self pairs exactly (-inf) instead of giving them the self value",
    "PADDING_BUCKET": "offsets round r by r·n instead of r·(n + 1) when the padding bucket exists",
    "MULTI_ROUND_COMBINE": "averages the rounds' outputs and log-sum-exps",
    "DUP_COUNT": "ignores dup_correction",
    "DUP_COUNT_CROSS_ROUND": "counts a key only through same-round windows (trax v1, reformer-pytorch)",
    "CHUNK_STRADDLES_ROUNDS": "chunks each round on its own, windows wrapping within the round",
    "SHORT_SEQUENCE_FALLBACK": "hashes even when N <= chunk_len",
    "LSH_STABLE_SORT": "orders the tokens of a bucket by decreasing position",
    "LSH_KEY_NORMALISATION": "normalises the queries as well as the keys",
    "LSH_CAUSAL_POSITIONS": "applies the causal mask to sorted slots instead of positions",
    "LSH_MASK_MODE": "adds the mask constants where the preset replaces, and replaces where it adds",
    "LSH_PADDED_QUERIES": "masks padded keys only, whatever mask_padded_queries says",
    "LSH_TRAX_PADDING_MARKS": "gives every i == j the self value and masks padded keys by the mask alone under trax",
    "LSH_REFORMER_PYTORCH_DUP_COUNT": "counts every occurrence under the lucidrains preset (not reformer-pytorch's count)",
    "LSH_TIES": "takes the last index on a tied argmax",
    "EXACT_TIES": "breaks exact ties the other way: the last index on a tied argmax",
    "LSH_DUP_COUNT_SELF_PAIRS": "skips the duplicate correction on self pairs",
    "LSH_PADDING_BUCKET_IF_MASK": "adds the padding bucket only when a token is padded, whatever padding_bucket says",
}


class SmallLSH:
    """LSH attention in PyTorch, float64, window by window; ``bug`` names one LSH flag's mistake."""

    def __init__(self, bug=None):
        self.bug = bug

    def __call__(self, qk, v, **params):
        with torch.no_grad():
            out, lse, buckets = self._forward(torch.tensor(qk, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), **params)
        return Result(out=out.numpy(), lse=lse.numpy(), aux={} if buckets is None else {"buckets": buckets})

    def vjp(self, dout, qk, v, *, dlse=None, **params):
        qk = torch.tensor(qk, dtype=torch.float64, requires_grad=True)
        values = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        out, lse, _ = self._forward(qk, values, **params)
        loss = (out * torch.tensor(dout)).sum()
        if dlse is not None:
            loss = loss + torch.where(torch.isfinite(lse), lse * torch.tensor(dlse), 0.0).sum()
        loss.backward()
        return {"qk": qk.grad.numpy(), "v": values.grad.numpy()}

    def _forward(self, qk, v, *, rotations, num_buckets, num_hashes, chunk_len, causal=False, key_padding_mask=None,
                 **behaviours):  # fmt: skip
        batch, heads, n, _ = qk.shape
        rotations = np.broadcast_to(rotations, (batch,) + rotations.shape[-4:])
        factors = list(num_buckets) if isinstance(num_buckets, (list, tuple)) else [num_buckets]
        valid = None if key_padding_mask is None else np.broadcast_to(key_padding_mask, (batch, n))
        short = behaviours["short_sequence"] == "full" and n <= chunk_len
        if self.bug == "SHORT_SEQUENCE_FALLBACK":
            short = False  # bug SHORT_SEQUENCE_FALLBACK
        outs, lses, buckets = [], [], []
        for b in range(batch):
            for h in range(heads):
                if short:
                    bucket, windows, rounds = None, [(list(range(n)), list(range(n)))], 1
                else:
                    bucket = self._buckets(qk[b, h].detach().numpy(), rotations[b, h], factors, valid, b, behaviours)
                    windows, rounds = self._windows(bucket, chunk_len, behaviours), num_hashes
                    buckets.append(bucket)
                o, l = self._attend(qk[b, h], v[b, h], windows, rounds, causal, None if valid is None else valid[b], behaviours)
                outs.append(o)
                lses.append(l)
        out = torch.stack(outs).reshape(batch, heads, n, -1)
        lse = torch.stack(lses).reshape(batch, heads, n)
        return out, lse, None if short else np.stack(buckets).reshape(batch, heads, num_hashes, n)

    def _buckets(self, x, rotations, factors, valid, b, behaviours):
        """(R, N) buckets with offsets: per-factor argmax of [xR, -xR], padding bucket, round offsets."""
        rotated = np.einsum("nd,rdp->rnp", x, rotations)
        digits, start = [], 0
        for factor in factors:
            part = rotated[..., start : start + factor // 2]
            entries = np.concatenate([part, -part], axis=-1)
            if self.bug in ("LSH_TIES", "EXACT_TIES"):
                entries = entries[..., ::-1]  # bug LSH_TIES, bug EXACT_TIES
                digits.append(factor - 1 - np.argmax(entries, axis=-1))
            else:
                digits.append(np.argmax(entries, axis=-1))
            start += factor // 2
        if self.bug == "LSH_FACTORISED_BUCKETS":
            digits, factors = digits[::-1], factors[::-1]  # bug LSH_FACTORISED_BUCKETS
        bucket, base = 0, 1
        for digit, factor in zip(digits, factors):
            bucket, base = bucket + base * digit, base * factor
        total = int(np.prod(factors))
        rule = behaviours["padding_bucket"]
        padding = valid is not None and (rule == "if_mask" or (rule == "if_padded" and not valid.all()))
        if self.bug == "LSH_PADDING_BUCKET_IF_MASK":
            padding = valid is not None and rule != "none" and not valid.all()  # bug LSH_PADDING_BUCKET_IF_MASK
        per_round = total + 1 if padding else total
        if self.bug == "PADDING_BUCKET":
            per_round = total  # bug PADDING_BUCKET
        if padding:
            bucket = np.where(valid[b][None, :], bucket, total)
        return bucket + per_round * np.arange(len(rotations))[:, None]

    def _windows(self, bucket, chunk_len, behaviours):
        """[(query items, key items)] for every chunk; item t is token t % N of round t // N."""
        rounds, n = bucket.shape
        flat = bucket.reshape(-1)
        order = sorted(range(rounds * n), key=lambda t: (flat[t], t))
        if self.bug == "LSH_STABLE_SORT":
            order = sorted(range(rounds * n), key=lambda t: (flat[t], -t))  # bug LSH_STABLE_SORT
        sequences = [order]
        if self.bug == "CHUNK_STRADDLES_ROUNDS":
            sequences = [[t for t in order if t // n == r] for r in range(rounds)]  # bug CHUNK_STRADDLES_ROUNDS
        windows = []
        for items in sequences:
            chunks = [items[c : c + chunk_len] for c in range(0, len(items), chunk_len)]
            for c, chunk in enumerate(chunks):
                neighbours = [c + d for d in range(-behaviours["num_chunks_before"], behaviours["num_chunks_after"] + 1)]
                if self.bug == "WRAPPED_LOOKBACK":
                    neighbours = [m for m in neighbours if 0 <= m < len(chunks)]  # bug WRAPPED_LOOKBACK
                windows.append((chunk, [t for m in neighbours for t in chunks[m % len(chunks)]]))
        return windows

    def _log_counts(self, windows, n, dup_count):
        """log n_ij (occurrences of token j in the windows of token i's copies), or reformer-pytorch's float32
        log(n'_ij + 1e-9) over same-round windows."""
        counts = np.zeros((n, n))
        for queries, keys in windows:
            np.add.at(counts, np.ix_([t % n for t in queries], [t % n for t in keys]), 1)  # a token may recur in a window
        if self.bug == "LSH_REFORMER_PYTORCH_DUP_COUNT":
            dup_count = "occurrences"  # bug LSH_REFORMER_PYTORCH_DUP_COUNT
        if self.bug == "DUP_COUNT_CROSS_ROUND" or dup_count == "reformer_pytorch":
            same = self._same_round_counts(windows, n)  # bug DUP_COUNT_CROSS_ROUND (the rule itself under lucidrains)
            return np.log(same.astype(np.float32) + np.float32(1e-9)).astype(np.float64)
        log_counts = np.log(np.maximum(counts, 1))
        if self.bug == "LSH_DUP_COUNT_SELF_PAIRS":
            np.fill_diagonal(log_counts, 0.0)  # bug LSH_DUP_COUNT_SELF_PAIRS
        return log_counts

    @staticmethod
    def _same_round_counts(windows, n):
        """reformer-pytorch's count: rounds r in which token j's round-r copy is in token i's round-r window."""
        counts = np.zeros((n, n))
        for queries, keys in windows:
            for t in queries:
                for s in keys:
                    counts[t % n, s % n] += t // n == s // n
        return counts

    def _attend(self, x, v, windows, rounds, causal, valid, p):
        n = x.shape[0]
        scale = 1 / math.sqrt(x.shape[1]) if p["scale"] is None else p["scale"]
        keys = self._normalise(x, p["key_norm"], p["key_norm_eps"])
        queries = x
        if self.bug == "LSH_KEY_NORMALISATION":
            queries = keys  # bug LSH_KEY_NORMALISATION
        log_counts = self._log_counts(windows, n, p["dup_count"]) if p["dup_correction"] and self.bug != "DUP_COUNT" else None
        round_out = torch.zeros(rounds, n, v.shape[1], dtype=torch.float64)
        round_lse = torch.full((rounds, n), -math.inf, dtype=torch.float64)
        for query_items, key_items in windows:
            pq, pk = [t % n for t in query_items], [t % n for t in key_items]
            logits = self._logits(scale * queries[pq] @ keys[pk].T, pq, pk, query_items, key_items, causal, valid, p)
            if log_counts is not None:
                logits = logits - torch.tensor(log_counts[np.ix_(pq, pk)])
            lse = torch.logsumexp(logits, dim=-1)
            weights = torch.where(torch.isfinite(lse)[:, None], torch.exp(logits - lse.clamp(min=-1e300)[:, None]), 0.0)
            rows = (torch.tensor([t // n for t in query_items]), torch.tensor(pq))
            round_out = round_out.index_put(rows, weights @ v[pk])
            round_lse = round_lse.index_put(rows, lse)
        if self.bug == "MULTI_ROUND_COMBINE":
            return round_out.mean(0), round_lse.mean(0)  # bug MULTI_ROUND_COMBINE
        lse = torch.logsumexp(round_lse, dim=0)
        weights = torch.where(torch.isfinite(lse), torch.exp(round_lse - lse.clamp(min=-1e300)), 0.0)
        return (weights[..., None] * round_out).sum(0), lse

    @staticmethod
    def _normalise(x, key_norm, eps):
        norm = x.norm(dim=-1, keepdim=True)
        if key_norm == "rms":
            return x / torch.sqrt(norm**2 + x.shape[-1] * eps)
        return x / norm.clamp(min=eps)

    def _logits(self, scores, pq, pk, query_items, key_items, causal, valid, p):
        q_pos, k_pos = torch.tensor(pq)[:, None], torch.tensor(pk)[None, :]
        allowed = torch.ones(scores.shape, dtype=torch.bool)
        if causal:
            allowed &= k_pos <= q_pos
            if self.bug == "LSH_CAUSAL_POSITIONS":
                allowed = torch.tensor(key_items)[None, :] <= torch.tensor(query_items)[:, None]  # bug LSH_CAUSAL_POSITIONS
        mask_queries = p["mask_padded_queries"]
        if self.bug == "LSH_PADDED_QUERIES":
            mask_queries = False  # bug LSH_PADDED_QUERIES
        self_pair = q_pos == k_pos
        if valid is not None:
            key_real = torch.tensor(valid[pk])[None, :]
            if p["padding_marks"] == "negated_positions" and self.bug != "LSH_TRAX_PADDING_MARKS":
                # trax: info = n + 1 (real), 1 - n (padded); self iff equal, padded iff < 0, causal iff info_i < info_j
                q_info, k_info = q_pos + 1, torch.where(key_real, k_pos + 1, 1 - k_pos)
                self_pair = q_info == k_info
                allowed = (k_info >= 0) & ((k_info <= q_info) if causal else True)
            else:
                allowed &= key_real
            if mask_queries:
                allowed &= torch.tensor(valid[pq])[:, None]
        self_value = p["self_mask_value"]
        if self.bug == "SELF_ONLY_ROW":
            self_value = -math.inf  # bug SELF_ONLY_ROW
        mask_value = -math.inf if p["mask_value"] is None else p["mask_value"]
        mode = p["mask_mode"]
        if self.bug == "LSH_MASK_MODE":
            mode = "add" if mode == "replace" else "replace"  # bug LSH_MASK_MODE
        if mode == "replace":
            return torch.where(self_pair, self_value, torch.where(allowed, scores, mask_value))
        return scores + torch.where(self_pair, self_value, 0.0) + torch.where(allowed, 0.0, mask_value)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lsh_suite")
    export(folder, mechanisms=["lsh"])
    return load_suite(folder)


def test_every_lsh_flag_is_used_and_has_a_wrong_implementation():
    used = {flag for case in cases() for flag in case.flags}
    assert used == set(FLAGS) == set(BUGS)
    assert all(len(text) > 80 for text in FLAGS.values())


def test_the_small_implementation_passes_every_case(suite):
    report = verify(SmallLSH(), suite=suite, grad=True)
    assert report.ok, report.format()


@pytest.mark.parametrize("flag", sorted(BUGS))
def test_wrong_implementation_fails_a_flagged_case(flag, suite):
    report = verify(SmallLSH(bug=flag), suite=suite.select(flags=flag))
    assert any(case.status == "fail" for case in report.cases), f"no {flag} case catches a kernel that {BUGS[flag]}"
