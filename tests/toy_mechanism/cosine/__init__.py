"""Cosine attention (spec: cosine.md beside this folder): the worked example of CONTRIBUTING.md.

Registering is the one line that makes the rest of refattn (export, verify,
the contract tests) see the mechanism.
"""

from refattn.core import registry

from .reference import check_cosine_inputs, cosine_attention, cosine_attention_vjp

MECHANISM = registry.register(
    "cosine", "cosine", cosine_attention, cosine_attention_vjp, check_cosine_inputs, str(__import__("pathlib").Path(__file__).parent.parent / "cosine.md"),
    backends=("reference",)
)
