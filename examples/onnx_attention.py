"""Run ONNX's ``Attention`` operator, as ``onnx.reference`` evaluates it, on refattn's dense cases.

``onnx_attention(q, k, v, **params)`` builds a one-node ONNX model (opset 24)
whose ``Attention`` node takes the case's arrays, and runs it with
``onnx.reference.ReferenceEvaluator``; ``onnx_attention_25`` does the same at
opset 25, whose ``left_window_size`` / ``right_window_size`` express sliding
windows. How refattn's parameters map onto the operator:

* ``scale`` and ``softcap`` are the node's attributes; grouped kv heads are
  the operator's own GQA (4-D inputs with fewer kv heads);
* the mask (True = may attend) is the boolean ``attn_mask``; with a bias,
  ``attn_mask`` is the float bias with ``-inf`` where masked;
* causality is ``is_causal=1``. Without a cache the operator aligns it
  top-left (offset 0); a bottom-right bound with Nq != Nk is the operator's
  external-cache form, ``nonpad_kv_seqlen = Nk`` for every batch element
  (offset Nk - Nq, no key padded), which also offsets the window;
* the log-sum-exp is that of the operator's own softmax input, its output
  ``qk_matmul_output`` with ``qk_matmul_output_mode=2`` (scaled, soft-capped
  scores plus mask and bias).

The operator has no dropout (``dropout_keep`` raises ``NotImplementedError``)
and no gradients: the gallery verifies the forward only::

    refattn verify --mechanism dense --impl examples/onnx_attention.py:onnx_attention --dtype float32

onnx/onnx ``onnx/reference/ops/op_attention.py`` (``_compute_attention``), onnx 1.23.2 as installed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from _gallery_entry import Entry
from refattn.core.results import Result

#: ONNX's Attention inputs and outputs, in the operator's order.
INPUTS = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")
OUTPUTS = ("Y", "present_key", "present_value", "qk_matmul_output")
QK_WITH_BIAS = 2  # qk_matmul_output_mode: the scores after softcap, mask and bias, before the softmax


def attention(q, k, v, *, opset=24, mask=None, bias=None, causal=False, causal_alignment="bottom_right", window=None,
              scale=None, softcap=0.0, dropout_keep=None, dropout_p=0.0) -> Result:  # fmt: skip
    """refattn's dense attention on NumPy arrays (B, H, N, D), computed by ONNX's reference ``Attention``."""
    if dropout_keep is not None or dropout_p > 0:
        raise NotImplementedError("ONNX's Attention operator has no dropout")
    if window is not None and opset < 25:
        raise NotImplementedError(f"ONNX's Attention has no sliding window before opset 25 (this is opset {opset})")
    feeds = {"Q": q, "K": k, "V": v}
    attn_mask = _attn_mask(mask, bias)
    if attn_mask is not None:
        feeds["attn_mask"] = attn_mask
    bottom_right = (causal or window is not None) and causal_alignment == "bottom_right" and q.shape[2] != k.shape[2]
    if bottom_right:  # the external-cache offset nonpad_kv_seqlen - Nq, nothing padded
        feeds["nonpad_kv_seqlen"] = np.full(q.shape[0], k.shape[2], dtype=np.int64)
    attributes = dict(is_causal=int(causal), qk_matmul_output_mode=QK_WITH_BIAS,
                      **({} if scale is None else {"scale": float(scale)}),
                      **({"softcap": float(softcap)} if softcap > 0 else {}),
                      **_window_attributes(window))  # fmt: skip
    model = _model(feeds, attributes, opset)
    out, logits = ReferenceEvaluator(model).run(["Y", "qk_matmul_output"], feeds)
    return Result(out=out, lse=_logsumexp(logits))


def _attn_mask(mask, bias):
    """The operator's ``attn_mask``: the boolean mask, the bias, or the bias with -inf where masked."""
    if bias is None:
        return mask
    return bias if mask is None else np.where(mask, bias, -np.inf).astype(bias.dtype)


def _window_attributes(window) -> dict:
    """``left_window_size`` / ``right_window_size``, -1 for an unbounded side."""
    if window is None:
        return {}
    left, right = window
    return {"left_window_size": -1 if left is None else int(left), "right_window_size": -1 if right is None else int(right)}


def _model(feeds: dict, attributes: dict, opset: int) -> onnx.ModelProto:
    """A model with one ``Attention`` node over the given inputs (omitted optional inputs named "")."""
    last = max(INPUTS.index(name) for name in feeds)
    node = helper.make_node("Attention", [name if name in feeds else "" for name in INPUTS[: last + 1]], list(OUTPUTS),
                            **attributes)  # fmt: skip
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(x.dtype), None) for name, x in feeds.items()]
    outputs = [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in OUTPUTS]
    graph = helper.make_graph([node], "attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    """(B, H, Nq, Nk) -> (B, H, Nq), -inf on a row of -inf."""
    top = logits.max(axis=-1, keepdims=True)
    finite_top = np.where(np.isneginf(top), 0, top)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(logits - finite_top).sum(axis=-1, keepdims=True)) + finite_top)[..., 0]


def onnx_attention(q, k, v, **params) -> Result:
    """ONNX's ``Attention`` at opset 24 on a case."""
    return attention(q, k, v, opset=24, **params)


def onnx_attention_25(q, k, v, **params) -> Result:
    """ONNX's ``Attention`` at opset 25 (sliding windows) on a case."""
    return attention(q, k, v, opset=25, **params)


GALLERY = (
    Entry("onnx", "onnx.reference Attention, opset 24", "onnx_attention", "dense", "float32", False),
    Entry("onnx", "onnx.reference Attention, opset 24", "onnx_attention", "dense", "float64", False),
    Entry("onnx", "onnx.reference Attention, opset 25", "onnx_attention_25", "dense", "float64", False),
)

#: onnx 1.23.2 as installed: onnx/onnx.proto and onnx/reference/ops/op_attention.py.
EXPLANATIONS = {
    "SCALE_OVERRIDE": "the `scale` attribute is an ONNX float attribute, 32-bit (`optional float f = 2;` in "
    "`AttributeProto`, onnx/onnx.proto line 184), and the reference evaluator hands it over as `np.float32(att.f)` "
    "(onnx/reference/op_run.py line 110); `_compute_attention` then takes `scale = np.sqrt(scale)` in float32 "
    "(op_attention.py line 207) before scaling Q and K by it: even a scale exact in float32 (1000) reaches "
    "float64 results with float32 rounding (errors about 1e-8). The default scale (None) is computed in the "
    "input dtype and passes.",
    "LSE_DEFINITION": "this case overrides the scale (0.7): see SCALE_OVERRIDE.",
}
