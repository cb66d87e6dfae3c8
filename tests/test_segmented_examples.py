"""The peer adapters in examples/ (HF LongformerSelfAttention, HF BigBirdBlockSparseAttention,
lucidrains' LocalAttention) pass every case they can express, gradients included, on a fresh
export of the family's cases. HF Longformer's softmax and local-attention's rotary frequencies
are float32 inside, so those run at --dtype float32."""

import importlib.util
import sys
from pathlib import Path

import pytest

from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import verify

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.append(str(EXAMPLES))  # the adapters import their neighbour _gallery_entry

#: example file -> (mechanism, forward, vjp, dtype, package it needs)
ADAPTERS = {
    "hf_longformer": ("longformer", "hf_longformer", "hf_longformer_vjp", "float32", "transformers"),
    "hf_bigbird": ("bigbird", "hf_bigbird", "hf_bigbird_vjp", "float64", "transformers"),
    "lucidrains_local": ("local", "lucidrains_local", "lucidrains_local_vjp", "float32", "local_attention"),
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segmented_peers")
    export(folder, mechanisms=sorted({mechanism for mechanism, *_ in ADAPTERS.values()}))
    return load_suite(folder)


@pytest.mark.parametrize("example", sorted(ADAPTERS))
def test_adapter_passes_every_case_it_supports(example, suite):
    mechanism, forward, backward, dtype, package = ADAPTERS[example]
    pytest.importorskip(package)
    spec = importlib.util.spec_from_file_location(example, EXAMPLES / f"{example}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = verify(getattr(module, forward), suite=suite.select(mechanisms=mechanism), grad=True,
                    vjp=getattr(module, backward), dtype=dtype)  # fmt: skip
    assert report.ok, report.format()
    assert any(case.status in ("pass", "partial") for case in report.cases)
