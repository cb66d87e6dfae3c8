"""Soft routing over attention paths: each token mixes several attention paths by
learned routing probabilities (spec/routing.md, "Soft routing", (S1)-(S3)).

A routing matrix ``W_r`` (Dx, P) gives token ``n`` the distribution
``π[b, n] = softmax(x[b, n] · W_r)`` over ``P`` attention paths (local,
routing, dense...), and the output is ``Σ_p π[b, n, p] · O_p[b, h, n]``: the
heads of a token share its distribution. :func:`routed_attention` takes the
paths as precomputed outputs or as callables of ``(q, k, v)``;
:func:`soft_routing_attention` (registry name "soft_routing") is the same with
dense-attention paths described by parameters, so that it has conformance
vectors and a VJP all the way to ``q``, ``k``, ``v``.

Einsum letters: b batch, h head, n token, x feature of ``x``, p path, e value dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core import checks, registry
from ...core.errors import SpecError
from ...core.precision import FLOAT64, Numerics, numerics
from ...core.results import Cotangents, Grads, Result
from ...core.softmax import masked_softmax
from ...dense import reference as dense
from ...dense.inputs import DenseInputs, check_dense_inputs


def routing_probabilities(x, routing_weights, num: Numerics = FLOAT64) -> np.ndarray:
    """Steps (S1)-(S2): ``π = softmax over paths of x · W_r``, (B, N, P)."""
    x, routing_weights = _check_router(x, routing_weights)
    logits = num.store(np.einsum("bnx,xp->bnp", num.load(x), num.load(routing_weights), optimize=True))
    return masked_softmax(logits, None, num)[0]


def _check_router(x, routing_weights) -> tuple[np.ndarray, np.ndarray]:
    x = checks.float_array(x, "x")
    if x.ndim != 3:
        raise SpecError("x", "3 dimensions (B, N, Dx): the features routing reads", f"shape {x.shape}")
    routing_weights = checks.float_array(routing_weights, "routing_weights")
    if routing_weights.ndim != 2 or routing_weights.shape[0] != x.shape[2] or routing_weights.shape[1] < 1:
        raise SpecError("routing_weights", f"shape (Dx, P) = ({x.shape[2]}, P >= 1)", f"shape {routing_weights.shape}")
    return x, routing_weights


def _path_outputs(paths, q, k, v, shape: tuple[int, int]) -> list[np.ndarray]:
    """Each path's output (B, H, N, Dv): an array as given, or a callable's ``(q, k, v)`` result (its ``.out``)."""
    outputs = []
    for index, path in enumerate(paths):
        if callable(path):
            if q is None or k is None or v is None:
                raise SpecError("q, k, v", f"arrays, to call paths[{index}]", "None")
            path = path(q, k, v)
            path = getattr(path, "out", path)
        path = checks.float_array(path, f"paths[{index}]")
        first = outputs[0].shape if outputs else path.shape
        if path.ndim != 4 or (path.shape[0], path.shape[2]) != shape or path.shape != first:
            raise SpecError(f"paths[{index}]", f"an output (B, H, N, Dv) with (B, N) = {shape}, as every path",
                            f"shape {path.shape}")  # fmt: skip
        outputs.append(path)
    return outputs


def _checked(x, routing_weights, paths, q, k, v):
    x, routing_weights = _check_router(x, routing_weights)
    if len(paths) != routing_weights.shape[1]:
        raise SpecError("paths", f"{routing_weights.shape[1]} paths (columns of routing_weights)", f"{len(paths)} paths")
    return x, routing_weights, _path_outputs(paths, q, k, v, (x.shape[0], x.shape[1]))


def routed_attention(x, routing_weights, paths, *, q=None, k=None, v=None, precision=None) -> Result:
    """Soft routing: ``out[b, h, n] = Σ_p softmax(x[b, n] · W_r)[p] · O_p[b, h, n]``, steps (S1)-(S3).

    Parameters
    ----------
    x : ndarray (B, N, Dx)
        What the router reads for each token (e.g. the layer's input).
    routing_weights : ndarray (Dx, P)
        ``W_r``.
    paths : sequence of P arrays (B, H, N, Dv) or callables
        Each path's output, or a callable ``path(q, k, v)`` returning it (an
        array or a :class:`Result`).
    q, k, v : ndarray, optional
        Passed to callable paths.
    precision : optional
        As for the other references (tolerances only).

    Returns
    -------
    Result
        ``out`` (B, H, N, Dv); ``lse`` None; ``aux`` empty (the probabilities
        are :func:`routing_probabilities`).
    """
    x, routing_weights, outputs = _checked(x, routing_weights, paths, q, k, v)
    num = numerics(precision)
    return Result(out=_mix(x, routing_weights, outputs, num).astype(np.float64), lse=None, aux={})


def _mix(x, routing_weights, outputs, num: Numerics) -> np.ndarray:
    # (S1)-(S2) Per-token routing probabilities over the paths.
    probabilities = routing_probabilities(x, routing_weights, num)  # (B, N, P)
    # (S3) Mixture of the paths' outputs; the heads of a token share its probabilities.
    stacked = np.stack([num.load(o) for o in outputs])  # (P, B, H, N, Dv)
    return num.store(np.einsum("bnp,pbhne->bhne", probabilities, stacked, optimize=True))


def routed_attention_vjp(dout, x, routing_weights, paths, *, q=None, k=None, v=None, precision=None) -> Grads:
    """Gradients of :func:`routed_attention`, steps (S3')-(S1').

    Returns
    -------
    Grads
        ``x`` (B, N, Dx), ``routing_weights`` (Dx, P), and ``paths``: a list of
        each path's output cotangent ``π_p · dout`` (B, H, N, Dv), to be passed
        to that path's own VJP.
    """
    x, routing_weights, outputs = _checked(x, routing_weights, paths, q, k, v)
    dout = checks.cotangent(dout, "dout", outputs[0].shape)
    num = numerics(precision)
    d_x, d_weights, d_paths = _mix_vjp(num.load(dout), x, routing_weights, outputs, num)
    return Grads(x=d_x, routing_weights=d_weights, paths=d_paths)


def _mix_vjp(dout, x, routing_weights, outputs, num: Numerics):
    probabilities = routing_probabilities(x, routing_weights, num)  # (B, N, P)
    stacked = np.stack([num.load(o) for o in outputs])  # (P, B, H, N, Dv)
    # (S3') Each path's output cotangent, and the probabilities'.
    d_paths = num.store(np.einsum("bnp,bhne->pbhne", probabilities, dout, optimize=True))
    d_probabilities = num.store(np.einsum("bhne,pbhne->bnp", dout, stacked, optimize=True))
    # (S2') Softmax over the paths.
    row_dot = np.sum(probabilities * d_probabilities, axis=-1, keepdims=True)
    d_logits = num.store(probabilities * (d_probabilities - row_dot))  # (B, N, P)
    # (S1') logits = x · W_r.
    d_weights = num.store(np.einsum("bnx,bnp->xp", num.load(x), d_logits, optimize=True))
    d_x = num.store(np.einsum("bnp,xp->bnx", d_logits, num.load(routing_weights), optimize=True))
    return d_x.astype(np.float64), d_weights.astype(np.float64), [d.astype(np.float64) for d in d_paths]


def soft_routing_attention(q, k, v, *, x, routing_weights, path_causal, path_window, scale=None, precision=None,
                           backend="reference") -> Result:  # fmt: skip
    """Soft routing over dense-attention paths (registry name "soft_routing").

    Path ``p`` is dense attention (refattn/dense) with ``causal=path_causal[p]``,
    ``window=path_window[p]`` and ``scale``: a dense path ``(False, None)``, a
    causal one ``(True, None)``, a local one ``(True, [w, 0])``... Then
    :func:`routed_attention`.

    Parameters
    ----------
    q, k, v : ndarray
        As for :func:`refattn.dense_attention`.
    x : ndarray (B, Nq, Dx)
    routing_weights : ndarray (Dx, P)
    path_causal : list of P bools
    path_window : list of P windows ((left, right) or None)
    scale : float > 0, optional
        The paths' logit scale (default 1/sqrt(D)).

    Returns
    -------
    Result
        ``out`` (B, Hq, Nq, Dv). ``lse`` None: a mixture of softmax outputs is
        not a softmax over one key set, so it has no log-sum-exp (each path's
        is dense attention's). ``aux`` empty.
    """
    return registry.call_forward("soft_routing", locals())


soft_routing_attention_vjp = registry.vjp_function(
    soft_routing_attention, "soft_routing", grads="""    ``q``, ``k``, ``v`` (summed over the paths), ``x`` and ``routing_weights``.
    ``dlse`` must be None: the mixture has no log-sum-exp.""",
)


@dataclass(frozen=True)
class SoftRoutingInputs:
    """Checked router features and weights, and each path's checked dense-attention inputs."""

    x: np.ndarray  # (B, Nq, Dx)
    routing_weights: np.ndarray  # (Dx, P)
    paths: tuple[DenseInputs, ...]  # P of them

    def cotangent_shapes(self) -> dict:
        """``dout`` has the shape of ``out`` (every path's); the mixture has no ``lse``."""
        return {"dout": self.paths[0].cotangent_shapes()["dout"], "dlse": None}


def check_soft_routing_inputs(q, k, v, *, x, routing_weights, path_causal, path_window, scale) -> SoftRoutingInputs:
    """Check every argument of :func:`soft_routing_attention`; raise :class:`SpecError` on the first bad one."""
    options = _dense_paths(path_causal, path_window)
    x, routing_weights = _check_router(x, routing_weights)
    if len(options) != routing_weights.shape[1]:
        raise SpecError("path_causal, path_window", f"{routing_weights.shape[1]} paths (columns of routing_weights)",
                        f"{len(options)} paths")  # fmt: skip
    paths = tuple(
        check_dense_inputs(q, k, v, mask=None, bias=None, causal=c, causal_alignment="bottom_right", window=w,
                           scale=scale, softcap=0.0, dropout_keep=None, dropout_p=0.0)
        for c, w in options
    )  # fmt: skip
    s = paths[0].shape
    if x.shape[:2] != (s.batch, s.q_len):
        raise SpecError("x", f"shape (B, Nq, Dx) with (B, Nq) = ({s.batch}, {s.q_len}), as q", f"shape {x.shape}")
    return SoftRoutingInputs(x, routing_weights, paths)


def _dense_paths(path_causal, path_window):
    """The dense-attention options of each path: [(causal, window), ...]."""
    if not isinstance(path_causal, (list, tuple)) or not isinstance(path_window, (list, tuple)) or len(path_causal) != len(path_window):
        raise SpecError("path_causal, path_window", "two lists of the same length, one entry per path",
                        f"{path_causal!r} and {path_window!r}")  # fmt: skip
    return [(checks.flag(c, f"path_causal[{i}]"), checks.window(w)) for i, (c, w) in enumerate(zip(path_causal, path_window))]


def forward(x: SoftRoutingInputs, num: Numerics) -> Result:
    """The reference backend: the dense paths, then steps (S1)-(S3) in precision ``num``."""
    outputs = [dense.forward(path, num).out for path in x.paths]  # P of (B, Hq, Nq, Dv)
    return Result(out=_mix(x.x, x.routing_weights, outputs, num), lse=None, aux={})


def vjp(x: SoftRoutingInputs, cotangents: Cotangents, num: Numerics) -> Grads:
    """The reference backend's VJP: steps (S3')-(S1'), then each path's dense VJP, summed."""
    outputs = [dense.forward(path, num).out for path in x.paths]
    d_x, d_weights, d_paths = _mix_vjp(num.load(cotangents.dout), x.x, x.routing_weights, outputs, num)
    grads = Grads(x=d_x, routing_weights=d_weights)
    for path, d_path in zip(x.paths, d_paths):
        path_grads = dense.vjp(path, Cotangents(dout=d_path, dlse=None), num)
        for name in ("q", "k", "v"):
            grads[name] = grads.get(name, 0.0) + path_grads[name]
    return grads
