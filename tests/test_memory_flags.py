"""The recurrent-memory cases catch the bug classes their flags name: for each flag, a wrong variant of the
mechanism (the mistake in one line, in words in ``BUGS``) differs from the expected values of every case
that carries the flag, by far more than any tolerance.

Expected values are the reference's, computed from each case's arrays as ``refattn export`` does; the
independent derivations of those values are in tests/test_memory_<mechanism>.py.
"""

import numpy as np
import pytest

import refattn
from refattn.core import registry
from refattn.memory.compressive import reference as compressive_reference
from refattn.memory.flags import MEMORY_FLAGS

MECHANISMS = ("xl_recurrence", "sinks", "infini", "memory_tokens", "compressive")

#: What each wrong variant gets wrong, in the words of a bug report.
BUGS = {
    "STREAM_STATE": "ignores the initial state it is given and starts from an empty one",
    "MEMORY_MASK_OFF_BY_ONE": "keeps one memory entry fewer than it should (mem_len - 1, or M - 1 compressed)",
    "GRADIENT_THROUGH_MEMORY": "backpropagates through the memory (the exact gradient of the whole stream)",
    "MEMORY_ZERO_INIT": "starts from an empty memory where HF starts from mem_len zeros",
    "SAME_LENGTH": "ignores same_length",
    "RELATIVE_MEMORY_POSITIONS": "offsets queries by mem_len before the memory has filled",
    "SINK_POSITIONS": "rotates at stream positions where cache slots are asked for, and conversely",
    "SINK_EVICTION": "keeps one recent token fewer",
    "RETRIEVE_AFTER_UPDATE": "reads the memory after the segment's update, or before it when asked after",
    "ZERO_DENOMINATOR": "skips the gate while the memory is empty (local attention alone)",
    "DELTA_RULE": "writes V (linear update) instead of the delta rule's residual",
    "FEATURE_MAP": "uses the other feature map (no σ, or ELU + 1)",
    "MEMORY_TOKEN_POSITIONS": "uses the other memory-token positions",
    "MEMORY_TOKEN_MASK": "uses the other memory-token mask",
    "COMPRESSION_STRIDE": "compresses overlapping runs (stride 1) instead of runs of c",
    "MOST_USED_SELECTION": "keeps the least-used entries",
}

OTHER = {"cache": "original", "original": "cache", "sequential": "lucidrains", "lucidrains": "sequential",
         "causal": "memory_not_causal", "memory_not_causal": "causal", "elu_plus_one": "identity",
         "identity": "elu_plus_one", "retrieve_first": "update_first", "update_first": "retrieve_first"}  # fmt: skip


def _overlapping(x, f_c, weight, usage):
    """f_c over runs starting at every entry (stride 1), the first n / c kept."""
    n, c = x.shape[2], f_c.rate
    if n == 0:
        return x
    runs = np.stack([x[:, :, t:t + c] for t in range(n // c)], axis=2)  # (B, H, n / c, c, F), overlapping
    return runs.mean(axis=3) if f_c.rule != "max_pool" else runs.max(axis=3)


def _wrong(flag: str, name: str, params: dict, arrays: dict, monkeypatch) -> dict:
    """The wrong variant's keyword arguments for ``flag`` (and any patch it needs)."""
    params = dict(params)
    if flag == "STREAM_STATE":
        for state in ("memory_k", "memory_v", "compressed_k", "compressed_v", "cache_k", "cache_v", "cache_positions",
                      "norm", "memory_usage"):  # fmt: skip
            arrays.pop(state, None)
        if name == "infini":
            arrays.pop("memory", None)
        if name == "memory_tokens":
            arrays["memory"] = np.zeros_like(arrays["memory"])
    elif flag == "MEMORY_MASK_OFF_BY_ONE":
        params["mem_len"] = params["mem_len"] - 1
        if name == "compressive":  # the memory given is full: keep it, shorten the compressed memory instead
            params["mem_len"] += 1
            params["compressed_len"] -= 1
    elif flag == "MEMORY_ZERO_INIT":
        params["hf_zero_memory"] = False
    elif flag == "SAME_LENGTH":
        params["same_length"] = False
    elif flag == "SINK_POSITIONS":
        params["positions"] = OTHER[params.get("positions", "cache")]
    elif flag == "SINK_EVICTION":
        params["recent_size"] -= 1
    elif flag == "RETRIEVE_AFTER_UPDATE":
        params["update_order"] = OTHER[params.get("update_order", "retrieve_first")]
    elif flag == "ZERO_DENOMINATOR":
        params["beta"] = None  # marker: handled in _run
    elif flag == "DELTA_RULE":
        params["update"] = "linear"
    elif flag == "FEATURE_MAP":
        params["feature_map"] = OTHER[params.get("feature_map", "elu_plus_one")]
    elif flag == "MEMORY_TOKEN_POSITIONS":
        params["positions"] = OTHER[params.get("positions", "sequential")]
    elif flag == "MEMORY_TOKEN_MASK":
        params["memory_mask"] = OTHER[params.get("memory_mask", "causal")]
    elif flag == "COMPRESSION_STRIDE":
        if params.get("compression") in ("conv", "dilated_conv"):
            params["dilation"] = 1 if params.get("dilation", 1) > 1 else params["rate"]  # other taps of each run
            taps = params["rate"] // params["dilation"]
            for key in ("conv_weight_k", "conv_weight_v"):
                weight = arrays[key]
                arrays[key] = np.resize(weight, weight.shape[:2] + (taps,))
            params["compression"] = "dilated_conv" if params["dilation"] > 1 else "conv"
        else:
            monkeypatch.setattr(compressive_reference, "compress", _overlapping)
    elif flag == "MOST_USED_SELECTION":
        monkeypatch.setattr(compressive_reference, "most_used",
                            lambda usage, count: np.sort(np.argsort(usage, axis=-1, kind="stable")[..., :count], -1))
    elif flag == "RELATIVE_MEMORY_POSITIONS":
        params["hf_zero_memory"] = False  # filled below: a full memory from the start
    return params


def _outputs(result) -> dict:
    return {"out": result.out, **({"lse": result.lse} if result.lse is not None else {}),
            **{f"aux.{key}": value for key, value in result.aux.items()}}  # fmt: skip


def _differs(got: dict, want: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(got[key], np.float64) - want[key]), initial=0.0)) / max(
        float(np.max(np.abs(want[key]), initial=0.0)), 1.0) for key in want if key in got and got[key].shape == want[key].shape)


def _flagged():
    return [pytest.param(name, case, flag, id=f"{case.id}-{flag}") for name in MECHANISMS
            for case in registry.get(name).cases() for flag in case.flags if flag in MEMORY_FLAGS]  # fmt: skip


def test_every_memory_flag_has_a_wrong_variant():
    carried = {flag for name in MECHANISMS for case in registry.get(name).cases() for flag in case.flags}
    assert carried & set(MEMORY_FLAGS) == set(BUGS)


@pytest.mark.parametrize("name, case, flag", _flagged())
def test_the_wrong_variant_fails_the_flagged_case(name, case, flag, monkeypatch):
    mechanism = registry.get(name)
    arrays = case.arrays(np.random.default_rng(case.seed))
    q, k, v = (arrays.pop(n) for n in ("q", "k", "v"))
    want = mechanism.forward(q, k, v, **arrays, **case.params)
    if flag == "GRADIENT_THROUGH_MEMORY":
        # The exact directional derivative of the whole stream (through the memory) against the stored VJP's.
        rng = np.random.default_rng(7)
        dout = rng.standard_normal(want.out.shape)
        grads = mechanism.vjp(dout, q, k, v, **arrays, **case.params)
        direction = rng.standard_normal(k.shape)
        step = 1e-6
        plus = mechanism.forward(q, k + step * direction, v, **arrays, **case.params).out
        minus = mechanism.forward(q, k - step * direction, v, **arrays, **case.params).out
        exact = np.sum(dout * (plus - minus)) / (2 * step)
        assert abs(exact - np.sum(grads["k"] * direction)) > 1e-3 * max(abs(exact), 1.0)
        return
    params = _wrong(flag, name, case.params, arrays, monkeypatch)
    if flag == "ZERO_DENOMINATOR":  # the first segment's output is local attention alone, ungated
        params.pop("beta")
        got = dict(_outputs(mechanism.forward(q, k, v, **arrays, **params)))
        local = refattn.dense_attention(q, k, v, causal=True).out
        first = slice(0, params["segment_len"])
        got["out"][:, :, first] = local[:, :, first]
    elif flag == "RELATIVE_MEMORY_POSITIONS":  # offset by mem_len from the start: a zero-padded full memory
        m = arrays["memory_k"].shape[2]
        pad = params["mem_len"] - m
        wrong = {**arrays, "memory_k": np.pad(arrays["memory_k"], ((0, 0), (0, 0), (pad, 0), (0, 0))),
                 "memory_v": np.pad(arrays["memory_v"], ((0, 0), (0, 0), (pad, 0), (0, 0)))}  # fmt: skip
        got = _outputs(mechanism.forward(q, k, v, **wrong, **params))
    else:
        got = _outputs(mechanism.forward(q, k, v, **arrays, **params))
    difference = _differs(got, _outputs(want))
    assert difference > 1e-6, f"{case.id}: the variant that {BUGS[flag]} passes ({difference:.1e})"
