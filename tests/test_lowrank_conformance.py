"""Every low-rank mechanism's Numba backend against its conformance cases, within the suite's budgets."""

from functools import partial

import pytest

from refattn import verify
from refattn.conformance.export import export
from refattn.lowrank import (
    linformer_attention,
    linformer_attention_vjp,
    lowrank_attention,
    lowrank_attention_vjp,
    nystrom_attention,
    nystrom_attention_vjp,
    performer_attention,
    performer_attention_vjp,
)

BACKENDS = {
    "lowrank": (partial(lowrank_attention, backend="numba"), partial(lowrank_attention_vjp, backend="numba")),
    "linformer": (partial(linformer_attention, backend="numba"), partial(linformer_attention_vjp, backend="numba")),
    "nystrom": (partial(nystrom_attention, backend="numba"), partial(nystrom_attention_vjp, backend="numba")),
    "performer": (partial(performer_attention, backend="numba"), partial(performer_attention_vjp, backend="numba")),
}  # fmt: skip


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("suite")
    export(folder, mechanisms=list(BACKENDS))
    return folder


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("mechanism", list(BACKENDS))
def test_numba_agrees_on_the_conformance_cases(suite, mechanism, dtype):
    forward, vjp = BACKENDS[mechanism]
    report = verify(forward, mechanism=mechanism, grad=True, vjp=vjp, dtype=dtype, suite=suite)
    assert report.ok, report.summary()
