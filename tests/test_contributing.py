"""CONTRIBUTING.md's "Adding a mechanism" steps are enough: a throwaway mechanism goes through them.

tests/toy_mechanism/cosine/ is a mechanism folder written by following the
guide and nothing else (cosine attention, Swin V2). In a fresh interpreter, so
that the registry of this test run is not touched, it is registered by
importing it, checked by the same contract tests every mechanism passes,
exported to a suite of its own, and verified: its reference passes, and an
implementation that reads it as dot-product attention fails.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import sys, tempfile
sys.path[:0] = [{toy!r}, {tests!r}]
import numpy as np
import refattn
import cosine                                   # step: the one registration line runs on import
import test_registry_contract as contract       # the parametrised contract tests, called for "cosine"
from refattn.conformance.export import export

contract.test_registration_follows_the_contract("cosine")
contract.test_cases_are_small_named_and_flagged("cosine")
contract.test_every_own_flag_is_used("cosine")
for case in refattn.get_mechanism("cosine").cases():
    contract.test_vjp_matches_finite_differences_on_every_case("cosine", case)

folder = tempfile.mkdtemp()
export(folder, mechanisms=["cosine"])
passed = refattn.verify(cosine.cosine_attention, suite=folder, mechanism="cosine", grad=True,
                        vjp=cosine.cosine_attention_vjp)
assert passed.ok, passed

def dot_product(q, k, v, *, logit_scale=10.0, eps=1e-12, causal=False):
    return refattn.dense_attention(q, k, v, scale=logit_scale, causal=causal)

wrong = refattn.verify(dot_product, suite=folder, mechanism="cosine")
assert not wrong.ok
print("toy mechanism: contract, export and verify OK")
"""


def test_a_new_mechanism_needs_only_its_folder():
    script = SCRIPT.format(toy=str(HERE / "toy_mechanism"), tests=str(HERE))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "toy mechanism: contract, export and verify OK" in run.stdout
