"""Routing presets against their sources (issue 14, items 2, 3, 4 and 7).

The sources' rules are transcribed here from google-research/google-research
2cae5b0 ``routing_transformer/utils.py`` (``online_kmeans``,
``clustered_local_attention_helper``, ``gather_cluster_attention_items``,
``clustered_attention_bias_nd``, ``embedding_to_padding``,
``scatter_cluster_items``, ``layer_norm``), independently of refattn's
reference. Where routing-transformer (lucidrains) is installed, its own
``KmeansAttention`` runs the lucidrains cases.
"""

import numpy as np
import pytest

from refattn.routing import centroid_ema, commitment_loss, routing_attention
from refattn.routing.cases import cases
from refattn.routing.centroids.cases import cases as centroid_cases

INPUTS = ("q", "k", "v", "mem_k", "mem_v")


def _case(case_id):
    case = next(c for c in cases() + centroid_cases() if c.id == case_id)
    arrays = case.arrays(np.random.default_rng(case.seed))
    params = dict(case.params)
    params.update({key: arrays.pop(key) for key in list(arrays) if key not in INPUTS})
    return arrays, params


def _layer_norm(x, eps=1e-6):
    """google-research layer_norm(x, scaling=False): no scale, no bias."""
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps)


# --- item 2: online_kmeans' counts -------------------------------------------------


def _online_kmeans_ema(x, means, ema_count, ema_means, decay, epsilon=1e-5):
    """online_kmeans with ema=True in training: one call on x [bs, n, s, h]; returns the new means and state."""
    heads, clusters = means.shape[:2]
    nearest = np.argmax(np.einsum("bnsh,nkh->bnsk", x, means), axis=-1)
    hot = np.eye(clusters)[nearest]  # [bs, n, s, k]
    hot = hot * (1 - (np.abs(x).sum(-1) == 0))[..., None]  # embedding_to_padding
    count = hot.reshape(-1, heads, clusters).sum(0)  # tf.reshape(x_means_hot, [-1, num_heads, K]), axis=0
    ema_count = decay * ema_count + (1 - decay) * count
    ema_means = decay * ema_means + (1 - decay) * np.einsum("bnsk,bnsh->nkh", hot, x)
    n = ema_count.sum(-1, keepdims=True)
    smoothed = (ema_count + epsilon) / (n + clusters * epsilon) * n
    return ema_means / smoothed[..., None], ema_count, ema_means


def test_online_kmeans_mixes_heads_in_the_issue_example():
    """H = 2, S = 2, K = 2, each head's tokens in its own cluster: per head [[2, 0], [0, 2]], google [[1, 1], [1, 1]]."""
    from refattn.routing.centroids.reference import batch_counts

    hot = np.zeros((1, 2, 2, 2))
    hot[0, 0, :, 0] = hot[0, 1, :, 1] = 1
    np.testing.assert_array_equal(batch_counts(hot, "per_head"), [[2, 0], [0, 2]])
    np.testing.assert_array_equal(batch_counts(hot, "google_research"), [[1, 1], [1, 1]])
    np.testing.assert_array_equal(hot.reshape(-1, 2, 2).sum(0), [[1, 1], [1, 1]])


@pytest.mark.parametrize("case_id", ["centroid_ema/google_vq_padding", "centroid_ema/google_vq_warm_state"])
def test_google_centroid_update_is_online_kmeans(case_id):
    arrays, params = _case(case_id)
    got = centroid_ema(arrays["q"], arrays["k"], arrays["v"], **params).out
    d = arrays["q"].shape[-1]
    r_q, r_k = _layer_norm(arrays["q"] * d**-0.5), _layer_norm(arrays["k"])
    centroids = params["centroids"]
    counts = params.get("ema_counts", np.zeros(centroids.shape[:2]))
    sums = params.get("ema_sums", centroids)
    # refattn's one update from q and k together = one EMA step whose batch count and sum are the two calls' sums.
    hot = [np.eye(centroids.shape[1])[np.argmax(np.einsum("bnsh,nkh->bnsk", r, centroids), -1)]
           * (np.abs(r).sum(-1) != 0)[..., None] for r in (r_q, r_k)]  # fmt: skip
    count = sum(h.reshape(-1, *centroids.shape[:2]).sum(0) for h in hot)
    total = sum(np.einsum("bnsk,bnsh->nkh", h, r) for h, r in zip(hot, (r_q, r_k)))
    decay = params.get("decay", 0.999)
    ema_count, ema_sum = decay * counts + (1 - decay) * count, decay * sums + (1 - decay) * total
    n = ema_count.sum(-1, keepdims=True)
    want = ema_sum / ((ema_count + 1e-5) / (n + centroids.shape[1] * 1e-5) * n)[..., None]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    per_head = centroid_ema(arrays["q"], arrays["k"], arrays["v"], **params, count_rule="per_head").out
    assert np.abs(per_head - got).max() > 1e-4  # the case fails the per-head count


def test_one_online_kmeans_call_is_centroid_ema_vq():
    from refattn.routing import centroid_ema_vq

    arrays, params = _case("centroid_ema/google_vq_warm_state")
    r = _layer_norm(arrays["q"] * arrays["q"].shape[-1] ** -0.5)
    want, _, _ = _online_kmeans_ema(r, params["centroids"], params["ema_counts"], params["ema_sums"], 0.999)
    got = centroid_ema_vq(r, params["centroids"], ema_counts=params["ema_counts"], ema_sums=params["ema_sums"],
                          count_rule="google_research").centroids  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# --- item 3: the commitment loss under shared QK --------------------------------------


def test_google_commitment_loss_counts_shared_queries_twice():
    arrays, params = _case("routing/google_shared_causal")
    q, centroids = arrays["q"], params["centroids"]
    r = _layer_norm(q * q.shape[-1] ** -0.5)
    routed = centroids[np.arange(q.shape[1])[None, :, None], np.argmax(np.einsum("bnsh,nkh->bnsk", r, centroids), -1)]
    e_loss = np.mean((r - routed) ** 2)
    got = commitment_loss(q, q, centroids, shared_qk=True, preset="google_research")
    assert got == pytest.approx(2 * 1e-4 * e_loss, rel=1e-12)  # q_clustering_loss + k_clustering_loss, k = q


# --- item 4: google's padding is zero vectors --------------------------------------------


def _google_clustered_attention(q, k, v, centroids, window, causal, bias_value=-1e9):
    """clustered_local_attention_helper without a padding mask (padding = zero vectors), NumPy float64;
    ``bias_value`` is google's -1e9 unless a case overrides it."""
    q = _layer_norm(q * q.shape[-1] ** -0.5)  # multihead_attention_nd scales q, then the helper layer-norms
    k = _layer_norm(k)
    out = np.zeros(v.shape)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            sums, counts = np.zeros(v.shape[2:]), np.zeros(v.shape[2:])
            for c in range(centroids.shape[1]):
                # top_k(-dist) puts the lower index first among equal values; then tf.sort(idx)
                q_idx = np.sort(np.argsort(-(q[b, h] @ centroids[h, c]), kind="stable")[:window])
                k_idx = np.sort(np.argsort(-(k[b, h] @ centroids[h, c]), kind="stable")[:window])
                bias = np.where(np.abs(v[b, h, k_idx]).sum(-1) == 0, bias_value, 0.0)[None, :]  # embedding_to_padding
                if causal:
                    bias = np.minimum(bias, np.where(np.tri(window, dtype=bool), 0.0, bias_value))
                logits = q[b, h, q_idx] @ k[b, h, k_idx].T + bias
                weights = np.exp(logits - logits.max(-1, keepdims=True))
                weights /= weights.sum(-1, keepdims=True)
                np.add.at(sums, q_idx, weights @ v[b, h, k_idx])
                np.add.at(counts, q_idx, 1.0)
            out[b, h] = sums / (counts + 1e-2)  # scatter_cluster_items
    return out


@pytest.mark.parametrize("case_id", ["routing/google_padding", "routing/google_basic", "routing/google_slot_causal"])
def test_google_cases_are_reproduced_by_googles_rule(case_id):
    arrays, params = _case(case_id)
    got = routing_attention(**arrays, **params).out
    want = _google_clustered_attention(arrays["q"], arrays["k"], arrays["v"], params["centroids"],
                                       params["cluster_size"], params["causal"])  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# --- item 7: ties in the balanced membership ------------------------------------------------


def test_tied_members_go_to_the_lower_position():
    """Tokens 8-15 copy the q and k of tokens 0-7: clusters of 5 end between two copies (bit-identical similarities)."""
    from refattn.routing.problems import routed_problem

    problem = routed_problem(np.random.default_rng(14), batch=1, heads=2, length=16, head_dim=16, clusters=3)
    for name in ("q", "k"):
        problem[name][:, :, 8:] = problem[name][:, :, :8]
    centroids = problem.pop("centroids")
    arrays, params = problem, dict(centroids=centroids, cluster_size=5)
    result = routing_attention(**arrays, **params)
    for backend in ("numba",):
        np.testing.assert_array_equal(routing_attention(**arrays, **params, backend=backend).aux["membership"],
                                      result.aux["membership"])  # fmt: skip
    r = _layer_norm(arrays["q"])
    similarity = np.einsum("bhnd,hcd->bhcn", r, params["centroids"])
    lower_first = np.sort(np.argsort(-similarity, axis=-1, kind="stable")[..., : params["cluster_size"]], axis=-1)
    np.testing.assert_array_equal(result.aux["membership"], lower_first)
    n = similarity.shape[-1]
    higher_first = n - 1 - np.argsort(-similarity[..., ::-1], axis=-1, kind="stable")[..., : params["cluster_size"]]
    assert not np.array_equal(np.sort(higher_first, axis=-1), lower_first)  # the case decides the tie order


# --- routing-transformer itself -----------------------------------------------------------


@pytest.mark.parametrize("case_id", ["routing/lucidrains_basic", "routing/lucidrains_causal_memory",
                                     "routing/lucidrains_shared_causal"])  # fmt: skip
def test_lucidrains_preset_is_routing_transformer(case_id):
    torch = pytest.importorskip("torch")
    library = pytest.importorskip("routing_transformer.routing_transformer")
    arrays, params = _case(case_id)
    got = routing_attention(**arrays, **params).out
    b, h, n, d = arrays["q"].shape
    clusters = params["centroids"].shape[1]
    memory = 0 if "mem_k" not in arrays else arrays["mem_k"].shape[2]
    attention = library.KmeansAttention(clusters, params["cluster_size"], h, d, causal=params["causal"],
                                        num_mem_kv=memory, shared_qk=params["shared_qk"]).double().eval()  # fmt: skip
    with torch.no_grad():
        attention.kmeans.means.copy_(torch.from_numpy(params["centroids"]))
        attention.kmeans.initted.fill_(True)
        if memory:
            attention.mem_key.copy_(torch.from_numpy(arrays["mem_k"]))
            attention.mem_value.copy_(torch.from_numpy(arrays["mem_v"]))
        k = arrays["q"] if params["shared_qk"] else arrays["k"]
        out, _ = attention(*(torch.from_numpy(x) for x in (arrays["q"], k, arrays["v"])))
    np.testing.assert_allclose(got, out.numpy(), rtol=0, atol=1e-10)


# --- item 8: behaviours the spec defines, each decided by a case ------------------------------


def test_google_adds_the_mask_bias_on_rows_with_no_allowed_key():
    """google's rule (the transcription above adds -1e9) reproduces the case; the replacing reading does not."""
    arrays, params = _case("routing/google_add_empty_rows")
    got = routing_attention(**arrays, **params).out
    want = _google_clustered_attention(arrays["q"], arrays["k"], arrays["v"], params["centroids"],
                                       params["cluster_size"], params["causal"], params["mask_value"])  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    google = _google_clustered_attention(arrays["q"], arrays["k"], arrays["v"], params["centroids"],
                                         params["cluster_size"], params["causal"])  # fmt: skip
    np.testing.assert_allclose(got, google, rtol=0, atol=1e-6)  # -1e9 + s keeps s to its ulp, 1.2e-7
    # The wrong reading, written out: every masked logit becomes -1e9, so an empty row is uniform.
    q = _layer_norm(arrays["q"] * arrays["q"].shape[-1] ** -0.5)
    k = _layer_norm(arrays["k"])
    similarity = np.einsum("bhnd,hcd->bhcn", q, params["centroids"])
    window = params["cluster_size"]
    q_idx = np.sort(np.argsort(-similarity, axis=-1, kind="stable")[..., :window], axis=-1)  # (B, H, K, W)
    k_idx = np.sort(np.argsort(-np.einsum("bhnd,hcd->bhcn", k, params["centroids"]), -1, kind="stable")[..., :window], -1)
    real = params["key_padding_mask"][0]
    empty = ~np.any(np.tri(window, dtype=bool) & real[k_idx[0]][..., None, :], axis=-1) & real[q_idx[0]]  # (H, K, W)
    b, h, c, s = 0, *np.argwhere(empty)[0]  # a real query whose key slots up to its own are all padded
    scores = q[b, h, q_idx[b, h, c, s]] @ k[b, h, k_idx[b, h, c]].T
    added = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    assert np.abs(added - 1.0 / window).max() > 0.01  # the row this case holds: softmax(scores) is not uniform
    replaced = routing_attention(**arrays, **params, mask_mode="replace").out
    assert np.abs(replaced - want).max() > 0.1


def test_shared_qk_keys_are_k_not_q():
    arrays, params = _case("routing/canonical_shared_own_k")
    assert np.abs(arrays["k"] - arrays["q"]).max() > 0.1
    got = routing_attention(**arrays, **params)
    # The key vectors, written out: layer-normalised k in the query lists' slots (the Reformer self rule).
    r_q, r_k = _layer_norm(arrays["q"]), _layer_norm(arrays["k"])
    members = got.aux["membership"]
    d = r_q.shape[-1]
    out = np.zeros(arrays["v"].shape)
    for h in range(r_q.shape[1]):
        for c in range(members.shape[2]):
            idx = members[0, h, c]
            z = r_q[0, h, idx] @ r_k[0, h, idx].T / np.sqrt(d)
            np.fill_diagonal(z, -np.inf)
            w = np.exp(z - z.max(-1, keepdims=True))
            out[0, h, idx] += (w / w.sum(-1, keepdims=True)) @ arrays["v"][0, h, idx]
    counts = got.aux["counts"][..., None]
    np.testing.assert_allclose(got.out, np.where(counts > 0, out / np.maximum(counts, 1), 0.0), rtol=0, atol=1e-12)
    from_q = routing_attention(**dict(arrays, k=arrays["q"]), **params).out  # the wrong reading: keys from q
    assert np.abs(from_q - got.out).max() > 0.1


def test_lucidrains_self_value_is_written_last(monkeypatch):
    from refattn.routing import reference

    arrays, params = _case("routing/lucidrains_shared_padding")
    assert not params["key_padding_mask"].all()
    got = routing_attention(**arrays, **params).out
    padded = ~params["key_padding_mask"][0]
    # A padded token's rows hold only itself: its output is its own value, whichever clusters picked it.
    routed = routing_attention(**arrays, **params).aux["counts"][0] > 0  # (H, N)
    for h in range(arrays["q"].shape[1]):
        rows = padded & routed[h]
        np.testing.assert_allclose(got[0, h, rows], arrays["v"][0, h, rows] * (1 / (1 + 1e-5)), rtol=1e-4)  # fmt: skip
    # The wrong reading, written out: the self value only where the self key was not masked.
    original = reference.slot_logits
    monkeypatch.setattr(reference, "slot_logits", lambda scores, masked, is_self, **kw: original(
        scores, masked, is_self & ~masked, **kw))  # fmt: skip
    wrong = routing_attention(**arrays, **params).out
    assert np.abs(wrong - got).max() > 0.1


# --- item 7: the tie cases decide the tie order ------------------------------------------------


def _higher_position_first(similarity, cluster_size, order):
    """top_members with the tie rule reversed: among equal similarities the higher position first."""
    by_cluster = np.moveaxis(similarity, -1, -2)  # (B, H, K, N)
    n = by_cluster.shape[-1]
    ranked = n - 1 - np.argsort(-by_cluster[..., ::-1], axis=-1, kind="stable")[..., :cluster_size]
    return (np.sort(ranked, axis=-1) if order == "position" else ranked).astype(np.int64)


def test_the_reference_with_reversed_ties_fails_exactly_the_tie_cases(tmp_path, monkeypatch):
    """refattn's routing reference with the tie order reversed passes every case without exact ties (it passed the
    whole suite before the tie cases), fails routing/canonical_ties, and the report calls it a tie-order difference."""
    from refattn.conformance.case import EXACT_TIES
    from refattn.conformance.export import export
    from refattn.conformance.verify import verify
    from refattn.routing import reference

    export(tmp_path, mechanisms=["routing"])
    assert verify(backend="reference", mechanism="routing", suite=tmp_path).ok
    monkeypatch.setattr(reference, "top_members", _higher_position_first)
    report = verify(backend="reference", mechanism="routing", suite=tmp_path)
    failed = {case.id: case for case in report.cases if case.status == "fail"}
    assert "routing/canonical_ties" in failed
    assert all(EXACT_TIES in case.flags for case in failed.values())
    membership = next(c for c in failed["routing/canonical_ties"].checks if c.name == "aux.membership")
    assert membership.describe().startswith("aux.membership: tie order differs: ")
