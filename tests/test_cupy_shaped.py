"""Every ``cupy`` backend run through a NumPy stand-in shaped like CuPy (tests/cupy_shaped.py), on the CPU.

tests/test_xp_path.py checks the xp algorithms' numbers under NumPy. This checks that the same code, called
through the registered ``cupy`` backend, uses CuPy's namespace the way CuPy 14 takes it: no host array in
device work, no device scalar as a Python index, only names and keywords CuPy has, no assignment CuPy
leaves undefined. The first tests show that the stand-in refuses each of those. Then:

* every case passes with NumPy arrays in (NumPy out) and with device arrays in (device arrays out);
* on the device check's problem for each mechanism (benchmarks/gpu_check.py), device memory stays O(N),
  the host waits for the device no more often as N grows, and float32 tiles stay float32.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import refattn
from refattn.core import registry
from refattn.core import xp as core_xp
from refattn.core.results import Cotangents, Grads, Result

from . import cupy_shaped
from .cupy_shaped import CUPYX, NAMESPACE, CupyShapeError
from .test_xp_path import SMALL_TILES, WITH_GPU_PATH, _xp_module

xp = NAMESPACE


@pytest.fixture
def cupy_shaped_device(monkeypatch):
    """The ``cupy`` backend runs here, on the stand-in, in tiles that split every case."""
    monkeypatch.setattr(core_xp, "cupy_or_none", lambda: NAMESPACE)
    monkeypatch.setitem(sys.modules, "cupyx", CUPYX)
    for name in WITH_GPU_PATH:
        monkeypatch.setattr(_xp_module(name), "BLOCK_Q", SMALL_TILES[0])
        monkeypatch.setattr(_xp_module(name), "BLOCK_K", SMALL_TILES[1])


# --- the stand-in refuses what CuPy refuses ---------------------------------------------


def test_host_arrays_in_device_work_are_refused():
    device, host = xp.ones(3), np.ones(3)
    for mixed in (lambda: device + host, lambda: host * device, lambda: xp.maximum(device, host),
                  lambda: xp.where(host > 0, device, 0.0), lambda: xp.concatenate([device, host])):  # fmt: skip
        with pytest.raises(CupyShapeError, match="NumPy array of shape"):
            mixed()
    with pytest.raises(CupyShapeError, match="NumPy array"):
        device[:2] = host[:2]
    # What CuPy takes: scalars, device arrays, host data given to asarray, host index arrays.
    np.testing.assert_array_equal((xp.asarray(host) + device * 2.0 + np.float32(1)).get(), np.full(3, 4.0))
    np.testing.assert_array_equal(device[np.array([0, 2])].get(), np.ones(2))


def test_implicit_conversion_and_device_scalars_as_indices_are_refused():
    device = xp.arange(5)
    with pytest.raises(CupyShapeError, match="implicit conversion"):
        np.asarray(device)
    largest = device.max()  # a 0-d device array, as CuPy's reductions return
    assert isinstance(largest, cupy_shaped.DeviceArray) and int(largest) == 4
    with pytest.raises(TypeError):
        range(largest)
    with pytest.raises(TypeError):
        device[:largest]
    assert list(range(int(largest))) == [0, 1, 2, 3]


def test_names_and_keywords_cupy_lacks_are_refused():
    device = xp.ones((2, 3))
    with pytest.raises(CupyShapeError, match="cupy has no 'errstate'"):
        xp.errstate
    with pytest.raises(CupyShapeError, match="does not take these arguments"):
        xp.max(device, axis=0, initial=0.0)
    with pytest.raises(CupyShapeError, match="does not take these arguments"):
        device.max(axis=0, initial=0.0)
    with pytest.raises(CupyShapeError, match="takes no keyword where"):
        xp.exp(device, where=device > 0)
    with pytest.raises(CupyShapeError, match="does not take these arguments"):
        xp.einsum("ij->j", device, out=xp.zeros(3))
    with pytest.raises(CupyShapeError, match="has no attribute 'tofile_all'"):
        device.tofile_all


def test_indexing_and_assignments_cupy_does_not_define_are_refused():
    device = xp.zeros((3, 4))
    rows = xp.asarray(np.array([True, False, True]))
    device[rows] = 1.0  # one mask, alone: CuPy supports it
    with pytest.raises(CupyShapeError, match="boolean mask only"):
        device[rows, 1:]
    target = xp.zeros(3)
    target[xp.asarray(np.array([0, 0, 2]))] = 5.0  # repeated location, one value: defined
    with pytest.raises(CupyShapeError, match="different values"):
        target[xp.asarray(np.array([0, 0, 2]))] = xp.asarray(np.array([1.0, 2.0, 3.0]))
    with pytest.raises(CupyShapeError, match="dtype bfloat16"):
        xp.asarray(np.zeros(3, dtype=ml_dtypes.bfloat16))
    assert xp.asarray(np.zeros(3, dtype=ml_dtypes.bfloat16), dtype=np.float32).dtype == np.float32
    counts = xp.zeros(3, dtype=np.int64)
    with pytest.raises(CupyShapeError, match="atomic add"):
        CUPYX.scatter_add(counts, (xp.asarray(np.array([0, 0])),), xp.ones(2, dtype=np.int64))
    sums = xp.zeros(3)
    CUPYX.scatter_add(sums, (xp.asarray(np.array([0, 0, 2])),), xp.asarray(np.array([1.0, 2.0, 3.0])))
    np.testing.assert_array_equal(sums.get(), [3.0, 0.0, 3.0])


def test_the_recorded_namespace_is_cupys():
    """cupy_api.json is what ``python tests/cupy_shaped.py`` records from CuPy; checked against the installed
    CuPy where there is one (it imports without a device)."""
    pytest.importorskip("cupy")
    assert cupy_shaped.record() == cupy_shaped.API


# --- every cupy backend, through the stand-in: NumPy arrays in and CuPy arrays in ------------------


def device_arrays_in_and_out(name: str, cupy=NAMESPACE):
    """The public function and VJP with ``backend="cupy"``, given every array as a device array of ``cupy``
    (the stand-in, or CuPy itself on a GPU); their results must be device arrays, brought back here for
    :func:`refattn.verify` to compare."""
    mechanism = registry.get(name)

    def on_device(value):
        if isinstance(value, np.ndarray):
            return cupy.asarray(value)
        if isinstance(value, (tuple, list)):
            return type(value)(on_device(item) for item in value)
        return value

    def from_device(arrays: dict) -> dict:
        for key, value in arrays.items():
            assert value is None or isinstance(value, cupy.ndarray), f"{key} came back as {type(value)}"
        return {key: None if value is None else value.get() for key, value in arrays.items()}

    def impl(*args, **kwargs):
        result = mechanism.forward(*on_device(args), backend="cupy", **on_device(kwargs))
        fields = from_device(dict(out=result.out, lse=result.lse))
        return Result(out=fields["out"], lse=fields["lse"], aux=from_device(result.aux))

    def vjp(dout, *args, dlse=None, **kwargs):
        grads = mechanism.vjp(on_device(dout), *on_device(args), dlse=on_device(dlse), backend="cupy",
                              **on_device(kwargs))  # fmt: skip
        return Grads(from_device(grads))

    impl.vjp = vjp
    return impl


#: NumPy arrays in (NumPy out) in bfloat16, a dtype CuPy lacks; CuPy arrays in (CuPy out), float64 and float32.
#: (tests/test_xp_path.py checks the numbers under NumPy itself in float64 and float32.)
RUNS = [("bfloat16", "numpy"), ("float64", "cupy"), ("float32", "cupy")]


@pytest.mark.parametrize("dtype, arrays", RUNS)
@pytest.mark.parametrize("name", WITH_GPU_PATH)
def test_cupy_backend_passes_every_case_on_the_cupy_shaped_stand_in(name, dtype, arrays, cupy_shaped_device):
    impl = device_arrays_in_and_out(name) if arrays == "cupy" else None
    report = refattn.verify(impl, mechanism=name, backend=None if impl else "cupy", dtype=dtype, grad=True)
    assert report.ok, report.format()
    assert report.counts()["pass"] == len(registry.get(name).cases())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", WITH_GPU_PATH)
def test_cupy_arrays_in_give_cupy_arrays_out_on_a_device(name, dtype):
    """The same with CuPy itself, on a GPU (tests/test_xp_path.py has NumPy arrays in there)."""
    cupy = core_xp.cupy_or_none()
    if cupy is None:
        pytest.skip("no CUDA device visible to CuPy")
    report = refattn.verify(device_arrays_in_and_out(name, cupy), mechanism=name, dtype=dtype, grad=True)
    assert report.ok, report.format()


def test_cupy_inputs_are_checked_on_the_host_first(cupy_shaped_device):
    """Bad CuPy input is the same SpecError as bad NumPy input; the checks see the values (a NaN)."""
    q = np.ones((1, 2, 4, 8))
    bad = q.copy()
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(refattn.SpecError, match=r"argument `k`.*finite values.*\(0, 1, 2, 3\)"):
        refattn.dense_attention(xp.asarray(q), xp.asarray(bad), xp.asarray(q), backend="cupy")
    with pytest.raises(refattn.SpecError, match="argument `dout`"):
        refattn.dense_attention_vjp(xp.ones((1, 2, 3, 8)), xp.asarray(q), xp.asarray(q), xp.asarray(q), backend="cupy")
    host = refattn.dense_attention(q, q, q, backend="cupy")
    assert isinstance(host.out, np.ndarray)  # NumPy in, NumPy out


# --- O(N) device memory ---------------------------------------------------------------------------


def _benchmark_script():
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPU_CHECK = _benchmark_script()


@pytest.mark.parametrize("name", sorted(GPU_CHECK.PROBLEMS))
def test_device_work_at_4n_grows_as_a_tiled_algorithm_s(name, monkeypatch):
    """The device check's problem at N and 4N, forward and backward, in tiles of 32 (how the GPU path keeps
    64K-1M tokens in memory and the device busy, checked without a device):

    * the largest device array grows 4x: a tiled algorithm's are O(N) (q and its likes); one N x N buffer
      would grow 16x;
    * the host reads device values as often at 4N as at N: no wait for the device per tile (the memory
      family's streams, whose steps run on the host, read at most once per segment: 4x as often);
    * in float32, as many float64 arrays are made at 4N as at N (per-row statistics at most, none per tile):
      the tiles are computed in float32, as the Numba kernels compute them. (A NumPy float64 scalar, such as
      a default scale of ``1 / np.sqrt(D)``, would promote them to float64 and double their traffic.)
    """
    monkeypatch.setitem(sys.modules, "cupyx", CUPYX)
    module = _xp_module(name)
    monkeypatch.setattr(module, "BLOCK_Q", 32)
    monkeypatch.setattr(module, "BLOCK_K", 32)
    watched = {}
    for n in (256, 1024):
        x = GPU_CHECK.xp_problem(name, "float32", n, xp)[1]  # as the device check times it
        with cupy_shaped.Watch() as forward:
            saved = module.forward(x, xp)
        dout = xp.asarray(np.ones(saved.out.shape, np.float32))
        with cupy_shaped.Watch() as backward:
            if name not in GPU_CHECK.FORWARD_ONLY:
                module.vjp(x, Cotangents(dout, None), xp, saved)
        watched[n] = forward, backward
    reads_growth = 4 if getattr(module, "STEPS_ON_HOST", False) else 1
    for small, large in zip(watched[256], watched[1024]):
        assert large.largest <= 4.05 * small.largest, (name, small.largest, large.largest)
        assert large.host_reads <= reads_growth * small.host_reads, (name, small.host_reads, large.host_reads)
        assert large.float64_made == small.float64_made, (name, small.float64_made, large.float64_made)
