"""The routing conformance cases catch the mistakes their flags name.

The suite of the four routing mechanisms is exported to a temporary folder.
``SmallRouting`` is routing attention written here in PyTorch from the two
published implementations (lucidrains' ``KmeansAttention``: normalise, score
against the centroids, ``topk`` over the tokens, gather, attend, ``scatter``
back; generalised by the presets' parameters, whose values are written out
below from the sources), independently of refattn's reference; autograd gives
its gradients. ``SmallHybrid``, ``SmallSoftRouting`` and ``SmallCentroidEMA``
do the same for the other three mechanisms. ``Small*(bug=FLAG)`` makes the one
mistake that ``FLAG`` names, marked ``# bug FLAG`` next to the line it
replaces. Every wrong variant must fail at least one case carrying its flag,
while the correct ones pass them all, in float64 and in float32.
"""

import math
import types
from pathlib import Path

import numpy as np
import pytest

from refattn.conformance import flags as catalogue
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import verify
from refattn.routing import (  # importing registers the mechanisms
    routing_attention,
    routing_attention_vjp,
)
from refattn.routing.cases import cases as routing_cases
from refattn.routing.centroids.cases import cases as centroid_cases
from refattn.routing.hybrid.cases import cases as hybrid_cases
from refattn.routing.soft.cases import cases as soft_cases

torch = pytest.importorskip("torch")

MECHANISMS = ("routing", "routing_hybrid", "soft_routing", "centroid_ema")

#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "ROUTING_BALANCED_TOPK": "fills each cluster with the tokens whose nearest centroid it is, before any other",
    "ROUTING_SCATTER_MEAN_EPS": "divides each token's sum by its count alone, without the preset's eps",
    "ROUTING_UNROUTED_TOKEN": "divides by count + eps unguarded: 0 / 0 = NaN for unrouted tokens when eps = 0",
    "ROUTING_CAUSAL_BY_POSITION": "masks causally by slot (t <= s) whatever causal_by says",
    "ROUTING_SLOT_CAUSAL": "masks causally by position whatever causal_by says",
    "SHARED_QK_SELF_MASK": "never masks a token's attention to itself",
    "CENTROID_EMA": "counts padded tokens in the centroid update",
    "CENTROID_COUNT_HEADS_MIXED": "counts per head under the google_research preset (not online_kmeans' reshape)",
    "HYBRID_HEAD_ORDER": "puts the routing heads first whatever head_order says",
    "SOFT_ROUTING": "normalises the routing probabilities over the tokens instead of the paths",
    "SHARED_QK_KEYS_FROM_K": "takes the key vectors from q under shared-QK",
    "ROUTING_MASK_ADDED": "replaces a masked logit by mask_value whatever mask_mode says",
    "LUCIDRAINS_SELF_WRITTEN_LAST": "writes the self value only where the self key was allowed",
    "ROUTING_ZERO_PADDING": "breaks ties between equally similar tokens (zero-vector padding) by the higher position",
    "EXACT_TIES": "breaks ties between equally similar tokens (copies, zero vectors) by the higher position",
    "SHARED_QK_SELF_RULE_MEMORY": "ignores memory keys when deciding whether a token's own key is its row's last resort",
    "SHARED_QK_SELF_RULE_FINITE_MASK": "counts masked keys with a finite mask_value as other keys in the Reformer self rule",
}

#: Every behaviour that differs, per preset, from the sources (google-research routing_transformer/utils.py and
#: sparse_transformer.py; lucidrains routing_transformer/routing_transformer.py).
PRESETS = {
    None: dict(routing_norm="layer", norm_eps=1e-6, query_prescale=1.0, attend_on="normalized",
               normalize_shared_keys=False, scale=None, causal_by="position", order="position", mask_value=None,
               mask_mode="replace", self_mask=True, self_mask_value=None, query_padding="mask_row", scatter_eps=0.0,
               head_order="routing_first", local_causal=None, centroid_update="vq_ema", count_rule="per_head", decay=0.999,
               ema_eps=1e-5),
}  # fmt: skip
PRESETS["google_research"] = dict(PRESETS[None], query_prescale=None, scale=1.0, causal_by="slot", mask_value=-1e9,
                                  mask_mode="add", self_mask=False, query_padding="none", scatter_eps=1e-2,
                                  count_rule="google_research")  # fmt: skip
PRESETS["lucidrains"] = dict(PRESETS[None], routing_norm="l2", norm_eps=1e-12, attend_on="raw",
                             normalize_shared_keys=True, order="similarity", mask_value=-3.4028234663852886e38,
                             self_mask_value=-5e4, query_padding="mask_window", scatter_eps=1e-5,
                             head_order="local_first", centroid_update="normalized_mean_ema",
                             ema_eps=1e-12)  # fmt: skip


def _options(params: dict) -> dict:
    """The preset's behaviours, overridden by explicit parameters."""
    chosen = dict(PRESETS[params.get("preset")])
    chosen.update({name: value for name, value in params.items() if name in chosen})
    return chosen


def _tensors(params: dict) -> dict:
    return {name: torch.tensor(x) if isinstance(x, np.ndarray) else x for name, x in params.items()}


def _gather(x, index):
    """x (B, H, N, ...) at index (B, H, K, W): (B, H, K, W, ...)."""
    b, h = index.shape[:2]
    flat = index.reshape(b, h, -1)
    if x.dim() == 3:
        return x.gather(2, flat).reshape(index.shape)
    return x.gather(2, flat[..., None].expand(-1, -1, -1, x.shape[-1])).reshape(*index.shape, x.shape[-1])


def _softmax(logits):
    """Softmax and log-sum-exp over the last axis; a row of -inf gives weights 0 and lse -inf."""
    row_max = logits.amax(-1, keepdim=True).detach()
    has_key = torch.isfinite(row_max)
    shift = torch.where(has_key, row_max, torch.zeros_like(row_max))
    exp = torch.exp(logits - shift)
    total = torch.where(has_key, exp.sum(-1, keepdim=True), torch.ones_like(row_max))
    lse = torch.where(has_key, shift + torch.log(total), torch.full_like(row_max, -math.inf))[..., 0]
    return exp / total, lse


def _dense(q, k, v, *, causal=False, window=None, key_real=None, scale=None):
    """Plain softmax(scale q k^T) v with Nq = Nk, a causal mask, a (left, right) window and key padding (B, N)."""
    n = q.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        if window[0] is not None:
            allowed &= j >= i - window[0]
        if window[1] is not None:
            allowed &= j <= i + window[1]
    if key_real is not None:
        allowed = allowed & key_real[:, None, None, :]
    weights, _ = _softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf))
    return weights @ v


class SmallRouting:
    """Routing attention in PyTorch; ``bug`` names one routing flag's mistake."""

    GRAD_PARAMS = ("mem_k", "mem_v")

    def __init__(self, bug=None):
        self.bug = bug

    def __call__(self, q, k, v, **params):
        out, aux = self._forward(*(torch.tensor(x) for x in (q, k, v)), **_tensors(params))
        return types.SimpleNamespace(out=out.detach().numpy(), lse=None, aux=aux)

    def vjp(self, dout, q, k, v, *, dlse=None, **params):
        assert dlse is None  # none of the four mechanisms has an lse (the verifier passes dlse=None)
        inputs = {name: torch.tensor(x, requires_grad=True) for name, x in dict(q=q, k=k, v=v).items()}
        tensors = _tensors(params)
        for name in self.GRAD_PARAMS:
            if tensors.get(name) is not None:
                inputs[name] = tensors[name] = tensors[name].requires_grad_()
        out, _ = self._forward(inputs["q"], inputs["k"], inputs["v"], **tensors)
        (out * torch.tensor(dout)).sum().backward()
        return {name: (torch.zeros_like(x) if x.grad is None else x.grad).numpy() for name, x in inputs.items()}

    def _select(self, similarity, cluster_size, order):
        """Each centroid's top-`cluster_size` tokens (B, H, K, W), in `order`."""
        scores = similarity.detach().transpose(-1, -2)  # (B, H, K, N)
        if self.bug == "ROUTING_BALANCED_TOPK":
            nearest = torch.nn.functional.one_hot(similarity.detach().argmax(-1), scores.shape[2])  # (B, H, N, K)
            scores = scores + 1e3 * nearest.transpose(-1, -2)  # bug ROUTING_BALANCED_TOPK
        # descending similarity, ties to the lower position (a stable sort; topk leaves tie order unspecified)
        if self.bug in ("ROUTING_ZERO_PADDING", "EXACT_TIES"):  # bug ROUTING_ZERO_PADDING, bug EXACT_TIES
            n = scores.shape[-1]
            flipped = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :cluster_size]
            index = n - 1 - flipped
        else:
            index = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :cluster_size]
        return index.sort(-1).values if order == "position" else index

    def _forward(self, q, k, v, *, centroids, cluster_size, shared_qk=False, causal=False, key_padding_mask=None,
                 mem_k=None, mem_v=None, **params):  # fmt: skip
        o = _options(params)
        b, h, n, d = q.shape
        prescale = 1 / math.sqrt(d) if o["query_prescale"] is None else o["query_prescale"]
        scale = 1 / math.sqrt(d) if o["scale"] is None else o["scale"]

        def normalize(x):
            if o["routing_norm"] == "layer":
                centred = x - x.mean(-1, keepdim=True)
                return centred / torch.sqrt((centred**2).mean(-1, keepdim=True) + o["norm_eps"])
            return x / x.norm(dim=-1, keepdim=True).clamp_min(o["norm_eps"])

        if shared_qk and self.bug == "SHARED_QK_KEYS_FROM_K":
            k = q  # bug SHARED_QK_KEYS_FROM_K
        r_q, r_k = normalize(q * prescale), normalize(k * (prescale if shared_qk else 1.0))
        similarity = torch.einsum("bhnd,hcd->bhnc", r_q, centroids)
        key_similarity = similarity if shared_qk else torch.einsum("bhnd,hcd->bhnc", r_k, centroids)
        index = self._select(similarity, cluster_size, o["order"])
        kv_index = index if shared_qk else self._select(key_similarity, cluster_size, o["order"])
        attend_q = r_q if o["attend_on"] == "normalized" else q
        attend_k = r_k if o["attend_on"] == "normalized" or (shared_qk and o["normalize_shared_keys"]) else k
        queries, keys, values = _gather(attend_q, index), _gather(attend_k, kv_index), _gather(v, kv_index)
        memory = 0 if mem_k is None else mem_k.shape[2]
        if memory:
            keys = torch.cat([mem_k.expand(b, -1, -1, -1, -1), keys], dim=3)
            values = torch.cat([mem_v.expand(b, -1, -1, -1, -1), values], dim=3)
        dots = torch.einsum("bhcsd,bhctd->bhcst", queries, keys) * scale

        query_position, key_position = index[..., :, None], kv_index[..., None, :]
        members_ok = torch.ones(dots.shape[:-1] + (cluster_size,), dtype=torch.bool)
        memory_ok = torch.ones(dots.shape[:-1] + (memory,), dtype=torch.bool)
        if causal:
            by_slot = o["causal_by"] == "slot"
            if self.bug == "ROUTING_CAUSAL_BY_POSITION":
                by_slot = True  # bug ROUTING_CAUSAL_BY_POSITION
            if self.bug == "ROUTING_SLOT_CAUSAL":
                by_slot = False  # bug ROUTING_SLOT_CAUSAL
            members_ok &= torch.ones(cluster_size, cluster_size).tril().bool() if by_slot else key_position <= query_position
        if key_padding_mask is not None:
            real = key_padding_mask[:, None, :].expand(b, h, n)
            members_ok &= _gather(real, kv_index)[..., None, :]
            query_real = _gather(real, index)[..., :, None]
            if o["query_padding"] != "none":
                members_ok &= query_real
            if o["query_padding"] == "mask_row":
                memory_ok &= query_real
        allowed = torch.cat([memory_ok, members_ok], dim=-1)
        is_self = torch.zeros_like(allowed)
        if shared_qk and o["self_mask"] and self.bug != "SHARED_QK_SELF_MASK":  # bug SHARED_QK_SELF_MASK
            is_self[..., memory:] = key_position == query_position
        fill = -math.inf if o["mask_value"] is None else o["mask_value"]
        if o["mask_mode"] == "add" and fill != -math.inf and self.bug != "ROUTING_MASK_ADDED":  # bug ROUTING_MASK_ADDED
            logits = torch.where(allowed, dots, dots + fill)
        else:
            logits = dots.masked_fill(~allowed, fill)
        if o["self_mask_value"] is not None:
            if self.bug == "LUCIDRAINS_SELF_WRITTEN_LAST":
                is_self = is_self & allowed  # bug LUCIDRAINS_SELF_WRITTEN_LAST
            logits = logits.masked_fill(is_self, o["self_mask_value"])
        else:
            others = allowed & ~is_self
            if self.bug == "SHARED_QK_SELF_RULE_MEMORY":
                others = others[..., memory:]  # bug SHARED_QK_SELF_RULE_MEMORY
            if self.bug == "SHARED_QK_SELF_RULE_FINITE_MASK":
                others = torch.isfinite(logits) & ~is_self  # bug SHARED_QK_SELF_RULE_FINITE_MASK
            alone = ~others.any(-1, keepdim=True)
            logits = logits.masked_fill(is_self & ~alone, -math.inf)
        weights, lse = _softmax(logits)
        slot_out = torch.einsum("bhcst,bhcte->bhcse", weights, values)

        flat = index.reshape(b, h, -1)
        dv = v.shape[-1]
        sums = torch.zeros(b, h, n, dv, dtype=v.dtype).scatter_add(2, flat[..., None].expand(-1, -1, -1, dv),
                                                                    slot_out.reshape(b, h, -1, dv))  # fmt: skip
        counts = torch.zeros(b, h, n, dtype=torch.int64).scatter_add(2, flat, torch.ones_like(flat))[..., None]
        eps = 0.0 if self.bug == "ROUTING_SCATTER_MEAN_EPS" else o["scatter_eps"]  # bug ROUTING_SCATTER_MEAN_EPS
        denominator = counts.to(v.dtype) + eps  # (an int64 tensor + eps would be float32)
        out = torch.where(counts > 0, sums / torch.where(counts > 0, denominator, 1.0), 0.0)
        if self.bug == "ROUTING_UNROUTED_TOKEN":
            out = sums / denominator  # bug ROUTING_UNROUTED_TOKEN
        aux = dict(membership=index.numpy(), key_membership=kv_index.numpy(),
                   assignment=similarity.detach().argmax(-1).numpy(), key_assignment=key_similarity.detach().argmax(-1).numpy(),
                   counts=counts[..., 0].numpy(), unrouted=(counts[..., 0] == 0).numpy(),
                   slot_lse=lse.detach().numpy())  # fmt: skip
        return out, aux


class SmallHybrid(SmallRouting):
    """Local heads (dense, windowed) and routing heads side by side; ``bug`` may be HYBRID_HEAD_ORDER."""

    def _forward(self, q, k, v, *, num_local_heads, local_window=None, causal=False, key_padding_mask=None, **params):
        o = _options(params)
        heads = q.shape[1]
        routing_first = o["head_order"] == "routing_first"
        if self.bug == "HYBRID_HEAD_ORDER":
            routing_first = True  # bug HYBRID_HEAD_ORDER
        routed = slice(0, heads - num_local_heads) if routing_first else slice(num_local_heads, heads)
        local = slice(heads - num_local_heads, heads) if routing_first else slice(0, num_local_heads)
        routing_out, aux = super()._forward(q[:, routed], k[:, routed], v[:, routed], causal=causal,
                                            key_padding_mask=key_padding_mask, **params)  # fmt: skip
        del aux["slot_lse"]  # the layer's aux holds the routing heads' decisions only
        local_causal = causal if o["local_causal"] is None else o["local_causal"]
        local_out = _dense(q[:, local], k[:, local], v[:, local], causal=local_causal, window=local_window,
                           key_real=key_padding_mask)  # fmt: skip
        parts = [routing_out, local_out] if routing_first else [local_out, routing_out]
        return torch.cat(parts, dim=1), aux


class SmallSoftRouting(SmallRouting):
    """softmax(x W_r) over dense-attention paths; ``bug`` may be SOFT_ROUTING."""

    GRAD_PARAMS = ("x", "routing_weights")

    def _forward(self, q, k, v, *, x, routing_weights, path_causal, path_window, scale=None):
        paths = torch.stack([_dense(q, k, v, causal=c, window=w, scale=scale) for c, w in zip(path_causal, path_window)])
        probabilities = torch.softmax(x @ routing_weights, dim=-1)  # (B, N, P)
        if self.bug == "SOFT_ROUTING":
            probabilities = torch.softmax(x @ routing_weights, dim=1)  # bug SOFT_ROUTING
        return torch.einsum("bnp,pbhne->bhne", probabilities, paths), {}


class SmallCentroidEMA(SmallRouting):
    """One centroid update (google-research VQ EMA or lucidrains' normalised-mean EMA); ``bug`` may be CENTROID_EMA."""

    def _forward(self, q, k, v, *, centroids, shared_qk=False, key_padding_mask=None, ema_counts=None, ema_sums=None,
                 **params):  # fmt: skip
        o = _options(params)
        prescale = 1 / math.sqrt(q.shape[-1]) if o["query_prescale"] is None else o["query_prescale"]

        def normalize(x):
            if o["routing_norm"] == "layer":
                centred = x - x.mean(-1, keepdim=True)
                return centred / torch.sqrt((centred**2).mean(-1, keepdim=True) + o["norm_eps"])
            return x / x.norm(dim=-1, keepdim=True).clamp_min(o["norm_eps"])

        vectors = normalize(q * prescale) if shared_qk else torch.cat([normalize(q * prescale), normalize(k)], dim=2)
        real = torch.ones(vectors.shape[0], vectors.shape[2], dtype=q.dtype)
        if key_padding_mask is not None:
            real = key_padding_mask.to(q.dtype).repeat(1, 1 if shared_qk else 2)
        if self.bug == "CENTROID_EMA":
            real = torch.ones_like(real)  # bug CENTROID_EMA
        clusters = centroids.shape[1]
        assignment = torch.einsum("bhnd,hcd->bhnc", vectors, centroids).argmax(-1)
        one_hot = torch.nn.functional.one_hot(assignment, clusters).to(q.dtype) * real[:, None, :, None]
        count = one_hot.sum((0, 2))  # (H, K)
        if o["count_rule"] == "google_research" and self.bug != "CENTROID_COUNT_HEADS_MIXED":
            # online_kmeans: reshape(x_means_hot, [-1, num_heads, K]).sum(0), one call for q and one for k
            count = sum(part.reshape(-1, *count.shape).sum(0) for part in one_hot.chunk(1 if shared_qk else 2, dim=2))
        total = torch.einsum("bhnc,bhnd->hcd", one_hot, vectors)
        decay, eps = o["decay"], o["ema_eps"]
        if o["centroid_update"] == "vq_ema":
            counts = decay * (torch.zeros_like(count) if ema_counts is None else ema_counts) + (1 - decay) * count
            sums = decay * (centroids if ema_sums is None else ema_sums) + (1 - decay) * total
            n = counts.sum(-1, keepdim=True)
            new = sums / ((counts + eps) / (n + clusters * eps) * n)[..., None]
        else:
            means = total / total.norm(dim=-1, keepdim=True).clamp_min(eps)
            new = decay * centroids + (1 - decay) * torch.where(count[..., None] > 0, means, centroids)
        return new, {"assignment": assignment.numpy()}


SMALL = {"routing": SmallRouting, "routing_hybrid": SmallHybrid, "soft_routing": SmallSoftRouting,
         "centroid_ema": SmallCentroidEMA}  # fmt: skip


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("routing_suite")
    export(folder, mechanisms=MECHANISMS)
    return load_suite(folder)


def _verify(impl, suite, mechanism, **options):
    grad = mechanism != "centroid_ema"  # the centroid update is forward only
    return verify(impl, suite=suite, mechanism=mechanism, grad=grad, **options)


def test_every_routing_flag_is_used_described_and_has_a_wrong_implementation():
    used = {flag for case in routing_cases() + hybrid_cases() + soft_cases() + centroid_cases() for flag in case.flags}
    assert set(BUGS) <= used
    assert used <= set(catalogue.catalogue())
    readme = (Path(__file__).resolve().parents[1] / "conformance" / "README.md").read_text()
    assert [flag for flag in BUGS if f"| `{flag}` |" not in readme] == []


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_small_implementation_passes_every_case(mechanism, dtype, suite):
    report = _verify(SMALL[mechanism](), suite, mechanism, dtype=dtype)
    assert report.ok, report.format()
    assert all(case.status == "pass" for case in report.cases)


@pytest.mark.parametrize("flag", sorted(BUGS))
def test_wrong_implementation_fails_a_flagged_case(flag, suite):
    flagged = suite.select(flags=flag)
    mechanism = flagged.cases[0].mechanism
    report = _verify(SMALL[mechanism](bug=flag), flagged, mechanism)
    assert any(case.status in ("fail", "error") for case in report.cases), f"no {flag} case catches a kernel that {BUGS[flag]}"


def test_the_reference_passes_its_own_suite_with_integer_intermediates(suite):
    report = verify(routing_attention, vjp=routing_attention_vjp, suite=suite, mechanism="routing", grad=True)
    assert report.ok and all(check.status == "pass" for case in report.cases for check in case.checks
                             if check.name.startswith("aux."))  # fmt: skip
