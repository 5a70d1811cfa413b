"""The TV bound holds for exact samples and is not vacuous; the unbiasedness z-test."""

import numpy as np
import pytest

from jaxsample import testing
from jaxsample.errors import ArgumentError, VerificationError

SPACE = testing.enumerate_completions(testing.random_tabular_lm(4, 4, seed=2), [0], 4)
TARGET = testing.power_target(SPACE, 2.0)


def _draws(law, n, seed):
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(law.states), size=n, p=law.probs)
    states = [law.states[s] for s in picks]
    return SPACE.tokens(states)


def test_bound_holds_for_exact_samples_and_is_not_vacuous():
    n = 4000
    checks = [testing.chain_histogram_tv(_draws(TARGET, n, seed), TARGET) for seed in range(50)]
    tvs = np.array([c.tv for c in checks])
    # Every run under its bound (a failure has probability ≤ 50 · 1e-6), and the mean TV
    # under the mean bound μ (the Jensen step), but not by more than a factor of 2.
    assert np.all(tvs <= checks[0].bound)
    assert checks[0].mean_bound / 2 < tvs.mean() <= checks[0].mean_bound
    # A law at TV 0.1 from the target: rejected with the worst states named; accepted when
    # that bias is allowed.
    shifted = testing.Distribution(TARGET.states, 0.9 * TARGET.probs + 0.1 * np.eye(121)[5])
    far = _draws(shifted, n, 0)
    with pytest.raises(VerificationError, match=rf"TV = 0\.\d+ > bound .*{SPACE.sequences[5]}"):
        testing.assert_tv_below(far, TARGET)
    testing.assert_tv_below(far, TARGET, bias=testing.total_variation(shifted, TARGET))


def test_samples_outside_the_target_are_reported():
    tokens, lengths = SPACE.tokens([(0, 1, 3), (3,)])
    lengths[1] = 2  # (3, pad): continues past a stop token
    with pytest.raises(VerificationError, match="sample 1 is"):
        testing.empirical_distribution((tokens, lengths), TARGET.states)


def test_assert_unbiased():
    rng = np.random.default_rng(0)
    estimates = rng.exponential(2.0, size=(400, 3))
    result = testing.assert_unbiased(estimates, [2.0, 2.0, 2.0])
    # Bonferroni over the 3 columns: the two-sided t quantile at 1e-4 / 3, 399 degrees of freedom.
    np.testing.assert_allclose(result.threshold, 4.197, atol=1e-3)
    assert np.all(np.abs(result.z) < result.threshold)
    with pytest.raises(VerificationError, match=r"biased at index \(1,\): mean .* vs exact 1\.6"):
        testing.assert_unbiased(estimates, [2.0, 1.6, 2.0])
    with pytest.raises(VerificationError, match="standard errors > "):
        testing.assert_unbiased(np.ones(10), 0.5)
    # Zero spread up to float rounding (e.g. an exact twist): atol absorbs it.
    rounded = np.full(10, 1.0 + 2.0**-23)
    with pytest.raises(VerificationError, match="inf standard errors"):
        testing.assert_unbiased(rounded, 1.0)
    testing.assert_unbiased(rounded, 1.0, atol=1e-6)
    with pytest.raises(ArgumentError, match="failure_prob"):
        testing.assert_unbiased(estimates, 2.0, failure_prob=0.0)


def test_assert_unbiased_false_alarm_rate_holds_at_small_n():
    """Unbiased normal estimates, n = 3: the t quantile keeps the false-alarm rate at
    failure_prob (a z threshold of 4 standard errors fails 6% of such runs at n = 3)."""
    rng = np.random.default_rng(1)
    reps, failure_prob = 4000, 0.05
    alarms = 0
    for estimates in rng.normal(size=(reps, 3)):
        try:
            testing.assert_unbiased(estimates, 0.0, failure_prob=failure_prob)
        except VerificationError:
            alarms += 1
    rate, se = alarms / reps, np.sqrt(failure_prob * (1 - failure_prob) / reps)
    assert abs(rate - failure_prob) < 4 * se, rate
