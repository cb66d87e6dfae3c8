"""The hierarchical conformance cases catch the mistakes their flags name.

The cases are a fresh export of h1d's and multilevel's ``cases.py`` (what
``refattn export --check`` holds the committed suite to). ``Wrong(mechanism,
FLAG)`` is the mechanism's reference with the one mistake that ``FLAG`` names
planted: an argument changed on the way in (``_arguments``), a result changed
on the way out, or one step of the reference replaced (``_plant``, undone by
pytest's monkeypatch after the test). ``BUGS`` says each mistake in the words
of a bug report. Every flag the cases carry, the shared ones included, has one;
every wrong variant must fail at least one case carrying its flag (outputs or
gradients), while the reference passes every case.
"""

import numpy as np
import pytest

import refattn.hierarchical  # noqa: F401  (registers the family)
from refattn.conformance.export import export
from refattn.conformance.suite import load_suite
from refattn.conformance.verify import verify
from refattn.core import registry
from refattn.hierarchical.h1d import reference as h1d_reference
from refattn.hierarchical.multilevel import reference as multilevel_reference

MECHANISMS = ("h1d", "multilevel")

#: What each wrong variant gets wrong, in the words of a bug report, per mechanism.
BUGS = {
    "h1d": {
        "H1D_COVERAGE": "stops coarsening one level early (four top blocks, as HAttention1D)",
        "H1D_NORMALISATION": "shifts each level by its own row maximum before summing (or one shift where the "
        "preset has one per level)",
        "H1D_COARSENING": "sums the queries of a group instead of averaging them",
        "H1D_CAUSAL_BLOCKS": "leaves level 0's earlier neighbour out in causal mode (or keeps it where the preset "
        "leaves it out)",
        "H1D_PADDING": "lets the zero padding tokens attend and counts them in every mean",
        "BASELINE": "scales the logits by 1 / D instead of 1 / sqrt(D)",
        "AWKWARD_HEAD_DIM": "drops the head dimensions past the last multiple of 8",
        "VALUE_DIM_DIFFERS": "takes the default scale from the value dimension",
        "GQA_HEAD_MAP": "gives query head h the kv head h % Hkv instead of h // (Hq / Hkv)",
        "GQA_GRAD_REDUCTION": "gives a kv head the gradient of the first query head of its group only",
        "MULTI_BATCH": "uses batch element 0's keys and values for every batch element",
        "CAUSAL_MASK": "ignores causal",
        "ODD_LENGTH": "leaves the last row of an odd-length sequence at zero",
        "SCALE_OVERRIDE": "ignores the scale it is given",
    },
    "multilevel": {
        "MULTILEVEL_UNITS": "attends across unit boundaries (no block-diagonal mask)",
        "MULTILEVEL_AGGREGATE": "ignores the context vector u of attention pooling (a uniform softmax: the mean)",
        "MULTILEVEL_TOKEN_RULE": "uses the other token rule (own for sum, sum for own)",
        "MULTILEVEL_MAX_SUBGRADIENT": "splits max pooling's gradient evenly over the unit's elements",
        "BASELINE": "scales the logits by 1 / D instead of 1 / sqrt(D)",
        "AWKWARD_HEAD_DIM": "drops the projection columns past the last multiple of 8",
        "MULTI_BATCH": "uses batch element 0's tokens for every batch element",
        "SCALE_OVERRIDE": "ignores the scale it is given",
    },
}


def _default_scale(width: int, params: dict) -> float:
    return params["scale"] if params.get("scale") is not None else width**-0.5


def _arguments(mechanism: str, flag: str, arrays: dict, params: dict) -> tuple[dict, dict]:
    """The arrays and parameters the wrong variant passes to the reference (a copy; unchanged for other flags)."""
    arrays, params = dict(arrays), dict(params)
    if mechanism == "h1d":
        q, k, v = arrays["q"], arrays["k"], arrays["v"]
        if flag == "H1D_COVERAGE":
            levels = params.get("num_levels") or int(np.log2(q.shape[2] // params["block_size"]))
            params["num_levels"] = max(1, levels - 1)
        elif flag == "H1D_NORMALISATION":
            shared = params.get("row_max", "shared") == "shared"
            params.update(row_max="per_level" if shared else "shared", denominator_eps=1e-8 if shared else 0.0)
        elif flag == "H1D_CAUSAL_BLOCKS":
            params["finest_sibling"] = not params.get("finest_sibling", True)
        elif flag in ("BASELINE", "VALUE_DIM_DIFFERS") and params.get("scale") is None:
            params["scale"] = 1.0 / q.shape[-1] if flag == "BASELINE" else v.shape[-1] ** -0.5
        elif flag == "AWKWARD_HEAD_DIM":
            kept = q.shape[-1] // 8 * 8
            params["scale"] = _default_scale(q.shape[-1], params)
            arrays.update(q=q[..., :kept], k=k[..., :kept])
        elif flag == "GQA_HEAD_MAP":
            heads = np.arange(q.shape[1]) % k.shape[1]
            arrays.update(k=k[:, heads], v=v[:, heads])
        elif flag == "GQA_GRAD_REDUCTION":
            heads = np.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
            arrays.update(k=k[:, heads], v=v[:, heads])
        elif flag == "MULTI_BATCH":
            arrays.update(k=np.repeat(k[:1], k.shape[0], axis=0), v=np.repeat(v[:1], v.shape[0], axis=0))
        elif flag == "CAUSAL_MASK":
            params["causal"] = False
        elif flag == "SCALE_OVERRIDE":
            params.pop("scale", None)
    else:
        x, wq = arrays["x"], arrays["wq"]
        if flag == "MULTILEVEL_AGGREGATE" and params.get("aggregate", "attention_pool") == "attention_pool":
            arrays["context"] = np.zeros_like(arrays["context"])
        elif flag == "MULTILEVEL_TOKEN_RULE":
            params["token_rule"] = "own" if params.get("token_rule", "sum") == "sum" else "sum"
        elif flag == "BASELINE" and params.get("scale") is None:
            params["scale"] = 1.0 / wq.shape[-1]
        elif flag == "AWKWARD_HEAD_DIM":
            kept = wq.shape[-1] // 8 * 8
            params["scale"] = _default_scale(wq.shape[-1], params)
            arrays.update(wq=wq[..., :kept], wk=arrays["wk"][..., :kept])
        elif flag == "MULTI_BATCH":
            arrays["x"] = np.repeat(x[:1], x.shape[0], axis=0)
        elif flag == "SCALE_OVERRIDE":
            params.pop("scale", None)
    return arrays, params


def _plant(mechanism: str, flag: str, monkeypatch) -> None:
    """Replace one step of the reference for the flags whose mistake lives inside it."""
    if (mechanism, flag) == ("h1d", "H1D_COARSENING"):
        monkeypatch.setattr(h1d_reference, "coarse_queries", lambda x, q, level, per_token: h1d_reference.group_sums(q, level))
    elif (mechanism, flag) == ("h1d", "H1D_PADDING"):
        monkeypatch.setattr(h1d_reference, "token_counts", lambda x, level: np.full(x.padded_len >> level, 2.0**level))
    elif (mechanism, flag) == ("multilevel", "MULTILEVEL_UNITS"):
        monkeypatch.setattr(multilevel_reference, "same_unit", lambda units: np.ones((units.size, units.size), bool))
    elif (mechanism, flag) == ("multilevel", "MULTILEVEL_MAX_SUBGRADIENT"):
        correct = multilevel_reference._aggregate_vjp

        def spread(x, level, lv, d_g, grads, num):
            if x.aggregate != "max":
                return correct(x, level, lv, d_g, grads, num)
            member = multilevel_reference.membership(lv["units"], x.unit_count(level))  # (U, M)
            return np.einsum("ui,buc->bic", member / member.sum(axis=1, keepdims=True), d_g)

        monkeypatch.setattr(multilevel_reference, "_aggregate_vjp", spread)


class Wrong:
    """The reference of ``mechanism`` with the mistake ``flag`` names (``flag=None``: the reference itself)."""

    def __init__(self, mechanism: str, flag: str | None = None):
        self.mechanism, self.flag = mechanism, flag
        self.positional = registry.get(mechanism).positional
        public = {"h1d": (refattn.hierarchical.h1d_attention, refattn.hierarchical.h1d_attention_vjp),
                  "multilevel": (refattn.hierarchical.multilevel_attention, refattn.hierarchical.multilevel_attention_vjp)}  # fmt: skip
        self.forward, self.backward = public[mechanism]

    def _split(self, arrays, params):
        """The case's arrays by name (positional and keyword) and its other parameters."""
        given = dict(zip(self.positional, arrays))
        given.update({name: value for name, value in params.items() if isinstance(value, np.ndarray)})
        return given, {name: value for name, value in params.items() if name not in given}

    def __call__(self, *arrays, **params):
        arrays, params = _arguments(self.mechanism, self.flag, *self._split(arrays, params))
        result = self.forward(**arrays, **params)
        if self.flag == "ODD_LENGTH" and result.out.shape[2] % 2:
            result.out[:, :, -1] = 0.0
        return result

    def vjp(self, dout, *arrays, dlse=None, **params):
        given, params = self._split(arrays, params)
        arrays, params = _arguments(self.mechanism, self.flag, given, params)
        if self.flag == "ODD_LENGTH" and dout.shape[2] % 2:
            dout = dout.copy()
            dout[:, :, -1] = 0.0
        grads = dict(self.backward(dout, **arrays, dlse=dlse, **params))
        return {name: _shaped(grads[name], given[name], self.flag) for name in grads}


def _shaped(grad: np.ndarray, like: np.ndarray, flag: str) -> np.ndarray:
    """A gradient of the wrong variant's arguments as one of the case's inputs (dropped columns as zeros;
    expanded kv heads summed back, or for GQA_GRAD_REDUCTION the first of each group taken)."""
    if grad.shape == like.shape:
        return grad
    if grad.shape[:-1] == like.shape[:-1]:
        return np.pad(grad, [(0, 0)] * (grad.ndim - 1) + [(0, like.shape[-1] - grad.shape[-1])])
    group = grad.shape[1] // like.shape[1]
    grouped = grad.reshape(grad.shape[0], like.shape[1], group, *grad.shape[2:])
    if flag == "GQA_GRAD_REDUCTION":
        return grouped[:, :, 0]
    return grad.reshape(grad.shape[0], group, like.shape[1], *grad.shape[2:]).sum(axis=1)  # h % Hkv: strided


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hierarchical_suite")
    export(folder, mechanisms=list(MECHANISMS))
    return load_suite(folder)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_every_flag_is_used_and_has_a_wrong_variant(mechanism, suite):
    used = {flag for case in suite.cases if case.mechanism == mechanism for flag in case.flags}
    assert used == set(BUGS[mechanism])
    assert set(registry.get(mechanism).flags()) <= used


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_reference_passes_every_case(mechanism, suite):
    report = verify(Wrong(mechanism), suite=suite, mechanism=mechanism, grad=True)
    assert report.ok, report.format()
    assert all(case.status == "pass" for case in report.cases)


@pytest.mark.parametrize("mechanism, flag", [(m, f) for m in MECHANISMS for f in sorted(BUGS[m])])
def test_wrong_variant_fails_a_flagged_case(mechanism, flag, suite, monkeypatch):
    flagged = [case.id for case in suite.select(flags=flag).cases if case.mechanism == mechanism]
    _plant(mechanism, flag, monkeypatch)
    report = verify(Wrong(mechanism, flag), suite=suite.select(ids=flagged), mechanism=mechanism, grad=True)
    failed = [case.id for case in report.cases if case.status == "fail"]
    assert failed, f"no {flag} case of {mechanism} catches a variant that {BUGS[mechanism][flag]}:\n{report.format()}"
