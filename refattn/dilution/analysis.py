"""The seed's dilution argument, executable: closed forms, exact expectations, measurement.

The seed argues that as the number of keys ``n`` grows each token competes
with more tokens, so attention is diluted, and noise keys take mass from the
relevant ones. Two models make that precise (spec/dilution.md,
equations (A1)-(A12), numbered below as there):

(a) *Equal keys* (A1). ``n`` equal logits give every weight exactly ``1/n``
    and entropy exactly ``log n``: :func:`equal_keys`.

(b) *One relevant key among noise* (A2). The relevant key has logit ``Δ``
    (the margin); the ``N = n − 1`` noise keys have logits ``σ g_j`` with
    ``g_j`` i.i.d. N(0, 1). With ``a = e^Δ`` and ``S = Σ_j e^{σ g_j}``, the
    relevant key's mass is ``a / (a + S)``. Its expectation has no elementary
    closed form. This module gives

    * the mean-field value ``m0 = a / (a + E S)``, ``E S = N e^{σ²/2}`` (A3);
    * the second-order (delta-method) value ``m2 = m0 + m0 (1 − m0)² κ``,
      ``κ = (e^{σ²} − 1) / N`` the squared coefficient of variation of ``S`` (A4);
    * a rigorous bound on ``|E[a / (a + S)] − m2|`` (A5);
    * the exact expectation, by quadrature of a Laplace-transform integral,
      to ~1e-12 (A6);
    * the same three for the entropy of the row (A7), (A8);
    * the countermeasures at the logit level (A9), (A10): SSMax multiplies
      logits by ``s log n``, log-n scaling by ``log n``: both are model (b)
      with ``Δ, σ`` scaled. Differential attention subtracts ``λ`` times a
      second, independent map;
    * Monte-Carlo measurement through refattn itself: sampled logits go
      through :func:`refattn.dilution.diagnostics.logit_diagnostics`
      (refattn's masked softmax and entropy), giving means and standard
      errors (A11).

:func:`dilution_table` puts theory and measurement side by side for the
``refattn dilution`` command, and :func:`plot_dilution` draws them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from ..core import checks
from ..core.errors import SpecError
from ..core.softmax import masked_softmax
from .diagnostics import logit_diagnostics

MECHANISMS = ("softmax", "ssmax", "logn", "differential")
TITLES = {
    "softmax": "standard softmax",
    "ssmax": "SSMax",
    "logn": "log-n scaling",
    "differential": "differential attention",
}
#: The closed forms are shown where their expansion parameter κ = (e^{σ'²} − 1)/(n − 1)
#: is at most CLOSED_FORM_MAX_KAPPA and the bound (A5) certifies the mass to
#: CLOSED_FORM_MAX_RELATIVE_BOUND (spec, A5).
CLOSED_FORM_MAX_KAPPA = 1.0
CLOSED_FORM_MAX_RELATIVE_BOUND = 0.1
#: The theory (A3)-(A8) is evaluated for noise scales and margins up to these
#: (the quadrature's grids are set up for σ <= 20; e^Δ must be a float64).
MAX_SIGMA = 20.0
MAX_ABS_MARGIN = 700.0
#: Monte-Carlo batches hold at most this many logits (a few MB).
_BATCH_ELEMENTS = 1 << 20
# Quadrature grids (A6): steps in x = g and in w = log t, Gaussian tail cut at |x| = 13.
_X_STEP = 0.02
_X_TAIL = 13.0
_W_STEP = 0.05
_W_DECADES = 36.0  # the w-grid starts this far below -log(a + E S)


# --------------------------------------------------------------------------
# (a) Equal keys.
# --------------------------------------------------------------------------


def equal_keys(n: int, value: float = 0.0) -> tuple[np.ndarray, float]:
    """(A1) ``n`` keys with equal logits ``value``: their weights and the row's entropy.

    Returns
    -------
    weights : float64 ndarray (n,)
        Each is ``1/n`` correctly rounded: ``exp(0) = 1`` for every key and the
        sum ``n`` are exact, so the softmax divides 1 by ``n`` once. For ``n`` a
        power of two that is exactly ``1/n``.
    entropy : float
        ``log n``; for ``value = 0`` exactly ``np.log(n)``, since (D4) reduces
        to the log of the exact sum ``n``.
    """
    n = _int_at_least(n, "n", 1)
    value = checks.real_number(value, "value", minimum=-np.inf)
    logits = np.full((1, n), value)  # (1, n)
    weights, _ = masked_softmax(logits, None)
    return weights[0], float(logit_diagnostics(logits, top_k=1).entropy[0])


# --------------------------------------------------------------------------
# (b) One relevant key among noise: closed forms.
# --------------------------------------------------------------------------


def mean_field_mass(n: int, margin: float, sigma: float) -> float:
    """(A3) ``m0 = e^Δ / (e^Δ + (n − 1) e^{σ²/2})``, the law-of-large-numbers value."""
    n, margin, sigma = _model(n, margin, sigma)
    return float(expit(margin - _log_mean_noise(n, sigma)))


def second_order_mass(n: int, margin: float, sigma: float) -> float:
    """(A4) ``m2 = m0 + m0 (1 − m0)² κ`` with ``κ = (e^{σ²} − 1) / (n − 1)``.

    The delta method: ``E f(S) ≈ f(E S) + ½ f''(E S) Var S`` for
    ``f(S) = e^Δ / (e^Δ + S)``; its error is at most :func:`second_order_mass_bound`.
    """
    n, margin, sigma = _model(n, margin, sigma)
    m0, rest = _split(n, margin, sigma)
    return float(m0 + m0 * rest**2 * _kappa(n, sigma))


def second_order_mass_bound(n: int, margin: float, sigma: float) -> float:
    """(A5) A bound on ``|E[e^Δ / (e^Δ + S)] − m2|``, the terms (A4) neglects.

    With ``X = (S − E S) / (e^Δ + E S)`` the exact remainder is
    ``−m0 E[X³ / (1 + X)]``. Its part from ``X >= 0`` is <= 0 and at least
    ``−m0 (1 − m0)² min((1 − m0) √(E Ȳ² E Ȳ⁴), E Ȳ²)`` (``Ȳ = (S − E S) / E S``,
    whose moments are exact); its part from ``X < 0`` is >= 0 and at most
    ``(1 − m0)³ (2 m0 E[(Ȳ⁻)³] + min(p, √p ‖f(S)‖₂))`` with ``p = P(X <= −½)``,
    both from Bernstein's inequality for the lower tail (``Ȳ >= −1``). The
    bound is the larger side; +inf where the moments overflow (σ > ~10.9).
    Derivation in the spec.
    """
    n, margin, sigma = _model(n, margin, sigma)
    noise = n - 1
    m0, rest = _split(n, margin, sigma)
    try:
        return _bound(noise, margin, sigma, m0, rest)
    except OverflowError:  # σ > ~10.9: the lognormal's moments exceed float64, and so does the bound
        return math.inf


def _bound(noise: int, margin: float, sigma: float, m0: float, rest: float) -> float:
    """The two sides of (A5); ``rest = 1 − m0``."""
    mu2, mu4 = _central_moments(sigma)
    y2 = mu2 / noise  # E Ȳ²
    y4 = (mu4 + 3 * (noise - 1) * mu2**2) / noise**3  # E Ȳ⁴
    upper_side = m0 * rest**2 * min(rest * math.sqrt(y2 * y4), y2)
    # E[(Ȳ⁻)³] from the tail P(Ȳ <= −t) <= exp(−N t²/(4 μ2)) + exp(−3 N t / 4),
    # directly or as √(E[(Ȳ⁻)²] E[(Ȳ⁻)⁴]).
    lower_cube = min(
        6 * math.sqrt(math.pi) * y2**1.5 + (128 / 9) / noise**3,
        math.sqrt(y2 * (32 * y2**2 + (2048 / 27) / noise**4)),
    )
    # E[f(S); X <= −½] <= √P(X <= −½) ‖f(S)‖₂ with ‖f(S)‖₂ <= min(1, e^Δ E[S⁻²]^½), and
    # E[S⁻²] <= e^{2σ²/N} / N² because S >= N e^{σ ḡ} (AM-GM; ḡ ~ N(0, 1/N)).
    t = 0.5 / rest if rest > 0 else math.inf  # X <= −½  <=>  Ȳ <= −t, impossible when t >= 1
    tail = 0.0 if t >= 1 else math.exp(-noise * t**2 / (2 * (mu2 + t / 3)))
    norm = math.exp(min(0.0, margin + sigma**2 / noise - math.log(noise)))
    lower_side = rest**3 * (2 * m0 * lower_cube + min(tail, math.sqrt(tail) * norm))
    return float(max(upper_side, lower_side))


def mean_field_entropy(n: int, margin: float, sigma: float) -> float:
    """(A7) ``H0 = log(e^Δ + E S) − m0 Δ − (1 − m0) σ²`` (nats)."""
    n, margin, sigma = _model(n, margin, sigma)
    m0, rest = _split(n, margin, sigma)
    return float(np.logaddexp(margin, _log_mean_noise(n, sigma)) - m0 * margin - rest * sigma**2)


def second_order_entropy(n: int, margin: float, sigma: float) -> float:
    """(A7) ``H2 = H0 + (1 − m0)²/N · [σ² (1 + 2d) − d (½ + m0 Δ + (1 − m0) σ²)]``, ``d = e^{σ²}−1``.

    The delta method on ``H(S, T) = log(a + S) − (a Δ + T)/(a + S)`` with
    ``T = Σ_j σ g_j e^{σ g_j}`` (no bound is derived for it).
    """
    n, margin, sigma = _model(n, margin, sigma)
    m0, rest = _split(n, margin, sigma)
    d = math.expm1(sigma**2)
    energy = m0 * margin + rest * sigma**2
    return float(
        mean_field_entropy(n, margin, sigma) + rest**2 / (n - 1) * (sigma**2 * (1 + 2 * d) - d * (0.5 + energy))
    )


def exact_expectations(n: int, margin: float, sigma: float) -> tuple[float, float]:
    """(A6), (A8) ``E[mass]`` and ``E[H]`` of model (b), by quadrature, to ~1e-12.

    With ``φ(t) = E exp(−t e^{σ g})`` (the lognormal's Laplace transform) and
    ``χ(t) = E[σ g e^{σ g} exp(−t e^{σ g})]``::

        E[a/(a + S)]     = ∫₀^∞ a e^{−a t} φ(t)^N dt
        E[log(a + S)]    = ∫₀^∞ (e^{−t} − e^{−a t} φ(t)^N) dt / t
        E[T/(a + S)]     = ∫₀^∞ e^{−a t} N χ(t) φ(t)^{N−1} dt
        E[H]             = E[log(a + S)] − Δ E[a/(a + S)] − E[T/(a + S)]

    ``φ`` and ``χ`` are trapezoid sums over ``g`` (step 0.02, |g| <= 13 and up
    to σ + 13), the outer integrals trapezoid sums over ``w = log t``
    (step 0.05): both integrands are analytic and decay fast, where the
    trapezoid rule converges geometrically.
    """
    n, margin, sigma = _model(n, margin, sigma)
    noise, a = n - 1, math.exp(margin)
    x = np.arange(-_X_TAIL, sigma + _X_TAIL, _X_STEP)  # (X,) nodes in g
    gauss = _X_STEP * np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)  # (X,) trapezoid weights
    log_scale = float(np.logaddexp(margin, _log_mean_noise(n, sigma)))  # log(a + E S)
    w = np.arange(min(-log_scale, 0.0) - _W_DECADES, max(-margin, 0.0) + math.log(45.0), _W_STEP)  # (W,)
    t = np.exp(w)
    psi, t_chi = _lognormal_transforms(w, x, gauss, sigma)  # (W,) 1 − φ(t), t χ(t)
    with np.errstate(divide="ignore"):
        log_phi = np.log1p(-np.minimum(psi, 1.0))  # (W,) -inf where φ = 0 (ψ may round above 1)
    log_kernel = -a * t + noise * log_phi  # log(e^{−a t} φ^N)
    mass = np.sum(np.exp(margin + w + log_kernel)) * _W_STEP
    # e^{−t} − e^{−a t} φ^N; where both are near 1 (t < 1), as e^{−t} (1 − e^{log kernel + t}).
    log_integrand = np.exp(-t) - np.exp(log_kernel)
    small = t < 1
    log_integrand[small] = np.exp(-t[small]) * -np.expm1(log_kernel[small] + t[small])
    log_mean = np.sum(log_integrand) * _W_STEP
    log_rest = -a * t + ((noise - 1) * log_phi if noise > 1 else 0.0)  # log(e^{−a t} φ^{N−1})
    cross_mean = np.sum(noise * t_chi * np.exp(log_rest)) * _W_STEP
    return float(mass), float(log_mean - margin * mass - cross_mean)


def _lognormal_transforms(
    w: np.ndarray, x: np.ndarray, gauss: np.ndarray, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """``1 − φ(t)`` and ``t χ(t)`` at ``t = e^w`` (W,), as sums over the nodes ``x`` (X,) with weights ``gauss``.

    Evaluated in blocks of ``w`` (a (256, X) array at a time), in terms of
    ``y = log(t e^{σ g})`` so that nothing overflows.
    """
    psi, t_chi = np.empty(w.shape), np.empty(w.shape)
    for start in range(0, w.size, 256):
        block = slice(start, start + 256)
        y = w[block, None] + sigma * x[None, :]  # (256, X)
        with np.errstate(over="ignore"):
            tz = np.exp(y)  # t e^{σ g}; inf gives exp(-inf) = 0 below
        psi[block] = -np.expm1(-tz) @ gauss
        t_chi[block] = (sigma * x * np.exp(y - tz)) @ gauss
    return psi, t_chi


# --------------------------------------------------------------------------
# The countermeasures at the logit level.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """Model (b) and the countermeasures' parameters.

    Attributes
    ----------
    margin : float
        ``Δ``, the relevant key's logit (noise logits have mean 0).
    sigma : float >= 0
        ``σ``, the noise logits' standard deviation.
    ssmax_s : float > 0
        SSMax's ``s`` (logits times ``s log n``, ``b = 0``). Default ``1/Δ``:
        the critical value at which, without noise, the relevant key's mass
        ``n^{sΔ} / (n^{sΔ} + n − 1)`` stays constant (→ ½) at every ``n``;
        larger ``s`` sends it to 1, smaller to 0 (Nakanishi 2025, sec. 2).
    lam : float in [0, 1)
        Differential attention's ``λ``. Default 0.8, the deep-layer value of
        ``λ_init = 0.8 − 0.6 exp(−0.3 depth)`` (Ye et al. 2024).
    """

    margin: float = 4.0
    sigma: float = 1.0
    ssmax_s: float | None = None
    lam: float = 0.8

    def __post_init__(self):
        margin = checks.real_number(self.margin, "margin", minimum=-np.inf)
        sigma = checks.real_number(self.sigma, "sigma", minimum=0.0)
        if self.ssmax_s is None and margin <= 0:
            raise SpecError("ssmax_s", "a value > 0 (the default 1/margin needs margin > 0)", "None")
        s = (
            1.0 / margin
            if self.ssmax_s is None
            else checks.real_number(self.ssmax_s, "ssmax_s", minimum=0.0, inclusive=False)
        )
        lam = checks.real_number(self.lam, "lam", minimum=0.0, maximum=1.0)
        for name, value in (("margin", margin), ("sigma", sigma), ("ssmax_s", s), ("lam", lam)):
            object.__setattr__(self, name, value)


def logit_factor(mechanism: str, n: int, setting: Setting) -> float:
    """(A9) What the mechanism multiplies every logit of a row with ``n`` attended keys by.

    ``"softmax"`` and ``"differential"`` 1, ``"ssmax"`` ``s log n`` (``b = 0``),
    ``"logn"`` ``log n`` (Chiang & Cholak 2022: n the number of keys attended).
    """
    checks.choice(mechanism, "mechanism", MECHANISMS)
    return {"ssmax": setting.ssmax_s * math.log(n), "logn": math.log(n)}.get(mechanism, 1.0)


@dataclass(frozen=True)
class Prediction:
    """Theory for one mechanism at one ``n``.

    Attributes
    ----------
    mass : float
        Second-order closed form (A4) of the expected relevant mass
        (differential: ``m2(Δ) − λ m2(0)``, (A10)).
    mass_bound : float
        Bound (A5) on the closed form's error.
    mass_exact : float
        The expectation by quadrature (A6).
    entropy, entropy_exact : float or None
        (A7), (A8) in nats; None for differential attention (a signed map
        has no entropy).
    kappa : float
        ``(e^{σ'²} − 1)/(n − 1)``, the squared coefficient of variation of
        ``S``: the expansion parameter of (A4), (A7).
    """

    mass: float
    mass_bound: float
    mass_exact: float
    entropy: float | None
    entropy_exact: float | None
    kappa: float

    @property
    def closed_form_applies(self) -> bool:
        """Whether the expansion parameter is small and the bound certifies the mass.

        ``kappa <= CLOSED_FORM_MAX_KAPPA`` and ``mass_bound <=
        CLOSED_FORM_MAX_RELATIVE_BOUND * |mass|``. The entropy's expansion
        (A7) has no bound of its own; it is shown under the same condition.
        """
        small = self.kappa <= CLOSED_FORM_MAX_KAPPA
        return small and self.mass_bound <= CLOSED_FORM_MAX_RELATIVE_BOUND * abs(self.mass)


def predict(mechanism: str, n: int, setting: Setting) -> Prediction | None:
    """(A9), (A10) Theory for ``mechanism`` with ``n`` keys under ``setting``.

    SSMax and log-n scaling are model (b) with margin ``c Δ`` and noise
    ``c σ``, ``c`` the :func:`logit_factor`. Differential attention subtracts
    ``λ`` times a second map whose noise is independent and whose relevant
    key has margin 0 (it carries no information about it): by linearity its
    expected relevant mass is exactly ``E[mass(Δ, σ)] − λ E[mass(0, σ)]``,
    whatever the correlation of the two maps' noise.

    Returns None where the scaled margin or noise lies beyond
    :data:`MAX_ABS_MARGIN` or :data:`MAX_SIGMA` (log-n scaling of σ > 1.80
    at n = 65536, for instance).
    """
    n = _int_at_least(n, "n", 2)
    if mechanism == "differential":
        first, second = _predict_map(n, setting.margin, setting.sigma), _predict_map(n, 0.0, setting.sigma)
        if first is None:
            return None
        return Prediction(
            mass=first.mass - setting.lam * second.mass,
            mass_bound=first.mass_bound + setting.lam * second.mass_bound,
            mass_exact=first.mass_exact - setting.lam * second.mass_exact,
            entropy=None,
            entropy_exact=None,
            kappa=first.kappa,
        )
    factor = logit_factor(mechanism, n, setting)
    return _predict_map(n, factor * setting.margin, factor * setting.sigma)


def _predict_map(n: int, margin: float, sigma: float) -> Prediction | None:
    if sigma > MAX_SIGMA or abs(margin) > MAX_ABS_MARGIN:
        return None
    exact = exact_expectations(n, margin, sigma)
    return Prediction(
        mass=second_order_mass(n, margin, sigma),
        mass_bound=second_order_mass_bound(n, margin, sigma),
        mass_exact=exact[0],
        entropy=second_order_entropy(n, margin, sigma),
        entropy_exact=exact[1],
        kappa=_kappa(n, sigma),
    )


# --------------------------------------------------------------------------
# Measurement.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """Monte-Carlo means over ``samples`` independent rows, with their standard errors (A11).

    ``entropy`` and ``entropy_se`` are None for differential attention.
    """

    mass: float
    mass_se: float
    entropy: float | None
    entropy_se: float | None
    samples: int


def measure(n: int, setting: Setting, *, samples: int, seed: int) -> dict[str, Measurement]:
    """(A11) Measure every mechanism on ``samples`` sampled rows of ``n`` keys.

    Row ``r`` has logits ``(Δ, σ g_r1, …, σ g_rN)``, key 0 relevant; each
    mechanism's logits are that row times its :func:`logit_factor`, and
    :func:`~refattn.dilution.diagnostics.logit_diagnostics` (refattn's masked
    softmax and entropy) gives the relevant mass and entropy of each row.
    Differential attention also samples a second map ``(0, σ g'_r1, …)``
    with independent noise and takes ``mass_1 − λ mass_2`` per row. All
    mechanisms see the same noise (common random numbers), drawn from
    ``numpy.random.default_rng([seed, n, map])``.

    Returns
    -------
    dict
        ``{mechanism: Measurement}`` for :data:`MECHANISMS`.
    """
    n = _int_at_least(n, "n", 2)
    samples = _int_at_least(samples, "samples", 2)
    seed = _int_at_least(seed, "seed", 0)
    first_noise, second_noise = (np.random.default_rng([seed, n, map_index]) for map_index in (1, 2))
    relevant = np.zeros((1, n), dtype=bool)
    relevant[0, 0] = True  # (1, n): key 0
    rows = max(1, _BATCH_ELEMENTS // n)
    masses = {name: [] for name in MECHANISMS}
    entropies = {name: [] for name in MECHANISMS if name != "differential"}
    for start in range(0, samples, rows):
        count = min(rows, samples - start)
        first = _noisy_row(setting.margin, setting.sigma, first_noise.standard_normal((count, n - 1)))  # (count, n)
        second = _noisy_row(0.0, setting.sigma, second_noise.standard_normal((count, n - 1)))
        for name in entropies:
            found = logit_diagnostics(logit_factor(name, n, setting) * first, top_k=1, relevant=relevant)
            masses[name].append(found.relevant_mass)
            entropies[name].append(found.entropy)
        second_mass = logit_diagnostics(second, top_k=1, relevant=relevant).relevant_mass
        masses["differential"].append(masses["softmax"][-1] - setting.lam * second_mass)
    return {
        name: Measurement(
            *_mean_and_se(np.concatenate(masses[name])),
            *(_mean_and_se(np.concatenate(entropies[name])) if name in entropies else (None, None)),
            samples=samples,
        )
        for name in MECHANISMS
    }


def _noisy_row(margin: float, sigma: float, noise: np.ndarray) -> np.ndarray:
    """(A2) Logits (rows, n): key 0 has ``margin``, the others ``sigma * noise``."""
    logits = np.empty((noise.shape[0], noise.shape[1] + 1))
    logits[:, 0] = margin
    logits[:, 1:] = sigma * noise
    return logits


def _mean_and_se(values: np.ndarray) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(values.size))


def agreement_tolerance(prediction: Prediction, measurement: Measurement) -> float:
    """(A12) The statistical test's tolerance on ``|closed form − measured mean|``.

    ``4 × SE + bound``: the closed form's error is at most the bound (A5), and
    the sample mean is within 4 standard errors of the expectation except
    with probability ~6e-5 (normal approximation; the masses are bounded, so
    the CLT applies).
    """
    return 4.0 * measurement.mass_se + prediction.mass_bound


# --------------------------------------------------------------------------
# The table and the plot.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    mechanism: str
    n: int
    theory: Prediction | None  # None beyond MAX_SIGMA / MAX_ABS_MARGIN
    measured: Measurement


def dilution_table(lengths, setting: Setting, *, samples: int, seed: int) -> list[TableRow]:
    """Theory and measurement for every mechanism and every ``n`` in ``lengths``, mechanism-major."""
    lengths = [_int_at_least(n, "lengths", 2) for n in lengths]
    if not lengths:
        raise SpecError("lengths", "at least one length >= 2", "none")
    measured = {n: measure(n, setting, samples=samples, seed=seed) for n in lengths}
    return [TableRow(name, n, predict(name, n, setting), measured[n][name]) for name in MECHANISMS for n in lengths]


def format_table(rows: list[TableRow], setting: Setting, *, samples: int, seed: int) -> str:
    """The table ``refattn dilution`` prints: one block per mechanism, one line per ``n``."""
    lines = [
        f"One relevant key with logit margin Δ = {setting.margin:g} among n − 1 noise keys "
        "with logits ~ N(0, σ²), "
        f"σ = {setting.sigma:g}.",
        "mass: expected weight on the relevant key; entropy H in nats. closed: second-order closed form "
        f"(± its error bound), '—' where κ = (e^σ'² − 1)/(n − 1) > {CLOSED_FORM_MAX_KAPPA:g} "
        f"or the bound exceeds {CLOSED_FORM_MAX_RELATIVE_BOUND:.0%} of it;",
        "exact: quadrature of the expectation; "
        f"measured: mean ± standard error over {samples} sampled rows (seed {seed}).",
    ]
    header = (
        f"{'n':>7}  {'mass closed':>22}  {'mass exact':>10}  {'mass measured':>21}"
        f"  {'H closed':>8}  {'H exact':>8}  {'H measured':>17}"
    )
    for name in MECHANISMS:
        lines += ["", f"{TITLES[name]}: {_describe(name, setting)}", header]
        for row in (r for r in rows if r.mechanism == name):
            th, me = row.theory, row.measured
            shown = th is not None and th.closed_form_applies
            closed = f"{th.mass:.4g} ± {th.mass_bound:.1e}" if shown else "—"
            h_closed = _maybe(th.entropy if shown else None, ".4f")
            mass_exact, h_exact = (None, None) if th is None else (th.mass_exact, th.entropy_exact)
            h_measured = f"{me.entropy:.4f} ± {me.entropy_se:.4f}" if me.entropy is not None else "n/a"
            lines.append(
                f"{row.n:>7}  {closed:>22}  {_maybe(mass_exact, '.4g'):>10}  {me.mass:>10.4g} ± {me.mass_se:.1e}"
                f"  {h_closed:>8}  {_maybe(h_exact, '.4f'):>8}  {h_measured:>17}"
            )
    return "\n".join(lines)


def _describe(mechanism: str, setting: Setting) -> str:
    return {
        "softmax": "logits as they are",
        "ssmax": (
            f"logits × s·log n, s = {setting.ssmax_s:.4g} "
            "(= 1/Δ unless given: the noiseless mass then stays ≈ ½), b = 0"
        ),
        "logn": "logits × log n (SSMax with s = 1)",
        "differential": (
            f"A1 − λ·A2, λ = {setting.lam:g}; A2 has independent noise and margin 0; "
            f"mass = E[A1] − λ·E[A2] on the relevant key; a signed map has no entropy"
        ),
    }[mechanism]


def _maybe(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def plot_dilution(rows: list[TableRow], setting: Setting, path, *, samples: int) -> None:
    """Two panels, relevant mass and entropy against ``n`` (log axes), saved to ``path``.

    Lines are theory on a fine grid of ``n`` (solid: the exact expectation;
    dashed: the second-order closed form where it applies), markers the
    measurements of ``rows`` with ±2 SE error bars.

    Raises
    ------
    ModuleNotFoundError
        If matplotlib (the ``plot`` extra) is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    colors = {"softmax": "#0072B2", "ssmax": "#D55E00", "logn": "#009E73", "differential": "#CC79A7"}
    markers = {"softmax": "o", "ssmax": "s", "logn": "^", "differential": "D"}
    lengths = sorted({r.n for r in rows})
    fine = np.unique(np.round(np.geomspace(lengths[0], lengths[-1], 48)).astype(int))  # (F,)
    fig, (ax_mass, ax_entropy) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    for name in MECHANISMS:
        theory = [predict(name, int(n), setting) for n in fine]
        measured = [r for r in rows if r.mechanism == name]
        quantities = (("mass", ax_mass),) if name == "differential" else (("mass", ax_mass), ("entropy", ax_entropy))
        for quantity, ax in quantities:
            _plot_theory(ax, fine, theory, quantity, colors[name])
            _plot_measured(ax, measured, quantity, colors[name], markers[name])
    ax_entropy.plot(fine, np.log(fine), color="0.55", linestyle=":", linewidth=1.2)

    ax_mass.set_yscale("log")
    ax_mass.set_ylabel("expected attention weight on the relevant key")
    ax_mass.set_title("(a) mass on the relevant key", loc="left", fontsize=10)
    ax_entropy.set_ylabel("attention entropy H (nats)")
    ax_entropy.set_title("(b) entropy of the attention row", loc="left", fontsize=10)
    for ax in (ax_mass, ax_entropy):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of keys n")
        ax.grid(True, which="major", color="0.9", linewidth=0.8)
    mechanism_handles = [
        Line2D([], [], color=colors[name], marker=markers[name], label=_legend_name(name, setting))
        for name in MECHANISMS
    ]
    style_handles = [
        Line2D([], [], color="0.3", label="exact expectation"),
        Line2D([], [], color="0.3", linestyle="--", label="second-order closed form"),
        Line2D([], [], color="0.3", marker="o", linestyle="none", label=f"measured, ±2 SE ({samples} rows)"),
        Line2D([], [], color="0.55", linestyle=":", label="log n (uniform row)"),
        Line2D([], [], linestyle="none", label="(differential: a signed map, no entropy)"),
    ]
    ax_mass.legend(handles=mechanism_handles, loc="lower left", fontsize=8, framealpha=0.9)
    ax_entropy.legend(handles=style_handles, loc="upper left", fontsize=8, framealpha=0.9)
    fig.suptitle(
        f"One relevant key with logit margin Δ = {setting.margin:g} among n − 1 noise keys "
        f"with logits ~ N(0, σ²), σ = {setting.sigma:g}",
        fontsize=11,
    )
    fig.savefig(path, dpi=200)
    plt.close(fig)


def _plot_theory(ax, n: np.ndarray, theory: list[Prediction | None], quantity: str, color: str) -> None:
    """The exact expectation (solid) and the closed form where it applies (dashed)."""
    exact = np.array([np.nan if p is None else getattr(p, f"{quantity}_exact") for p in theory])
    closed = np.array([getattr(p, quantity) if p is not None and p.closed_form_applies else np.nan for p in theory])
    ax.plot(n, exact, color=color, linewidth=1.6)
    ax.plot(n, closed, color=color, linewidth=1.3, linestyle=(0, (4, 3)))


def _plot_measured(ax, rows: list[TableRow], quantity: str, color: str, marker: str) -> None:
    """Means with ±2 standard errors."""
    n = [r.n for r in rows]
    mean = [getattr(r.measured, quantity) for r in rows]
    error = [2 * getattr(r.measured, f"{quantity}_se") for r in rows]
    ax.errorbar(n, mean, yerr=error, color=color, marker=marker, markersize=4.5, linestyle="none", capsize=2.5)


def _legend_name(name: str, setting: Setting) -> str:
    return {
        "softmax": "standard softmax",
        "ssmax": f"SSMax, s = {setting.ssmax_s:.3g}",
        "logn": "log-n scaling (SSMax, s = 1)",
        "differential": f"differential A1 − λA2, λ = {setting.lam:g}",
    }[name]


# --------------------------------------------------------------------------
# Small pieces.
# --------------------------------------------------------------------------


def _model(n, margin, sigma) -> tuple[int, float, float]:
    """Check model (b)'s parameters: ``n >= 2`` keys, ``|margin| <= MAX_ABS_MARGIN``, ``0 <= sigma <= MAX_SIGMA``."""
    n = _int_at_least(n, "n", 2)
    margin = checks.real_number(margin, "margin", minimum=-np.inf)
    sigma = checks.real_number(sigma, "sigma", minimum=0.0)
    if abs(margin) > MAX_ABS_MARGIN:
        raise SpecError("margin", f"a margin of magnitude <= {MAX_ABS_MARGIN:g} (e^margin is a float64)", checks.summary(margin))
    if sigma > MAX_SIGMA:
        raise SpecError("sigma", f"a noise scale <= {MAX_SIGMA:g} (the quadrature's grids)", checks.summary(sigma))
    return n, margin, sigma


def _int_at_least(x, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < minimum:
        raise SpecError(name, f"an int >= {minimum}", checks.summary(x))
    return int(x)


def _log_mean_noise(n: int, sigma: float) -> float:
    """``log E S = log(n − 1) + σ²/2``."""
    return math.log(n - 1) + 0.5 * sigma**2


def _split(n: int, margin: float, sigma: float) -> tuple[float, float]:
    """``m0`` and ``1 − m0``, each without cancellation."""
    gap = margin - _log_mean_noise(n, sigma)
    return float(expit(gap)), float(expit(-gap))


def _kappa(n: int, sigma: float) -> float:
    """``κ = Var S / (E S)² = (e^{σ²} − 1)/(n − 1)``."""
    return math.expm1(sigma**2) / (n - 1)


def _central_moments(sigma: float) -> tuple[float, float]:
    """Second and fourth central moments of ``W = e^{σ g − σ²/2}`` (mean 1).

    As polynomials in ``d = e^{σ²} − 1`` with non-negative coefficients, so
    that small σ loses nothing to cancellation: ``μ2 = d``,
    ``μ4 = d² (d⁴ + 6 d³ + 15 d² + 16 d + 3)``.
    """
    d = math.expm1(sigma**2)
    return d, d**2 * (d**4 + 6 * d**3 + 15 * d**2 + 16 * d + 3)
