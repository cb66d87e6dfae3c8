"""The installed low-rank libraries against refattn's presets, their weights and random features injected.

Each test builds a small module of the real library (float32, eval mode),
reads its learned projections or random features into refattn's explicit
inputs through the adapter in examples/, and compares the library's output
with refattn's (reference and numba backends) to 1e-5. A test skips when its
library is not installed. Where a library departs from refattn, the test
states where (the library's source line) and checks the departure itself.

Peers: ``linformer`` 0.2.3, ``nystrom-attention`` 0.0.14, ``performer-pytorch``
1.1.4, transformers' Nystromformer (5.25.0).
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from refattn.lowrank import performer_attention
from refattn.lowrank.performer.properties import causal_independence

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.append(str(EXAMPLES))  # the adapters import their neighbour _gallery_entry
TOLERANCE = 1e-5  # float32 libraries against refattn's float64 (or numba float64) on the same inputs


def _example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _close(got, want):
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=0, atol=TOLERANCE)


def _lengths_mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


# --------------------------------------------------------------------------
# lucidrains/linformer


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("options", [{}, {"one_kv_head": True}, {"share_kv": True}], ids=["shared", "one_kv_head", "share_kv"])
@pytest.mark.parametrize("n", [20, 13], ids=["full", "sliced"])
def test_linformer_lucidrains(options, n, backend):
    pytest.importorskip("linformer")
    from linformer import LinformerSelfAttention

    adapter = _example("linformer_lucidrains")
    torch.manual_seed(0)
    module = LinformerSelfAttention(dim=32, seq_len=20, k=6, heads=4, **options).eval()
    x = torch.randn(2, n, 32)
    _close(adapter.linformer_lucidrains(module, x, backend=backend), module(x))


def test_linformer_lucidrains_cross_attention():
    pytest.importorskip("linformer")
    from linformer import LinformerSelfAttention

    adapter = _example("linformer_lucidrains")
    torch.manual_seed(1)
    module = LinformerSelfAttention(dim=32, seq_len=20, k=5, heads=4).eval()
    x, context = torch.randn(2, 7, 32), torch.randn(2, 17, 32)
    _close(adapter.linformer_lucidrains(module, x, context), module(x, context=context))


def test_linformer_lucidrains_has_no_key_padding():
    """lucidrains' forward(x, context=None, **kwargs) swallows a mask: refattn without a mask, not with one."""
    pytest.importorskip("linformer")
    from linformer import LinformerSelfAttention

    from refattn.lowrank import linformer_attention

    adapter = _example("linformer_lucidrains")
    torch.manual_seed(2)
    module = LinformerSelfAttention(dim=32, seq_len=12, k=4, heads=4).eval()
    x = torch.randn(2, 12, 32)
    mask = _lengths_mask([12, 7], 12)
    _close(adapter.linformer_lucidrains(module, x), module(x, mask=mask))
    q, k, v, params = adapter.refattn_inputs(module, x)
    masked = linformer_attention(q, k, v, key_padding_mask=mask.numpy(), **params).out
    unmasked = linformer_attention(q, k, v, **params).out
    assert np.abs(masked - unmasked)[1].max() > 1e-2


# --------------------------------------------------------------------------
# lucidrains/nystrom-attention


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize(("n", "m", "options"), [(16, 4, {}), (13, 4, {}), (12, 3, {"residual": False}), (10, 4, {"pinv_iterations": 3})],
                         ids=["divisible", "front_padding", "no_conv", "three_iterations"])  # fmt: skip
def test_nystrom_lucidrains(n, m, options, backend):
    pytest.importorskip("nystrom_attention")
    from nystrom_attention import NystromAttention

    adapter = _example("nystrom_lucidrains")
    torch.manual_seed(0)
    module = NystromAttention(dim=32, dim_head=8, heads=4, num_landmarks=m, residual_conv_kernel=5, **options).eval()
    x = torch.randn(2, n, 32)
    _close(adapter.nystrom_lucidrains(module, x, backend=backend), module(x))


def test_nystrom_lucidrains_in_float64_to_rounding():
    pytest.importorskip("nystrom_attention")
    from nystrom_attention import NystromAttention

    adapter = _example("nystrom_lucidrains")
    torch.manual_seed(3)
    module = NystromAttention(dim=32, dim_head=8, heads=4, num_landmarks=4, residual_conv_kernel=5).double().eval()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    np.testing.assert_allclose(adapter.nystrom_lucidrains(module, x).numpy(), module(x).detach().numpy(), rtol=0, atol=1e-13)


@pytest.mark.parametrize(("n", "lengths"), [(16, [16, 14]), (13, [13, 10])])
def test_nystrom_lucidrains_masked_real_rows(n, lengths):
    """With a mask whose every segment holds a real token, real rows agree; padded rows do not (lucidrains fills
    masked scores with -finfo.max, nystrom_attention.py ``sim1.masked_fill_``, so their fully masked rows are uniform)."""
    pytest.importorskip("nystrom_attention")
    from nystrom_attention import NystromAttention

    adapter = _example("nystrom_lucidrains")
    torch.manual_seed(0)
    module = NystromAttention(dim=32, dim_head=8, heads=4, num_landmarks=4, residual_conv_kernel=5).eval()
    x, mask = torch.randn(2, n, 32), _lengths_mask(lengths, n)
    got, want = adapter.nystrom_lucidrains(module, x, mask), module(x, mask=mask).detach()
    _close(got[mask], want[mask])
    assert (got - want)[~mask].abs().max() > 1e-2


def test_nystrom_lucidrains_empty_landmark_differs():
    """A segment with no real token: lucidrains' kernel 2 gets a uniform row (-finfo.max everywhere) where refattn's
    is 0, and the iteration spreads it to every row of Z: the real rows differ too, and through the batch-global
    Z₀ norms (the uniform row changes the largest column sum) so do item 0's, which has no padding."""
    pytest.importorskip("nystrom_attention")
    from nystrom_attention import NystromAttention

    adapter = _example("nystrom_lucidrains")
    torch.manual_seed(0)
    module = NystromAttention(dim=32, dim_head=8, heads=4, num_landmarks=4, residual_conv_kernel=5).eval()
    x, mask = torch.randn(2, 16, 32), _lengths_mask([16, 11], 16)  # item 1's last segment (12..15) is all padding
    got, want = adapter.nystrom_lucidrains(module, x, mask), module(x, mask=mask).detach()
    assert (got - want)[0].abs().max() > 1e-4
    assert (got - want)[1][mask[1]].abs().max() > 1e-3


# --------------------------------------------------------------------------
# transformers' Nystromformer


def _hf_module(n, m, conv=3, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention

    torch.manual_seed(seed)
    config = transformers.NystromformerConfig(hidden_size=32, num_attention_heads=4, num_landmarks=m, segment_means_seq_len=n,
                                              conv_kernel_size=conv, attention_probs_dropout_prob=0.0)  # fmt: skip
    return NystromformerSelfAttention(config).eval(), config


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize(("n", "m"), [(16, 4), (12, 3), (8, 8)], ids=["m4", "m3", "full_rank_shortcut"])
def test_nystrom_hf(n, m, masked, backend):
    adapter = _example("nystrom_hf")
    module, _ = _hf_module(n, m)
    x = torch.randn(2, n, 32)
    mask = _lengths_mask([n, n - 3], n) if masked else None
    want = module(x, None if mask is None else adapter.additive_mask(mask))[0]
    _close(adapter.nystrom_hf(module, x, mask, backend=backend), want)


def test_nystrom_hf_model_with_padding_fails_on_the_landmark_path():
    """transformers 5.25.0: NystromformerModel passes the (B, 1, N, N) mask of create_bidirectional_mask, which
    kernel 3's (B, H, m, N) scores cannot take (modeling_nystromformer.py line 204): a RuntimeError when m < N."""
    transformers = pytest.importorskip("transformers")
    _, config = _hf_module(8, 4)
    config.num_hidden_layers, config.intermediate_size = 1, 64
    model = transformers.NystromformerModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    with pytest.raises(RuntimeError, match="must match"):
        model(input_ids=ids, attention_mask=_lengths_mask([8, 5], 8).long())


# --------------------------------------------------------------------------
# lucidrains/performer-pytorch


def _fast_attention(causal, seed=0):
    pytest.importorskip("performer_pytorch")
    from performer_pytorch import FastAttention

    torch.manual_seed(seed)
    return FastAttention(dim_heads=16, nb_features=32, causal=causal)


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("n", [10, 300])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_performer_lucidrains(causal, n, backend):
    module = _fast_attention(causal)
    adapter = _example("performer_lucidrains")
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    _close(adapter.performer_lucidrains(module, q, k, v, backend=backend), module(q, k, v))


def test_performer_lucidrains_causal_leaks_and_canonical_does_not():
    """performer-pytorch's key maximum spans every key (softmax_kernel: ``torch.amax(data_dash, dim=(-1, -2))``) and
    ε is added after exp, so its causal outputs move when only the last key changes; refattn's preset does the
    same, and the canonical causal Performer (prefix maximum) does not."""
    module = _fast_attention(True, seed=4)
    adapter = _example("performer_lucidrains")
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    k_last = k.clone()
    k_last[:, :, -1] *= 3.0
    moved = (module(q, k_last, v) - module(q, k, v))[:, :, :-1].abs().max()
    assert moved > 1e-4
    omega = adapter.refattn_params(module)["omega"]
    arrays = [t.double().numpy() for t in (q, k, v)]
    lucidrains = lambda q, k, v, **p: performer_attention(q, k, v, preset="lucidrains", **p)  # noqa: E731
    with pytest.raises(AssertionError):
        causal_independence(lucidrains, *arrays, dict(omega=omega, causal=True), rtol=1e-6)
    causal_independence(performer_attention, *arrays, dict(omega=omega, causal=True), rtol=1e-12)


def test_performer_adapter_refuses_other_kernels():
    pytest.importorskip("performer_pytorch")
    from performer_pytorch import FastAttention

    adapter = _example("performer_lucidrains")
    with pytest.raises(NotImplementedError):
        adapter.refattn_params(FastAttention(dim_heads=16, nb_features=8, generalized_attention=True))


# --------------------------------------------------------------------------
# The other direction (the compatibility gallery): each library run on the published cases


#: example file -> (its case function, the package it needs, the cases the library passes, one it cannot express)
CASE_ADAPTERS = {
    "linformer_lucidrains": ("linformer_case", "linformer", ["linformer/shared_projection", "linformer/sliced_projection"],
                             "linformer/headwise"),
    "nystrom_lucidrains": ("nystrom_case", "nystrom_attention", ["nystrom/lucidrains_front_padding"], "nystrom/canonical"),
    "nystrom_hf": ("hf_nystrom_case", "transformers", ["nystrom/hf_kernel3_mask", "nystrom/hf_full_rank_shortcut"],
                   "nystrom/canonical"),
    "performer_lucidrains": ("performer_case", "performer_pytorch",
                             ["performer/lucidrains_causal", "performer/lucidrains_bidirectional"], "performer/gqa"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASE_ADAPTERS))
def test_the_library_passes_its_preset_cases_and_refuses_others(name):
    from refattn.conformance.suite import load_suite
    from refattn.conformance.verify import default_suite_folder, verify

    function, package, passing, unsupported = CASE_ADAPTERS[name]
    pytest.importorskip(package)
    impl = getattr(_example(name), function)
    suite = load_suite(default_suite_folder(), unsupported.split("/")[0]).select(ids=[*passing, unsupported])
    report = verify(impl, suite=suite, grad=True)
    found = {case.id: case.status for case in report.cases}
    assert set(found[i] for i in passing) <= {"pass", "partial"}, report.format()
    assert found[unsupported] == "unsupported"


def test_lucidrains_nystrom_masked_differs_on_padded_rows_as_explained():
    """nystrom/lucidrains_masked: the library's padded-token rows are uniform (its -finfo.max fill), and its
    landmark divisor loses its 1e-8 in float32, so the preset (landmark_eps 0) matches its real rows to rounding."""
    pytest.importorskip("nystrom_attention")
    from refattn.conformance.suite import load_suite
    from refattn.conformance.verify import default_suite_folder
    from refattn.lowrank import nystrom_attention

    adapter = _example("nystrom_lucidrains")
    (case,) = load_suite(default_suite_folder(), "nystrom").select(ids="nystrom/lucidrains_masked").cases
    q, k, v = (case.inputs[n] for n in "qkv")
    params = {**case.params, **case.array_params}
    got = adapter.nystrom_case(q, k, v, **params).out
    real = np.broadcast_to(params["key_padding_mask"][:, None, :], got.shape[:3])  # (B, H, N)
    assert np.abs(got - case.expected["out"])[~real].max() > 1e-2
    without_eps = nystrom_attention(q, k, v, **{**params, "landmark_eps": 0.0}).out
    np.testing.assert_allclose(got[real], without_eps[real], rtol=0, atol=1e-13)
    assert "PADDING_MASK" in adapter.EXPLANATIONS
