"""Cosine attention (spec: cosine.md beside this folder): the worked example of CONTRIBUTING.md.

Registering is the one line that makes the rest of refattn (export, verify,
the contract tests) see the mechanism.
"""

from refattn.core import registry

from .reference import check_cosine_inputs, cosine_attention, cosine_attention_vjp

MECHANISM = registry.register(
    registry.Mechanism(
        name="cosine",
        package="cosine",
        forward=cosine_attention,
        vjp=cosine_attention_vjp,
        check_inputs=check_cosine_inputs,
        backends=("reference",),
        spec=str(__import__("pathlib").Path(__file__).parent.parent / "cosine.md"),
    )
)
