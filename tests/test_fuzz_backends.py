"""The bundled Numba backends pass `refattn fuzz` for every mechanism (a fixed seed, a few examples each).

Forward and gradients in float64, and the forward in float32 for the
mechanisms whose decisions are discrete (their strategies keep them away from
ties at float32). Longer runs carry the ``slow`` marker.
"""

from __future__ import annotations

import pytest

from refattn.core import registry
from refattn.fuzz import fuzz

WITH_NUMBA = [name for name in registry.names() if "numba" in registry.get(name).backends]
DISCRETE = ["lsh", "routing", "compressive"]


@pytest.mark.parametrize("mechanism", WITH_NUMBA)
def test_numba_backend_passes_the_fuzzer(mechanism):
    report = fuzz(None, mechanism, backend="numba", grad=True, examples=4, seed=20)
    assert report.ok, report.format()


@pytest.mark.parametrize("mechanism", DISCRETE)
def test_numba_backend_reproduces_decisions_in_float32(mechanism):
    report = fuzz(None, mechanism, backend="numba", dtype="float32", examples=6, seed=20)
    assert report.ok, report.format()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mechanism", WITH_NUMBA)
def test_numba_backend_passes_a_longer_fuzz(mechanism, dtype):
    report = fuzz(None, mechanism, backend="numba", grad=True, dtype=dtype, examples=60, seed=7)
    assert report.ok, report.format()


@pytest.mark.parametrize("mechanism", ["compressive", "memory_tokens"])
def test_numba_backend_takes_bfloat16_inputs(mechanism):
    """Found by fuzzing: NumPy's einsum has no bfloat16 loop, and the compression and memory projections
    raised TypeError on bfloat16 inputs."""
    report = fuzz(None, mechanism, backend="numba", dtype="bfloat16", examples=4, seed=3)
    assert report.ok, report.format()
