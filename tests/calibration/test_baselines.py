"""CSA baselines (A-RCPS, ACI, CRC, LTT), LTT's p-values and fixed-sequence test, isotonic PAV."""

import itertools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxsample.calibration import baselines, binomial_p_value, csa, fixed_sequence, isotonic_fit, isotonic_predict
from jaxsample.errors import ArgumentError

GRID = np.linspace(0.02, 0.5, 25)


def test_binomial_p_value_matches_scipy():
    n = np.array([0, 1, 5, 20, 20, 100, 500, 500])
    s = np.array([0, 0, 2, 0, 20, 7, 30, 60])
    expected = np.where(n > 0, stats.binom.cdf(s, n, 0.1), 1.0)
    np.testing.assert_allclose(np.asarray(binomial_p_value(s, n, 0.1)), expected, rtol=2e-4, atol=1e-7)


def exact_binomial_cdf_at_a_tenth(s, n):
    """P(Bin(n, 1/10) ≤ s) from exact integers, Σ_{k ≤ s} C(n, k) 9^(n−k) / 10^n, rounded once to float."""
    term = total = 9**n
    for k in range(s):
        term = term * (n - k) // ((k + 1) * 9)
        total += term
    return float(Fraction(total, 10**n))


def test_binomial_p_value_is_exact_and_never_below_it_at_large_n():
    """float32's betainc gave 0.04912 for s = 1930, n = 20000 (exact 0.05014): an LTT rejection at
    ε = 0.05 that the exact tail does not make. The host float64 tail rounded up to float32 lies
    in [exact, exact · (1 + 2⁻²³)]; 1e-12 is slack for float64's own error."""
    assert float(binomial_p_value(1930, 20000, 0.1)) >= exact_binomial_cdf_at_a_tenth(1930, 20000) > 0.05
    n = np.array([20000, 20000, 20000, 5000, 5000, 100000, 100000])
    s = np.array([1800, 1930, 2050, 450, 60, 9800, 1100])
    level = np.array([0.1, 0.1, 0.1, 0.1, 0.01, 0.1, 0.01])
    exact = stats.binom.cdf(s, n, level)
    eager = np.asarray(binomial_p_value(s, n, level), np.float64)
    traced = np.asarray(jax.jit(jax.vmap(lambda s, n: binomial_p_value(s, n, level)))(s[None], n[None])[0], np.float64)
    for p in (eager, traced):  # concrete on the host; traced through the callback, level kept float64
        assert np.all(p >= exact * (1 - 1e-12)), (p, exact)
        assert np.all(p <= exact * (1 + 2.0**-23 + 1e-12)), (p, exact)


def test_fixed_sequence_returns_last_rejected():
    assert int(fixed_sequence(jnp.array([0.01, 0.02, 0.2, 0.01]), 0.05)) == 1
    assert int(fixed_sequence(jnp.array([0.3, 0.01]), 0.05)) == -1
    assert int(fixed_sequence(jnp.array([0.01, 0.01]), 0.05)) == 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: binomial_p_value(3, 10, 1.5), "level must be a number in (0, 1), got 1.5"),
        (lambda: binomial_p_value(3, 10, 0.0), "level must be a number in (0, 1), got 0.0"),
        (lambda: binomial_p_value(-3, 10, 0.1), "num_losses must be a number in [0, inf), got -3.0"),
        (lambda: binomial_p_value(3, float("nan"), 0.1), "num_trials must be a number in [0, inf), got nan"),
        (lambda: binomial_p_value(12, 10, 0.1), "num_losses must be ≤ num_trials, got 12 losses in 10 trials"),
        (lambda: binomial_p_value(np.array([1, 12]), 10, 0.1), "got 12 losses in 10 trials (element (1,))"),
        (lambda: fixed_sequence(jnp.array([[0.01, 0.5], [0.01, 0.01]]), 0.05), "p_values must be a 1-D sequence [J] in testing order, got shape (2, 2)"),
        (lambda: fixed_sequence(jnp.array(0.01), 0.05), "got shape ()"),
        (lambda: fixed_sequence(jnp.array([0.9, 0.9]), 1.5), "delta must be a number in (0, 1), got 1.5"),
    ],
)
def test_ltt_pieces_reject_bad_arguments(call, message):
    with pytest.raises(ArgumentError) as error:
        call()
    assert message in str(error.value)


def test_ltt_pieces_still_trace():
    assert float(jax.jit(binomial_p_value)(0, 0, 0.1)) == 1.0
    assert int(jax.jit(fixed_sequence)(jnp.array([0.01, 0.2]), 0.05)) == 0


def test_isotonic_fit_is_the_least_squares_monotone_fit():
    fit = isotonic_fit([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    np.testing.assert_allclose(fit.values, [1.0, 2.5, 2.5, 4.0])
    np.testing.assert_allclose(isotonic_predict(fit, [-1.0, 0.5, 5.0]), [1.0, 1.75, 4.0])
    # Brute force on a tiny problem: every non-decreasing 0/½/1 vector; PAV's loss is no larger.
    rng = np.random.default_rng(0)
    x, y = rng.random(6), (rng.random(6) < 0.5) * 1.0
    fit = isotonic_fit(x, y)
    pav = np.sum((isotonic_predict(fit, x) - y) ** 2)
    candidates = [c for c in itertools.product([0, 0.25, 0.5, 0.75, 1], repeat=6) if np.all(np.diff(c) >= 0)]
    order = np.argsort(x)
    best = min(np.sum((np.asarray(c) - y[order]) ** 2) for c in candidates)
    assert np.all(np.diff(fit.values) >= 0) and pav <= best + 1e-12


def test_aci_selective_identity_without_clipping():
    """Σ A_t (α − ℓ_t) = (τ_{T+1} − τ_1)/γ when the clip never binds."""
    rng = np.random.default_rng(1)
    risks, losses = rng.random(500), (rng.random(500) < 0.3) * 1.0
    wide = np.array([-100.0, 0.5, 100.0])
    state = baselines.aci_init(wide, 0.1, gamma=0.01)
    final, info = jax.lax.scan(lambda s, x: baselines.build_aci_kernel()(s, *x), state,
                               (jnp.asarray(risks, jnp.float32), jnp.asarray(losses, jnp.float32)))
    action = np.asarray(info.action)
    assert 0 < action.sum() < 500
    np.testing.assert_allclose(np.sum(action * (0.1 - losses)), (float(final.threshold) - 0.5) / 0.01, rtol=1e-3)


def test_arcps_bets_on_every_round_with_the_marginal_factor():
    state = baselines.arcps_init(np.array([0.5]), 0.2, 0.1)
    step = jax.jit(baselines.build_arcps_kernel())
    state, _ = step(state, 0.9, 1.0)  # does not act: marginal loss 0, z = α
    state, _ = step(state, 0.9, 1.0)
    assert float(state.count[0]) == 2.0
    np.testing.assert_allclose(float(state.log_wealth[0]), np.log1p(0.5 / 0.8 * 0.2), rtol=1e-6)
    # It was a functools.partial: help() showed partial's docstring, nothing about A-RCPS.
    assert "A-RCPS" in baselines.build_arcps_kernel.__doc__


def test_crc_and_ltt_on_a_hand_example():
    # 10 calibration rounds; the thresholds act on the first 2, 5 and 10 rounds.
    risks = np.arange(10) / 10.0
    losses = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1], float)
    grid = np.array([0.15, 0.45, 0.95])
    # CRC: R̂ = 0, 0.1, 0.6; (10 R̂ + 1)/11 = 0.09, 0.18, 0.64.
    assert baselines.crc_fit(risks, losses, grid, 0.1) == 0
    assert baselines.crc_fit(risks, losses, grid, 0.2) == 1
    assert baselines.crc_fit(risks, losses, grid, 0.05) == -1
    # LTT at α = 0.5: p = 0.5² = 0.25, BinomCDF(1; 5, .5) = 0.1875, BinomCDF(6; 10, .5) = 0.83.
    assert baselines.ltt_fit(risks, losses, grid, 0.5, 0.3) == 1
    assert baselines.ltt_fit(risks, losses, grid, 0.5, 0.2) == -1  # stops at the first threshold


def test_ltt_selective_guarantee_over_resplits():
    """P(true selective risk of the LTT threshold > α) ≤ δ over exchangeable calibration sets."""
    alpha, delta, seeds, n = 0.1, 0.1, 300, 400
    rng = np.random.default_rng(2)
    grid = np.linspace(0.05, 1.0, 20)  # here r = S ~ U(0, 1), p(s) = 0.3 s: risk(τ) = 0.15 τ
    violations = 0
    for _ in range(seeds):
        risks = rng.random(n)
        losses = (rng.random(n) < 0.3 * risks) * 1.0
        k = baselines.ltt_fit(risks, losses, grid, alpha, delta)
        violations += k >= 0 and 0.15 * grid[k] > alpha
    tolerance = 3.0 * np.sqrt(delta * (1 - delta) / seeds)
    assert violations / seeds <= delta + tolerance


@pytest.mark.parametrize("selective", [True, False])
def test_aci_stays_in_the_grid(selective):
    state = baselines.aci_init(GRID, 0.1, gamma=0.05)
    step = jax.jit(baselines.build_aci_kernel(selective))
    for loss in [1.0] * 50:
        state, _ = step(state, 0.0, loss)
    assert float(state.threshold) == pytest.approx(GRID[0])
    _, info, _ = csa.run_stream(baselines.build_aci_kernel(selective), baselines.aci_init(GRID, 0.1), np.random.rand(300), np.zeros(300))
    assert np.asarray(info.threshold).max() <= GRID[-1] + 1e-6
