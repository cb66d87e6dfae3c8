"""Sliding-window attention as each library counts its window: the executable specification.

refattn's ``window=(left, right)`` (:func:`refattn.dense.dense_attention`)
is exact: query ``i`` keeps keys ``i - left <= j <= i + right``. Libraries
state a single number ``W`` and count it differently; each convention below
maps its ``W`` onto ``(left, right)`` and causality, with the source of its
rule (spec/segmented.md, "Sliding windows as each library counts them"):

=====================  =====================  ============  =========================
convention             keeps                  (left, right) source
=====================  =====================  ============  =========================
``"hf_causal"``        ``i - W < j <= i``     (W - 1, 0)    HF masking_utils.sliding_window_overlay
``"hf_bidirectional"`` ``|i - j| <= W``       (W, W)        HF masking_utils.sliding_window_bidirectional_overlay
``"mistral"``          ``i - W <= j <= i``    (W, 0)        Jiang et al. 2023, section 2
``"longformer"``       ``|i - j| <= W / 2``   (W/2, W/2)    Beltagy et al. 2020, section 3.1; HF Longformer
=====================  =====================  ============  =========================

The attention itself is dense attention's, unchanged: the checked inputs are
dense's, and both backends are dense's.
"""

from __future__ import annotations

import numbers

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.results import Result
from ...dense.inputs import DenseInputs, check_dense_inputs
from ...dense.reference import forward, vjp  # noqa: F401 (the reference backend is dense's)

CONVENTIONS = ("hf_causal", "hf_bidirectional", "mistral", "longformer")


def sliding_window_attention(
    q, k, v, *,
    window_size, convention,
    scale=None, precision=None, backend="reference") -> Result:
    """Dense attention restricted to a sliding window of ``window_size`` counted as ``convention`` counts it.

    Parameters
    ----------
    q : ndarray (B, Hq, Nq, D)
    k : ndarray (B, Hkv, Nk, D)
    v : ndarray (B, Hkv, Nk, Dv)
        Queries align bottom-right when ``Nq != Nk`` (a KV cache).
    window_size : int
        ``W`` as the convention states it: ``>= 1`` for ``"hf_causal"``,
        ``>= 0`` otherwise, even for ``"longformer"``.
    convention : {"hf_causal", "hf_bidirectional", "mistral", "longformer"}
        How ``W`` is counted; :func:`window_of` gives ``(left, right)`` and causality.
    scale : float > 0, optional
        Default ``1 / sqrt(D)``.

    Returns
    -------
    Result
        As :func:`refattn.dense.dense_attention`: ``out`` (B, Hq, Nq, Dv), ``lse`` (B, Hq, Nq).
    """
    return registry.call_forward("sliding_window", locals())


sliding_window_attention_vjp = registry.vjp_function(
    sliding_window_attention, "sliding_window", grads="""    ``q``, ``k``, ``v``, shapes of the inputs.""",
)


def window_of(convention: str, window_size: int) -> tuple[tuple[int, int], bool]:
    """``((left, right), causal)``: refattn's exact window for a library's ``W``."""
    if convention not in CONVENTIONS:
        raise SpecError("convention", f"one of {list(CONVENTIONS)}", checks.summary(convention))
    smallest = 1 if convention == "hf_causal" else 0
    if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral) or window_size < smallest:
        raise SpecError("window_size", f"an int >= {smallest} for convention {convention!r}", checks.summary(window_size))
    w = int(window_size)
    if convention == "hf_causal":
        return (w - 1, 0), True
    if convention == "hf_bidirectional":
        return (w, w), False
    if convention == "mistral":
        return (w, 0), True
    if w % 2:
        raise SpecError("window_size", "an even attention_window for convention 'longformer' (W/2 per side)", checks.summary(w))
    return (w // 2, w // 2), False


def check_sliding_window_inputs(q, k, v, *, window_size, convention, scale) -> DenseInputs:
    """Map the convention onto dense attention's exact window and check as dense does."""
    window, causal = window_of(convention, window_size)
    return check_dense_inputs(q, k, v, mask=None, bias=None, causal=causal, causal_alignment="bottom_right",
                              window=window, scale=scale, softcap=0.0, dropout_keep=None, dropout_p=0.0)  # fmt: skip
