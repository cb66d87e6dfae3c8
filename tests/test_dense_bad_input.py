"""Every bad input raises SpecError naming the argument, what was expected and what was given."""

import numpy as np
import pytest

from refattn import SpecError, dense_attention, dense_attention_vjp

rng = np.random.default_rng(0)
Q, K, V = rng.standard_normal((1, 4, 3, 5)), rng.standard_normal((1, 2, 6, 5)), rng.standard_normal((1, 2, 6, 7))


def _with_nan(x, index):
    x = x.copy()
    x[index] = np.nan
    return x


BAD = {
    "q rank": (dict(q=Q[0]), "q", "4 dimensions"),
    "k rank": (dict(k=K[None]), "k", "4 dimensions"),
    "batch mismatch": (dict(k=np.concatenate([K, K]), v=np.concatenate([V, V])), "k", "batch 1"),
    "head dim mismatch": (dict(k=K[..., :4]), "k", "head dim 5"),
    "v length mismatch": (dict(v=V[:, :, :5]), "v", "(B, H, N)"),
    "heads not a multiple": (dict(k=rng.standard_normal((1, 3, 6, 5)), v=rng.standard_normal((1, 3, 6, 7))), "k", "dividing"),
    "nan in q": (dict(q=_with_nan(Q, (0, 1, 2, 3))), "q", "finite"),
    "inf in v": (dict(v=np.where(V > 1.5, np.inf, V)), "v", "finite"),
    "not an array": (dict(q=Q.tolist()), "q", "numpy array"),
    "complex": (dict(q=Q.astype(complex)), "q", "real floating"),
    "negative scale": (dict(scale=-1.0), "scale", "(0.0, inf)"),
    "zero scale": (dict(scale=0.0), "scale", "(0.0"),
    "string scale": (dict(scale="0.1"), "scale", "real number"),
    "negative softcap": (dict(softcap=-2.0), "softcap", "[0.0"),
    "nan softcap": (dict(softcap=float("nan")), "softcap", "finite"),
    "window negative": (dict(window=(-1, 2)), "window", "non-negative"),
    "window not a pair": (dict(window=3), "window", "pair"),
    "window float side": (dict(window=(1.5, 2)), "window", "non-negative ints"),
    "mask wrong shape": (dict(mask=np.ones((3, 5), bool)), "mask", "broadcastable"),
    "mask wrong dtype": (dict(mask=np.ones((3, 6))), "mask", "dtype bool"),
    "mask 1-d": (dict(mask=np.ones(6, bool)), "mask", "2 to 4 dimensions"),
    "bias wrong shape": (dict(bias=np.zeros((1, 3, 3, 6))), "bias", "broadcastable"),
    "bias nan": (dict(bias=np.full((3, 6), np.nan)), "bias", "finite"),
    "dropout_p one": (dict(dropout_p=1.0, dropout_keep=np.ones((3, 6), bool)), "dropout_p", "[0.0, 1.0)"),
    "dropout_p negative": (dict(dropout_p=-0.1), "dropout_p", "[0.0, 1.0)"),
    "dropout without keep-mask": (dict(dropout_p=0.1), "dropout_keep", "keep-mask"),
    "keep-mask wrong dtype": (dict(dropout_p=0.1, dropout_keep=np.ones((3, 6))), "dropout_keep", "dtype bool"),
    "alignment": (dict(causal=True, causal_alignment="top-left"), "causal_alignment", "bottom_right"),
    "causal not bool": (dict(causal="yes"), "causal", "True or False"),
    "precision": (dict(precision="fp8"), "precision", "bfloat16"),
    "backend": (dict(backend="triton"), "backend", "numba"),
    "precision with numba": (dict(precision="float32", backend="numba"), "precision", "None"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_forward_rejects(case):
    overrides, argument, expected = BAD[case]
    kwargs = dict(q=Q, k=K, v=V) | overrides
    with pytest.raises(SpecError) as info:
        dense_attention(**kwargs)
    assert info.value.argument == argument
    assert expected in str(info.value)
    assert "given" in str(info.value)


@pytest.mark.parametrize("case", ["q rank", "negative scale", "mask wrong shape", "dropout without keep-mask"])
def test_vjp_rejects_the_same(case):
    overrides, argument, _ = BAD[case]
    kwargs = dict(q=Q, k=K, v=V) | overrides
    with pytest.raises(SpecError) as info:
        dense_attention_vjp(np.zeros((1, 4, 3, 7)), **kwargs)
    assert info.value.argument == argument


@pytest.mark.parametrize("name, value", [("dout", np.zeros((1, 4, 3, 5))), ("dlse", np.zeros((1, 4, 4)))])
def test_vjp_rejects_cotangents_of_the_wrong_shape(name, value):
    cotangents = {"dout": np.zeros((1, 4, 3, 7))} | {name: value}
    with pytest.raises(SpecError) as info:
        dense_attention_vjp(cotangents.pop("dout"), Q, K, V, **cotangents)
    assert info.value.argument == name


def test_spec_error_is_a_value_error_with_a_readable_message():
    with pytest.raises(ValueError, match=r"argument `k`: expected 4 dimensions \(B, H, N, D\), given shape \(2, 6, 5\)"):
        dense_attention(Q, K[0], V)
