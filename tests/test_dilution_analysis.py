"""The seed's dilution argument, executable (refattn/dilution/analysis.py) and `refattn dilution`.

* (a) Equal keys: weights exactly 1/n (as fractions, for powers of two),
  entropy exactly log n.
* (b) One relevant key among noise: the closed forms by hand, the exact
  expectation (quadrature) against known values and against itself on finer
  grids, the derived bound against the exact values, and the second-order
  term against the mean-field value.
* The statistical test: closed form and exact expectation against Monte-Carlo
  measurement through refattn (fixed seeds). Tolerance (spec A12):
  ``4 SE + bound`` for the closed form, ``4 SE + 1e-9`` for the exact
  expectation (quadrature error ~1e-12). With the seeds fixed the test is
  deterministic; for a fresh seed a single comparison fails by chance with
  probability ~6e-5 (two-sided normal tail at 4), so ~1% for the ~150
  comparisons here.
* The countermeasures at the logit level against the mechanisms themselves
  (SSMax, log-n, differential attention) on constructed q, k, v.
* The command: its table, its plot (skipped without matplotlib), its errors.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from refattn import SpecError
from refattn.cli import main
from refattn.core.softmax import masked_softmax
from refattn.dilution import analysis
from refattn.dilution.analysis import (
    MECHANISMS,
    Setting,
    equal_keys,
    exact_expectations,
    mean_field_entropy,
    mean_field_mass,
    measure,
    predict,
    second_order_entropy,
    second_order_mass,
    second_order_mass_bound,
)

QUADRATURE_TOL = 1e-9


# --------------------------------------------------------------------------
# (a) Equal keys.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 100, 1024, 65536, 100003])
def test_equal_keys_weights_are_one_over_n_and_entropy_log_n(n):
    weights, entropy = equal_keys(n)
    assert np.all(weights == 1.0 / n)  # every weight is 1/n correctly rounded
    exact = Fraction(1, n)
    if n & (n - 1) == 0:  # a power of two: 1/n is a float, so the weights are exactly 1/n
        assert all(Fraction(float(w)) == exact for w in weights[:3])
    else:  # within half an ulp of 1/n
        assert abs(Fraction(float(weights[0])) - exact) <= Fraction(float(np.spacing(weights[0]))) / 2
    assert entropy == np.log(n)  # exactly: the row sum n is exact and (D4) takes its log


@pytest.mark.parametrize("value", [3.7, -1e3, 1e5])
def test_equal_keys_at_any_level(value):
    for n in (2, 5, 64):
        weights, entropy = equal_keys(n, value)
        assert np.all(weights == 1.0 / n)
        assert abs(entropy - math.log(n)) <= 8 * np.spacing(abs(value) + math.log(n))


# --------------------------------------------------------------------------
# (b) Closed forms.
# --------------------------------------------------------------------------


def test_closed_forms_by_hand():
    n, margin, sigma = 16, 4.0, 1.0
    a, mean_noise = math.exp(4.0), 15 * math.exp(0.5)
    m0 = a / (a + mean_noise)
    assert mean_field_mass(n, margin, sigma) == pytest.approx(m0, rel=1e-15)
    correction = 0.5 * (2 * a / (a + mean_noise) ** 3) * 15 * (math.exp(2.0) - math.exp(1.0))  # ½ f''(E S) Var S
    assert second_order_mass(n, margin, sigma) == pytest.approx(m0 + correction, rel=1e-14)
    h0 = math.log(a + mean_noise) - m0 * margin - (1 - m0) * sigma**2
    assert mean_field_entropy(n, margin, sigma) == pytest.approx(h0, rel=1e-14)


@pytest.mark.parametrize("n, margin", [(2, 0.0), (16, 4.0), (1000, -3.0), (65536, 4.0)])
def test_noiseless_model_is_exact(n, margin):
    # σ = 0: every noise logit is 0, the mass is e^Δ / (e^Δ + n − 1) and every form agrees.
    a = math.exp(margin)
    mass = a / (a + n - 1)
    entropy = math.log(a + n - 1) - mass * margin
    for value in (mean_field_mass(n, margin, 0.0), second_order_mass(n, margin, 0.0)):
        assert value == pytest.approx(mass, rel=1e-14)
    assert second_order_entropy(n, margin, 0.0) == pytest.approx(entropy, rel=1e-14)
    exact_mass, exact_entropy = exact_expectations(n, margin, 0.0)
    assert exact_mass == pytest.approx(mass, abs=1e-12)
    assert exact_entropy == pytest.approx(entropy, abs=1e-11)
    assert second_order_mass_bound(n, margin, 0.0) < 1e-8


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 8.0])
def test_exact_expectation_of_two_keys_by_symmetry(sigma):
    # n = 2, Δ = 0: the mass is 1 / (1 + e^{σ g}) and g → −g maps it to 1 − itself.
    assert exact_expectations(2, 0.0, sigma)[0] == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("n, margin, sigma", [(16, 4.0, 1.0), (4096, 2.0, 2.0), (65536, 44.36, 11.09), (3, -2.0, 0.3)])
def test_exact_expectation_is_converged(monkeypatch, n, margin, sigma):
    coarse = exact_expectations(n, margin, sigma)
    monkeypatch.setattr(analysis, "_X_STEP", analysis._X_STEP / 2)
    monkeypatch.setattr(analysis, "_W_STEP", analysis._W_STEP / 2)
    monkeypatch.setattr(analysis, "_W_DECADES", analysis._W_DECADES + 6)
    fine = exact_expectations(n, margin, sigma)
    assert coarse == pytest.approx(fine, abs=1e-12)


BOUND_GRID = [
    (n, margin, sigma)
    for n in (2, 3, 8, 16, 64, 256, 1024, 4096, 65536)
    for margin in (-4.0, 0.0, 2.0, 4.0, 8.0, 12.0)
    for sigma in (0.1, 0.5, 1.0, 1.5, 2.0, 3.0)
]


def test_bound_holds_against_the_exact_expectation():
    # 324 points; the largest ratio error / bound is 0.96 (n = 2, Δ = 12, σ = 3).
    for n, margin, sigma in BOUND_GRID:
        exact = exact_expectations(n, margin, sigma)[0]
        error = abs(exact - second_order_mass(n, margin, sigma))
        assert error <= second_order_mass_bound(n, margin, sigma) + 1e-12, (n, margin, sigma)


@pytest.mark.parametrize("n, margin, sigma", [(16, 4.0, 0.5), (256, 2.0, 0.5), (1024, 4.0, 1.0), (1024, 0.0, 1.0)])
def test_second_order_term_matters(n, margin, sigma):
    # The correction is resolved: the exact value is within the bound of m2 and outside it of m0.
    exact, exact_entropy = exact_expectations(n, margin, sigma)
    bound = second_order_mass_bound(n, margin, sigma)
    assert abs(exact - second_order_mass(n, margin, sigma)) <= bound < abs(exact - mean_field_mass(n, margin, sigma))
    # The entropy's second-order term improves on the mean-field value here too.
    assert (
        abs(exact_entropy - second_order_entropy(n, margin, sigma))
        < abs(exact_entropy - mean_field_entropy(n, margin, sigma)) / 5
    )


def test_ssmax_at_the_critical_s_keeps_the_noiseless_mass_constant():
    # s = 1/Δ, σ = 0: the relevant logit is log n, so the mass is n / (n + n − 1) → ½.
    setting = Setting(margin=4.0, sigma=0.0)
    assert setting.ssmax_s == 0.25
    for n in (16, 1024, 65536):
        assert predict("ssmax", n, setting).mass_exact == pytest.approx(n / (2 * n - 1), abs=1e-12)


def test_differential_prediction_is_linear_in_the_two_maps():
    setting = Setting(margin=3.0, sigma=1.0, lam=0.6)
    for n in (16, 4096):
        first = predict("softmax", n, setting)
        second = predict("softmax", n, Setting(margin=0.0, sigma=1.0, ssmax_s=1.0))
        both = predict("differential", n, setting)
        assert both.mass == pytest.approx(first.mass - 0.6 * second.mass, rel=1e-14)
        assert both.mass_exact == pytest.approx(first.mass_exact - 0.6 * second.mass_exact, rel=1e-12)
        assert both.mass_bound == pytest.approx(first.mass_bound + 0.6 * second.mass_bound, rel=1e-14)
        assert both.entropy is None and both.entropy_exact is None


# --------------------------------------------------------------------------
# The statistical test.
# --------------------------------------------------------------------------


#: Where the relevant key takes all but less than this, the rest of the mass comes from
#: rare noise keys whose logits reach the relevant one's; a sample of M rows may hold none
#: of them, and its standard error then understates the error of its mean (at Δ = 4,
#: σ = 0.5, log-n scaling, n = 16384: 1 − E[mass] = 2.9e-8, of which 256 rows saw about half).
#: Those expectations are checked against quadrature only (test_exact_expectation_*).
RARE_EVENT_MASS = 1e-3


def check_against_measurement(n, setting, samples, seed):
    measured = measure(n, setting, samples=samples, seed=seed)
    checked = 0
    for name in MECHANISMS:
        theory, found = predict(name, n, setting), measured[name]
        if theory is None or 1 - theory.mass_exact < RARE_EVENT_MASS:  # beyond the theory's range; rare events
            continue
        if theory.closed_form_applies:
            assert abs(theory.mass - found.mass) <= analysis.agreement_tolerance(theory, found), (name, n)
            checked += 1
        assert abs(theory.mass_exact - found.mass) <= 4 * found.mass_se + QUADRATURE_TOL, (name, n)
        if theory.entropy_exact is not None:
            assert abs(theory.entropy_exact - found.entropy) <= 4 * found.entropy_se + QUADRATURE_TOL, (name, n)
    return measured, checked


SETTINGS = {
    "default": Setting(),  # Δ = 4, σ = 1, s = 1/4, λ = 0.8
    "weak_margin": Setting(margin=2.0, sigma=0.5),
    "no_margin": Setting(margin=0.0, sigma=1.0, ssmax_s=0.5, lam=0.5),
}
SAMPLES = {16: 4000, 256: 2000, 4096: 400, 65536: 100}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_closed_form_and_exact_expectation_match_measurement(name):
    setting, closed_forms = SETTINGS[name], 0
    for n, samples in SAMPLES.items():
        measured, checked = check_against_measurement(n, setting, samples, seed=7)
        closed_forms += checked
        # The test has power: it would reject the noiseless law e^Δ / (e^Δ + n − 1).
        noiseless = math.exp(setting.margin) / (math.exp(setting.margin) + n - 1)
        found = measured["softmax"]
        assert abs(noiseless - found.mass) > 4 * found.mass_se + QUADRATURE_TOL
    assert closed_forms >= 4


@pytest.mark.slow
@pytest.mark.parametrize("margin", [-2.0, 0.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0, 1.5, 2.0])
def test_closed_form_matches_measurement_on_a_larger_grid(margin, sigma):
    setting = Setting(margin=margin, sigma=sigma, ssmax_s=0.3)
    for n in (16, 64, 256, 1024, 4096, 16384, 65536):
        check_against_measurement(n, setting, samples=max(200, 2**22 // n), seed=11)


def test_measurement_is_reproducible_and_seeded():
    setting = Setting()
    first, again = measure(64, setting, samples=50, seed=3), measure(64, setting, samples=50, seed=3)
    other = measure(64, setting, samples=50, seed=4)
    assert first == again and first["softmax"].mass != other["softmax"].mass
    assert first["differential"].entropy is None and first["softmax"].samples == 50


# --------------------------------------------------------------------------
# The logit-level countermeasures are the mechanisms.
# --------------------------------------------------------------------------


def constructed(logits: np.ndarray, heads: int = 1):
    """q, k, v with ``scale = 1`` whose scores are ``logits`` (heads, n) and whose output is the relevant mass.

    D = 1: q = 1 and k_j = z_j, so q·k_j = z_j; v is 1 on key 0 (relevant) and
    0 elsewhere, so the output is the weight of key 0.
    """
    n = logits.shape[-1]
    q = np.ones((1, heads, 1, 1))
    k = logits.reshape(1, heads, n, 1)
    v = np.zeros((1, 1, n, 1))
    v[0, 0, 0, 0] = 1.0
    return q, k, v


def sampled_logits(n, setting, seed):
    rng = np.random.default_rng(seed)
    return analysis._noisy_row(setting.margin, setting.sigma, rng.standard_normal((1, n - 1)))[0]  # (n,)


@pytest.mark.parametrize("n", [16, 300])
def test_ssmax_and_logn_scale_the_logits_as_modelled(n):
    ssmax = pytest.importorskip("refattn.dilution.ssmax")
    logn = pytest.importorskip("refattn.dilution.logn")
    setting = Setting()
    z = sampled_logits(n, setting, seed=n)
    q, k, v = constructed(z)
    for name, result in (
        ("ssmax", ssmax.ssmax_attention(q, k, v, s=setting.ssmax_s, scale=1.0)),
        ("logn", logn.logn_attention(q, k, v, scale=1.0)),
    ):
        weights, _ = masked_softmax(analysis.logit_factor(name, n, setting) * z[None, :], None)
        assert result.out[0, 0, 0, 0] == pytest.approx(weights[0, 0], rel=1e-12), name


def test_differential_attention_subtracts_the_maps_as_modelled():
    differential = pytest.importorskip("refattn.dilution.differential")
    n, setting = 40, Setting(lam=0.7)
    z1 = sampled_logits(n, setting, seed=1)
    z2 = analysis._noisy_row(0.0, setting.sigma, np.random.default_rng(2).standard_normal((1, n - 1)))[0]
    q, k, v = constructed(np.stack([z1, z2]), heads=2)  # query heads 0 and 1: the two maps of output head 0
    v = np.concatenate([v, np.zeros_like(v)], axis=-1)  # (1, 1, n, 2D)
    zeros = np.zeros(1)
    result = differential.differential_attention(
        q, k, v, lambda_q1=zeros, lambda_k1=zeros, lambda_q2=zeros, lambda_k2=zeros, lambda_init=0.7,
        apply_norm=False, scale=1.0,
    )  # fmt: skip
    first, _ = masked_softmax(z1[None, :], None)
    second, _ = masked_softmax(z2[None, :], None)
    assert result.out[0, 0, 0, 0] == pytest.approx(first[0, 0] - 0.7 * second[0, 0], rel=1e-12)


# --------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------

SMALL = ["dilution", "--lengths", "16", "256", "--samples", "200", "--seed", "5"]


def test_command_prints_the_table(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    setting = Setting()
    rows = analysis.dilution_table([16, 256], setting, samples=200, seed=5)
    assert out.strip() == analysis.format_table(rows, setting, samples=200, seed=5)
    for title in ("standard softmax:", "SSMax:", "log-n scaling:", "differential attention:"):
        assert title in out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["256"])  # standard softmax, n = 256
    closed, bound, exact, measured, se = (line.split()[i] for i in (1, 3, 4, 5, 7))
    softmax = next(r for r in rows if r.mechanism == "softmax" and r.n == 256)
    assert float(closed) == pytest.approx(softmax.theory.mass, rel=1e-3)
    assert float(bound) == pytest.approx(softmax.theory.mass_bound, rel=0.05)
    assert float(exact) == pytest.approx(softmax.theory.mass_exact, rel=1e-3)
    assert float(measured) == pytest.approx(softmax.measured.mass, rel=1e-3)
    assert float(se) == pytest.approx(softmax.measured.mass_se, rel=0.05)
    assert "s = 0.25" in out and "λ = 0.8" in out


def test_command_draws_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "dilution.png"
    assert main([*SMALL, "--plot", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_command_without_matplotlib_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main([*SMALL, "--plot", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "refattn[plot]" in err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--samples", "1"], "`samples`"),
        (["--lengths", "1"], "`lengths`"),
        (["--sigma", "-1"], "`sigma`"),
        (["--margin", "0"], "`ssmax_s`"),
        (["--lam", "1"], "`lam`"),
        (["--ssmax-s", "0"], "`ssmax_s`"),
    ],
)
def test_command_rejects_bad_settings(args, message, capsys):
    assert main(["dilution", "--lengths", "16", "--samples", "10", *args]) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, argument, expected, given",
    [
        (lambda: mean_field_mass(1, 0.0, 1.0), "n", "an int >= 2", "1"),
        (lambda: second_order_mass(16.0, 0.0, 1.0), "n", "an int >= 2", "16.0"),
        (lambda: second_order_mass_bound(16, math.inf, 1.0), "margin", "a finite number", "inf"),
        (lambda: second_order_entropy(16, 0.0, -0.5), "sigma", "a finite number in [0.0", "-0.5"),
        (lambda: exact_expectations(16, 0.0, 25.0), "sigma", "a noise scale <= 20", "25.0"),
        (lambda: mean_field_mass(16, 800.0, 1.0), "margin", "magnitude <= 700", "800.0"),
        (lambda: equal_keys(0), "n", "an int >= 1", "0"),
        (lambda: Setting(lam=-0.1), "lam", "[0.0, 1.0)", "-0.1"),
        (lambda: Setting(margin=-1.0), "ssmax_s", "the default 1/margin needs margin > 0", "None"),
        (lambda: predict("sparsemax", 16, Setting()), "mechanism", "one of", "'sparsemax'"),
        (lambda: measure(16, Setting(), samples=1, seed=0), "samples", "an int >= 2", "1"),
        (lambda: measure(16, Setting(), samples=10, seed=-1), "seed", "an int >= 0", "-1"),
    ],
)
def test_bad_input(call, argument, expected, given):
    with pytest.raises(SpecError) as info:
        call()
    assert info.value.argument == argument
    assert expected in info.value.expected and given in info.value.given
