"""The GPU path's algorithm under NumPy (issue 19): every mechanism with a ``cupy`` backend runs its ``xp.py``
with ``xp = numpy`` against every conformance case, forward and gradients, float64 and float32, with tiles
small enough that the online softmax crosses many tile boundaries. The same code runs under CuPy on a GPU
(tests marked ``gpu`` below, skipped without a device)."""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest

import refattn
from refattn.core import registry
from refattn.core.results import Cotangents
from refattn.core.xp import cupy_or_none

WITH_GPU_PATH = [name for name in registry.names() if "cupy" in registry.get(name).backends]
#: Tile sizes that split every case's rows and keys (cases have N <= 80).
SMALL_TILES = (5, 7)


def _xp_module(name):
    return importlib.import_module(f"{registry.get(name).package}.xp")


def xp_implementation(name: str, xp=np):
    """The mechanism's xp algorithm behind its public signature, for :func:`refattn.verify`."""
    mechanism = registry.get(name)
    signature = inspect.signature(mechanism.forward)
    module = _xp_module(name)

    def checked(args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return mechanism.check_inputs(**{k: v for k, v in bound.arguments.items() if k not in ("precision", "backend")})

    def impl(*args, **kwargs):
        return module.forward(checked(args, kwargs), xp)

    def vjp(dout, *args, dlse=None, **kwargs):
        return module.vjp(checked(args, kwargs), Cotangents(np.asarray(dout), None if dlse is None else np.asarray(dlse)), xp)

    impl.vjp = vjp
    impl.__qualname__ = f"{name}.xp[{xp.__name__}]"
    return impl


@pytest.fixture
def small_tiles(monkeypatch):
    for name in WITH_GPU_PATH:
        module = _xp_module(name)
        monkeypatch.setattr(module, "BLOCK_Q", SMALL_TILES[0])
        monkeypatch.setattr(module, "BLOCK_K", SMALL_TILES[1])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", WITH_GPU_PATH)
def test_xp_path_under_numpy_passes_every_case(name, dtype, small_tiles):
    report = refattn.verify(xp_implementation(name), mechanism=name, dtype=dtype, grad=True)
    assert report.ok, report.format()
    assert report.counts()["pass"] == len(registry.get(name).cases())


def test_tiles_do_not_change_the_result(monkeypatch):
    """One tile or many: the online softmax gives the same out, lse and gradients (to rounding)."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 4, 37, 8)), rng.standard_normal((1, 2, 41, 8)), rng.standard_normal((1, 2, 41, 5))
    mask = rng.random((1, 1, 37, 41)) < 0.7
    mask[..., 3, :] = False  # a fully masked row
    impl = xp_implementation("dense")
    dout = rng.standard_normal((1, 4, 37, 5))
    whole = impl(q, k, v, mask=mask, causal=True), impl.vjp(dout, q, k, v, mask=mask, causal=True)
    monkeypatch.setattr(_xp_module("dense"), "BLOCK_Q", 3)
    monkeypatch.setattr(_xp_module("dense"), "BLOCK_K", 4)
    tiled = impl(q, k, v, mask=mask, causal=True), impl.vjp(dout, q, k, v, mask=mask, causal=True)
    np.testing.assert_allclose(tiled[0].out, whole[0].out, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(tiled[0].lse), np.isinf(whole[0].lse))
    assert np.isneginf(tiled[0].lse[0, :, 3]).all() and not tiled[0].out[0, :, 3].any()
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(tiled[1][name], whole[1][name], rtol=0, atol=1e-12)


def test_cupy_backend_without_a_device_is_a_spec_error_after_the_checks():
    if cupy_or_none() is not None:
        pytest.skip("a CUDA device is visible")
    q = np.ones((1, 1, 4, 8))
    with pytest.raises(refattn.SpecError, match="argument `v`"):  # bad input first, as on every backend
        refattn.dense_attention(q, q, q[:, :, :3], backend="cupy")
    with pytest.raises(refattn.SpecError, match="CUDA device"):
        refattn.dense_attention(q, q, q, backend="cupy")
    assert "cupy" not in registry.get("dense").available_backends()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", WITH_GPU_PATH)
def test_cupy_backend_on_a_device_passes_every_case(name, dtype):
    if cupy_or_none() is None:
        pytest.skip("no CUDA device visible to CuPy")
    report = refattn.verify(mechanism=name, backend="cupy", dtype=dtype, grad=True)
    assert report.ok, report.format()


@pytest.mark.parametrize("bidirectional, num_buckets, max_distance", [(True, 32, 128), (False, 32, 128), (True, 20, 160), (False, 6, 7)])
def test_t5_buckets_of_distances_clipped_at_max_distance_are_unchanged(bidirectional, num_buckets, max_distance):
    """(B4), which t5/xp.py relies on to keep its table per distance small: from max_distance on, every
    distance of a side shares that side's last bucket, so clipping at ±max_distance changes no bucket."""
    from refattn.position.t5 import relative_position_bucket

    relative = np.arange(-50 * max_distance, 50 * max_distance + 1)
    clipped = np.clip(relative, -max_distance, max_distance)
    buckets = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(relative_position_bucket(clipped, bidirectional, num_buckets, max_distance), buckets)
    side = num_buckets // 2 if bidirectional else num_buckets
    assert (buckets[relative <= -max_distance] == side - 1).all()  # the last bucket of the keys before


def test_attended_counts_tile_by_tile_match_the_closed_form(monkeypatch):
    """Causal Nq = Nk = N: row i keeps i + 1 keys; a window of 3 to the left keeps min(i + 1, 4); a key
    padding mask of the last 5 keys removes them from every row that could see them."""
    from refattn.dense import xp as dense_xp
    from refattn.dense.inputs import check_dense_inputs

    n, rows = 23, np.arange(23)
    q = np.zeros((2, 3, n, 4))
    dense = dict(bias=None, causal_alignment="bottom_right", scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0)

    def counts(**arguments):
        x = check_dense_inputs(q, q[:, :1], q[:, :1], **{**dense, "mask": None, "window": None, "causal": False, **arguments})
        return dense_xp.attended_counts(x, np, (4, 6))

    np.testing.assert_array_equal(counts(causal=True), np.broadcast_to(rows + 1, (2, 3, n)))
    np.testing.assert_array_equal(counts(causal=True, window=(3, 0)), np.broadcast_to(np.minimum(rows + 1, 4), (2, 3, n)))
    padding = np.ones((2, 1, 1, n), dtype=bool)
    padding[1, ..., n - 5:] = False
    expected = np.stack([rows + 1, np.minimum(rows + 1, n - 5)])[:, None, :]
    np.testing.assert_array_equal(counts(causal=True, mask=padding), np.broadcast_to(expected, (2, 3, n)))


def test_transformer_xl_xp_path_rejects_a_kept_pair_without_a_row(small_tiles):
    """Keys after the query have no row of r: without a causal mask the xp path raises the reference's error."""
    rng = np.random.default_rng(0)
    n = 12
    q, k, v = (rng.standard_normal((1, 2, n, 4)) for _ in range(3))
    arguments = dict(r=rng.standard_normal((2, n, 4)), u=np.zeros((2, 4)), v_bias=np.zeros((2, 4)),
                     q_positions=np.arange(n), k_positions=np.arange(n))  # fmt: skip
    impl = xp_implementation("transformer_xl")
    with pytest.raises(refattn.SpecError, match="argument `r`.*no mask, causality or window excludes"):
        impl(q, k, v, **arguments)
    with pytest.raises(refattn.SpecError, match="argument `r`"):
        impl.vjp(np.ones((1, 2, n, 4)), q, k, v, **arguments)
    assert np.isfinite(impl(q, k, v, causal=True, **arguments).out).all()


def test_online_softmax_statistics_give_the_weights_where_the_lse_cannot():
    """A float32 row of 7 equal logits near −1e9 (google-research's added mask, routing's "add" mode), in
    tiles of 3 and 4: its lse, L + log 7, rounds back to L (float32's spacing there is 64), so exp(z − lse)
    gives weights 1; the row's maximum and sum give the softmax, 1/7 each (refattn/routing/xp.py's VJP)."""
    from refattn.segmented.blocksparse_xp import online_softmax

    logits = np.full((1, 7), -1e9, dtype=np.float32)
    values = np.eye(7, dtype=np.float32)  # out = the weights
    tiles = [(logits[:, :3], values[:3]), (logits[:, 3:], values[3:])]
    out, lse, row_max, row_sum = online_softmax(iter(tiles), np, statistics=True)
    np.testing.assert_allclose(np.exp(logits - row_max[:, None]) / row_sum[:, None], np.full((1, 7), 1 / 7), rtol=1e-6)
    np.testing.assert_allclose(out, np.full((1, 7), 1 / 7), rtol=1e-6)
    assert lse[0] == np.float32(-1e9) and np.exp(logits - lse[:, None]).sum() == 7  # what the lse would give
