"""Infini-attention: against a loop transcription of the paper's eqs. (3)-(6), the zero first denominator,
the VJP of every variant, the Numba backend, bad input."""

import numpy as np
import pytest

from refattn import SpecError
from refattn.memory import infini_attention, infini_attention_vjp, infini_step
from refattn.memory.infini import properties
from tests.finite_differences import finite_differences

f = infini_attention


def _problem(b=1, hq=2, hkv=2, n=12, d=4, dv=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, hq, n, d)), rng.standard_normal((b, hkv, n, d)),
            rng.standard_normal((b, hkv, n, dv)), rng.standard_normal(hq))  # fmt: skip


def _transcription(q, k, v, beta, L, update="linear", eps=0.0, sigma=lambda x: np.where(x > 0, x + 1, np.exp(x))):
    """Eqs. (3)-(6), one head, one token at a time, in plain loops."""
    b, hq, n, d = q.shape
    hkv, dv = k.shape[1], v.shape[3]
    out = np.zeros((b, hq, n, dv))
    for bi in range(b):
        for h in range(hq):
            g = h // (hq // hkv)
            M, z = np.zeros((d, dv)), np.zeros(d)
            for s in range(0, n, L):
                for i in range(s, min(s + L, n)):
                    sq = sigma(q[bi, h, i])
                    den = sq @ z + eps
                    mem = sq @ M / den if den != 0 else np.zeros(dv)
                    logits = np.array([q[bi, h, i] @ k[bi, g, j] / np.sqrt(d) for j in range(s, i + 1)])
                    w = np.exp(logits - logits.max())
                    local = (w / w.sum()) @ v[bi, g, s:i + 1]
                    gate = 1 / (1 + np.exp(-beta[h]))
                    out[bi, h, i] = gate * mem + (1 - gate) * local
                M_old, z_old = M.copy(), z.copy()
                for j in range(s, min(s + L, n)):
                    sk = sigma(k[bi, g, j])
                    write = v[bi, g, j]
                    if update == "delta":
                        den = sk @ z_old + eps
                        write = write - (sk @ M_old / den if den != 0 else 0.0)
                    M = M + np.outer(sk, write)
                    z = z + sk
    return out


@pytest.mark.parametrize("update, eps", [("linear", 0.0), ("delta", 0.0), ("delta", 0.5)])
def test_against_a_loop_transcription_of_the_paper(update, eps):
    q, k, v, beta = _problem(hq=4)
    got = f(q, k, v, segment_len=5, beta=beta, update=update, eps=eps)
    np.testing.assert_allclose(got.out, _transcription(q, k, v, beta, 5, update, eps), atol=1e-12)
    assert got.lse is None and np.all(np.isfinite(got.out))


def test_identity_feature_map_and_update_first_differ_from_the_paper():
    q, k, v, beta = _problem()
    paper = f(q, k, v, segment_len=4, beta=beta, eps=1.0).out
    no_sigma = f(q, k, v, segment_len=4, beta=beta, eps=1.0, feature_map="identity").out
    np.testing.assert_allclose(no_sigma, _transcription(q, k, v, beta, 4, eps=1.0, sigma=lambda x: x), atol=1e-12)
    after = f(q, k, v, segment_len=4, beta=beta, eps=1.0, update_order="update_first").out
    assert np.abs(paper - no_sigma).max() > 1e-3 and np.abs(paper - after).max() > 1e-3


def test_closed_gate_state_and_step():
    q, k, v, beta = _problem()
    properties.closed_gate_is_local_attention(f, q, k, v, 4)
    properties.state_carries_over(f, q, k, v, 8, dict(segment_len=4, beta=beta, update="delta"), properties.STATE)
    state, _ = infini_step(None, q[:, :, :4], k[:, :, :4], v[:, :, :4], beta=beta)
    np.testing.assert_allclose(state["norm"], np.where(k[:, :, :4] > 0, k[:, :, :4] + 1, np.exp(k[:, :, :4])).sum(2))


@pytest.mark.parametrize("update", ["linear", "delta"])
@pytest.mark.parametrize("order", ["retrieve_first", "update_first"])
def test_vjp_of_one_segment_with_memory_matches_finite_differences(update, order):
    q, k, v, beta = _problem(hq=4, n=5, d=3, dv=2, seed=1)
    rng = np.random.default_rng(2)
    params = dict(segment_len=5, memory=rng.standard_normal((1, 2, 3, 2)), norm=1 + np.abs(rng.standard_normal((1, 2, 3))),
                  update=update, update_order=order, eps=0.1)  # fmt: skip
    arrays = dict(q=q, k=k, v=v, beta=beta)
    dout = rng.standard_normal((1, 4, 5, 2))
    grads = infini_attention_vjp(dout, **arrays, **params)
    for name in arrays:
        np.testing.assert_allclose(grads[name], finite_differences(f, arrays, params, dout, None, name), atol=1e-7)


@pytest.mark.parametrize("dtype, atol", [("float64", 1e-12), ("float32", 2e-5)])
def test_numba_agrees_with_the_reference(dtype, atol):
    q, k, v, beta = _problem(hq=4, n=40, d=16, dv=8)
    params = dict(segment_len=8, update="delta", eps=1e-3)
    rng = np.random.default_rng(3)
    dout = rng.standard_normal((1, 4, 40, 8))
    want, want_grads = f(q, k, v, beta=beta, **params), infini_attention_vjp(dout, q, k, v, beta=beta, **params)
    cast = [x.astype(dtype) for x in (q, k, v, beta)]
    got = f(*cast[:3], beta=cast[3], **params, backend="numba")
    got_grads = infini_attention_vjp(dout.astype(dtype), *cast[:3], beta=cast[3], **params, backend="numba")
    assert got.out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got.out, want.out, atol=atol)
    for name in want_grads:
        np.testing.assert_allclose(got_grads[name], want_grads[name], atol=atol * 10)


@pytest.mark.parametrize("bad, argument", [
    (dict(segment_len=0), "segment_len"),
    (dict(beta=np.zeros(3)), "beta"),
    (dict(memory=np.zeros((1, 2, 4, 3))), "norm"),
    (dict(memory=np.zeros((1, 2, 4, 4)), norm=np.zeros((1, 2, 4))), "memory"),
    (dict(memory=np.zeros((1, 2, 4, 3)), norm=np.zeros((1, 2, 3))), "norm"),
    (dict(eps=-1.0), "eps"),
    (dict(update="hebbian"), "update"),
    (dict(update_order="later"), "update_order"),
])  # fmt: skip
def test_bad_input(bad, argument):
    q, k, v, beta = _problem()
    with pytest.raises(SpecError) as error:
        f(q, k, v, **{**dict(segment_len=4, beta=beta), **bad})
    assert error.value.argument == argument
