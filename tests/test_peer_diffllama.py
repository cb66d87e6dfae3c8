"""Hugging Face's ``DiffLlamaAttention`` (the installed transformers) against refattn's
differential attention.

HF's module is built on a tiny config, its projections set to selections (the
module's input is ``[q | k | v]`` and ``q_proj``, ``k_proj``, ``v_proj`` each pick
their block; ``o_proj`` writes the heads' output into the first block), RoPE set
to the identity (``cos = 1``, ``sin = 0``), so HF's own forward runs on the test's
``q_hf`` (B, 2H, N, D), ``k_hf`` (B, 2Hkv, N, D) and ``v_hf`` (B, 2Hkv, N, D).

HF (transformers 5.25.0, ``models/diffllama/modular_diffllama.py``,
``DiffLlamaAttention.forward``) splits ``v`` by kv heads into two halves, runs
attention once per half and subtracts output head ``h + H`` from ``h``
(``torch.chunk(attn_output, 2, dim=2)``). Read off that code, the map onto
refattn's layout (spec/dilution.md, differential attention: how
implementations differ) is the permutation written out below, by hand:

    q[2h + c]  = q_hf[h + c·H]         (query head h + c·H is map c of output head h)
    k[2j + c]  = k_hf[j + c·Hkv]       (kv head j holds HF's key heads j and j + Hkv)
    v[j]       = concat(v_hf[j], v_hf[j + Hkv])   (features)

with ``gqa_keys="paired"`` and ``depth = layer_idx``.
"""

import numpy as np
import pytest

from refattn.dilution.differential import differential_attention

torch = pytest.importorskip("torch")
modeling_diffllama = pytest.importorskip("transformers.models.diffllama.modeling_diffllama")
configuration_diffllama = pytest.importorskip("transformers.models.diffllama.configuration_diffllama")

LAYER_IDX = 2
NORM_EPS = 1e-5


def diffllama_module(heads: int, kv_heads: int, head_dim: int, attn_implementation: str = "sdpa"):
    """HF's attention for ``2·heads`` query and ``2·kv_heads`` key heads of ``head_dim``, in float64,
    with selection projections: input ``[q | k | v]`` (2H + 4Hkv)·D wide, output in its first 2H·D entries."""
    q_width, kv_width = 2 * heads * head_dim, 2 * kv_heads * head_dim
    hidden = q_width + 2 * kv_width
    config = configuration_diffllama.DiffLlamaConfig(
        hidden_size=hidden, num_attention_heads=2 * heads, num_key_value_heads=2 * kv_heads, head_dim=head_dim,
        intermediate_size=4, num_hidden_layers=LAYER_IDX + 1, rms_norm_eps=NORM_EPS, attention_dropout=0.0,
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    module = modeling_diffllama.DiffLlamaAttention(config, layer_idx=LAYER_IDX).double().eval()
    eye = torch.eye(hidden, dtype=torch.float64)
    with torch.no_grad():
        module.q_proj.weight.copy_(eye[:q_width])
        module.k_proj.weight.copy_(eye[q_width : q_width + kv_width])
        module.v_proj.weight.copy_(eye[q_width + kv_width :])
        module.o_proj.weight.copy_(eye[:, :q_width])
    return module


def run_hf(module, q_hf, k_hf, v_hf, lambdas, causal: bool) -> np.ndarray:
    """HF's forward on (B, Hq, N, D) arrays; returns (B, H, N, 2D), output head h in HF's order."""
    batch, q_heads, n, head_dim = q_hf.shape
    to_rows = lambda x: torch.from_numpy(x).transpose(1, 2).reshape(batch, n, -1)  # (B, N, heads·D)
    hidden = torch.cat([to_rows(q_hf), to_rows(k_hf), to_rows(v_hf)], dim=-1)
    with torch.no_grad():
        for name, value in lambdas.items():
            getattr(module, name).copy_(torch.from_numpy(value))
        identity_rope = (torch.ones(batch, n, head_dim, dtype=torch.float64), torch.zeros(batch, n, head_dim, dtype=torch.float64))
        out, _ = module(hidden, identity_rope, attention_mask=None, is_causal=causal)
    out = out[..., : q_heads * head_dim].reshape(batch, n, q_heads // 2, 2 * head_dim)
    return out.transpose(1, 2).numpy()


def hf_to_refattn(q_hf, k_hf, v_hf):
    """The permutation of the module docstring, one head at a time."""
    heads, kv_heads = q_hf.shape[1] // 2, k_hf.shape[1] // 2
    q = np.stack([q_hf[:, h + c * heads] for h in range(heads) for c in range(2)], axis=1)  # (B, 2H, N, D)
    k = np.stack([k_hf[:, j + c * kv_heads] for j in range(kv_heads) for c in range(2)], axis=1)  # (B, 2Hkv, N, D)
    v = np.stack([np.concatenate([v_hf[:, j], v_hf[:, j + kv_heads]], axis=-1) for j in range(kv_heads)], axis=1)
    return q, k, v  # v: (B, Hkv, N, 2D)


def draw(rng, batch, heads, kv_heads, n, head_dim):
    """HF-layout q (B, 2H, N, D), k and v (B, 2Hkv, N, D), and the four λ vectors (D,)."""
    q_hf = rng.standard_normal((batch, 2 * heads, n, head_dim))
    k_hf = rng.standard_normal((batch, 2 * kv_heads, n, head_dim))
    v_hf = rng.standard_normal((batch, 2 * kv_heads, n, head_dim))
    lambdas = {name: 0.3 * rng.standard_normal(head_dim) for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
    return q_hf, k_hf, v_hf, lambdas


def orthogonal_lambdas(head_dim: int) -> dict:
    """λ vectors with λ_q · λ_k = 0 in both pairs, so λ = 1 − 1 + λ_init in any precision: HF computes
    ``exp(λ_q · λ_k)`` in float32 (``torch.sum(..., dtype=torch.float32)``) even for float64 input."""
    first, second = np.eye(head_dim)[0], np.eye(head_dim)[1]
    return {"lambda_q1": 0.7 * first, "lambda_k1": -0.4 * second, "lambda_q2": 0.2 * second, "lambda_k2": 0.9 * first}


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (2, 1), (4, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_installed_diffllama_is_refattn_under_the_permutation(heads, kv_heads, causal):
    rng = np.random.default_rng(100 * heads + 10 * kv_heads + causal)
    q_hf, k_hf, v_hf, _ = draw(rng, batch=2, heads=heads, kv_heads=kv_heads, n=5, head_dim=3)
    lambdas = orthogonal_lambdas(3)
    expected = run_hf(diffllama_module(heads, kv_heads, head_dim=3), q_hf, k_hf, v_hf, lambdas, causal)
    q, k, v = hf_to_refattn(q_hf, k_hf, v_hf)
    got = differential_attention(
        q, k, v, **lambdas, depth=LAYER_IDX, norm_eps=NORM_EPS, gqa_keys="paired", causal=causal,
    ).out  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_installed_diffllama_lambda_is_float32():
    """With general λ vectors HF's λ carries float32 rounding (relative 6e-8 on each exponential);
    the outputs agree to that, and not to float64's 1e-12."""
    rng = np.random.default_rng(3)
    q_hf, k_hf, v_hf, lambdas = draw(rng, batch=1, heads=2, kv_heads=2, n=5, head_dim=3)
    expected = run_hf(diffllama_module(2, 2, head_dim=3), q_hf, k_hf, v_hf, lambdas, causal=False)
    got = differential_attention(*hf_to_refattn(q_hf, k_hf, v_hf), **lambdas, depth=LAYER_IDX, norm_eps=NORM_EPS).out
    difference = np.max(np.abs(got - expected))
    assert 1e-12 < difference < 1e-5


def test_unpermuted_heads_are_the_head_pairing_mistake():
    """HF's tensors passed to refattn in HF's head order pair heads h and h + H wrongly: far off."""
    rng = np.random.default_rng(7)
    q_hf, k_hf, v_hf, lambdas = draw(rng, batch=1, heads=2, kv_heads=2, n=5, head_dim=3)
    expected = run_hf(diffllama_module(2, 2, head_dim=3), q_hf, k_hf, v_hf, lambdas, causal=False)
    _, _, v = hf_to_refattn(q_hf, k_hf, v_hf)
    unpermuted = differential_attention(q_hf, k_hf, v, **lambdas, depth=LAYER_IDX, norm_eps=NORM_EPS).out
    assert np.max(np.abs(unpermuted - expected)) > 1e-2


@pytest.mark.parametrize("changes", [{"attention_dropout": 0.1}, {"num_key_value_heads": 1}])
def test_installed_diffllama_rejects_what_the_spec_says(changes):
    """The restrictions spec/dilution.md records for 5.25.0: no attention dropout, an even kv head count."""
    settings = dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, head_dim=4, intermediate_size=4)
    config = configuration_diffllama.DiffLlamaConfig(**{**settings, **changes})
    with pytest.raises(ValueError):
        modeling_diffllama.DiffLlamaAttention(config, layer_idx=0)
