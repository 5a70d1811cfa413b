"""CausalRM losses: unbiasedness by exact enumeration over observation and label noise."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample.errors import ArgumentError
from jaxsample.training import causalrm

FLIP_RATES = [(0.1, 0.2), (0.2, 0.1)]  # the reference code names these both ways round


def flip_probability(clean, noisy, a, b):
    """P(ỹ = noisy | y = clean)."""
    flip = b if clean == 1 else a
    return flip if noisy != clean else 1 - flip


@pytest.mark.parametrize("a, b", FLIP_RATES)
def test_corrected_loss_is_unbiased_for_the_clean_loss(a, b):
    logits = jnp.linspace(-6, 6, 25)
    for clean in (0, 1):
        expected = sum(
            flip_probability(clean, noisy, a, b) * causalrm.corrected_bce(logits, jnp.full(25, noisy), a, b)
            for noisy in (0, 1)
        )
        np.testing.assert_allclose(expected, causalrm.bce(logits, float(clean)), atol=2e-6)


def exact_expectation(per_item_loss, clean_prob, propensity, a, b):
    """E over y ~ Bern(η), o ~ Bern(p), ỹ ~ flip(y) of the mean of per-item losses.

    `per_item_loss(observed, noisy)` returns the `[N]` per-item values for configuration
    arrays; the expectation of a mean of independent items is the mean of their expectations.
    """
    total = 0.0
    n = len(clean_prob)
    for y, o, noisy in itertools.product((0, 1), (0, 1), (0, 1)):
        if o == 0 and noisy != y:
            continue  # unobserved labels are never flipped (and never read)
        weight = np.where(y == 1, clean_prob, 1 - clean_prob) * np.where(o == 1, propensity, 1 - propensity)
        if o == 1:
            weight = weight * flip_probability(y, noisy, a, b)
        total = total + weight * np.asarray(per_item_loss(np.full(n, o), np.full(n, noisy)))
    return float(np.mean(total))


def per_item(loss_fn):
    """Turns a mean-over-items loss into per-item values (N = 1 per call)."""
    return jax.vmap(lambda *args: loss_fn(*(x[None] for x in args)))


@pytest.mark.parametrize("a, b", FLIP_RATES)
def test_ips_recovers_the_full_data_risk_exactly(a, b):
    rng = np.random.default_rng(0)
    n = 40
    logits = jnp.asarray(rng.normal(0, 2, n), jnp.float32)
    clean = rng.integers(0, 2, n).astype(np.float64)
    propensity = jnp.asarray(rng.uniform(0.1, 1.0, n), jnp.float32)  # clip 0.1 inactive
    ips = per_item(lambda f, o, y, p: causalrm.ips_loss(f, o, y, p, a, b))
    value = exact_expectation(lambda o, y: ips(logits, o, y, propensity), clean, np.asarray(propensity), a, b)
    assert value == pytest.approx(float(jnp.mean(causalrm.bce(logits, clean))), abs=2e-5)


def test_ips_matches_the_clean_loss_by_monte_carlo_within_three_standard_errors():
    rng = np.random.default_rng(1)
    n, draws, a, b = 100, 2000, 0.1, 0.2
    logits = jnp.asarray(rng.normal(0, 2, n), jnp.float32)
    clean = jnp.asarray(rng.integers(0, 2, n))
    propensity = jnp.asarray(rng.uniform(0.1, 1.0, n), jnp.float32)

    def one(key):
        s = causalrm.simulate(key, clean, propensity, a, b)
        return causalrm.ips_loss(logits, s.observed, s.noisy, propensity, a, b)

    values = np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(0), draws)))
    target = float(jnp.mean(causalrm.bce(logits, clean)))
    assert abs(values.mean() - target) <= 3 * values.std(ddof=1) / np.sqrt(draws)


@pytest.mark.parametrize("a, b", FLIP_RATES)
def test_doubly_robust_is_unbiased_if_either_nuisance_is_right(a, b):
    rng = np.random.default_rng(2)
    n = 40
    logits = jnp.asarray(rng.normal(0, 2, n), jnp.float32)
    clean_prob = rng.uniform(0, 1, n)
    true_p = rng.uniform(0.15, 1.0, n)
    right_q = a + (1 - a - b) * clean_prob  # P(ỹ = 1 | x)
    wrong_p = np.clip(true_p * rng.uniform(0.5, 1.5, n), 0.1, 1.0)
    wrong_q = rng.uniform(0, 1, n)
    target = float(np.mean(clean_prob * causalrm.bce(logits, 1.0) + (1 - clean_prob) * causalrm.bce(logits, 0.0)))
    dr = per_item(lambda f, o, y, p, q: causalrm.dr_loss(f, o, y, p, q, a, b))

    def expectation(p_hat, q_hat):
        p_hat, q_hat = jnp.asarray(p_hat, jnp.float32), jnp.asarray(q_hat, jnp.float32)
        return exact_expectation(lambda o, y: dr(logits, o, y, p_hat, q_hat), clean_prob, true_p, a, b)

    assert expectation(wrong_p, right_q) == pytest.approx(target, abs=2e-5)
    assert expectation(true_p, wrong_q) == pytest.approx(target, abs=2e-5)
    assert abs(expectation(wrong_p, wrong_q) - target) > 1e-2  # the guarantee needs one of them


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (0.7, 0.4), (-0.1, 0.2), (0.2, 1.0)])
def test_bad_flip_rates_raise(a, b):
    with pytest.raises(ArgumentError, match="flip rate"):
        causalrm.corrected_bce(jnp.zeros(3), jnp.zeros(3), a, b)


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2, float("nan")])
def test_propensities_outside_unit_interval_raise(bad):
    p = jnp.asarray([0.5, bad, 0.3])
    with pytest.raises(ArgumentError, match="propensities must lie in \\(0, 1\\]"):
        causalrm.ips_loss(jnp.zeros(3), jnp.ones(3), jnp.ones(3), p, 0.1, 0.2)


def test_anchor_quantile_flip_rates_recover_the_true_rates():
    a, b = 0.1, 0.2
    eta = np.concatenate([np.zeros(200), np.linspace(0, 1, 600), np.ones(200)])
    noisy_prob = a + (1 - a - b) * eta
    a_hat, b_hat = causalrm.estimate_flip_rates(np.log(noisy_prob / (1 - noisy_prob)))
    assert a_hat == pytest.approx(a, abs=1e-6) and b_hat == pytest.approx(b, abs=1e-6)


def test_selection_propensity_meets_the_observation_rate_and_favours_high_ratings():
    rating = np.linspace(1, 5, 1001)
    p = causalrm.selection_propensity(rating, selection_strength=0.1, observation_rate=0.2)
    assert p.mean() == pytest.approx(0.2, abs=1e-4)
    assert np.all(np.diff(p) >= 0) and p.max() <= 1


def test_evaluation_matches_brute_force_auroc_and_ece():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 300).round(2)  # ties on purpose
    y = (rng.uniform(0, 1, 300) < p).astype(int)
    pairs = [(i, j) for i in np.flatnonzero(y == 1) for j in np.flatnonzero(y == 0)]
    brute = np.mean([1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0 for i, j in pairs])
    result = causalrm.evaluate_reward(p, y)
    assert result.auroc == pytest.approx(brute, abs=1e-12)
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs(p[bins == k].mean() - y[bins == k].mean()) * np.mean(bins == k) for k in range(10) if np.any(bins == k))
    assert result.ece == pytest.approx(ece, abs=1e-12)
    assert result.bias == pytest.approx(p.mean() - y.mean())


def test_evaluation_ranks_probabilities_below_the_bce_clip():
    # Confident logits: the three smallest probabilities lie below the BCE's 1e-7 clip.
    p = 1 / (1 + np.exp(-np.array([-30.0, -25.0, -20.0, -18.0, -1.0, 1.0, 20.0, 25.0])))
    y = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    result = causalrm.evaluate_reward(p, y)
    assert result.auroc == 0.875  # 14 of the 16 positive-negative pairs ranked right, no ties
    assert result.bias == pytest.approx(p.mean() - 0.5, abs=1e-15)
    assert np.isfinite(result.bce)


def test_auroc_of_a_single_class_is_nan():
    p = np.array([0.2, 0.7, 0.9])
    assert np.isnan(causalrm.evaluate_reward(p, np.ones(3)).auroc)
    assert np.isnan(causalrm.evaluate_reward(p, np.zeros(3)).auroc)


def test_fit_head_learns_a_linear_rule_and_stops_early():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.float32)
    head = causalrm.fit_head(
        jax.random.key(0), x, lambda logits, index: jnp.mean(causalrm.bce(logits, y[index])),
        train_index=np.arange(300), validation_index=np.arange(300, 400), hidden=(), learning_rate=0.05, steps=400,
    )
    accuracy = np.mean((np.asarray(head.logits(x[300:])) > 0) == (y[300:] > 0.5))
    assert accuracy > 0.9


@pytest.mark.parametrize(
    "probabilities, clean, message",
    [
        ([-3.0, 2.0, 5.0, -1.0], [0, 1, 1, 0], r"probabilities must be a number in \[0, 1\], got -3.0"),  # logits
        ([0.1, np.nan, 0.8, 0.2], [0, 1, 1, 0], "probabilities"),
        ([0.1, 0.9, 0.8, 0.2], [-1, 1, 1, -1], r"clean must be labels in \{0, 1\}, got -1"),
        ([0.1, 0.9, 0.8, 0.2], [0, 0.5, 1, 0], "clean"),
        ([0.1, 0.9, 0.8], [0, 1, 1, 0], r"same shape \[N\].*\(3,\) and \(4,\)"),
        ([[0.1, 0.9]], [[0, 1]], r"same shape \[N\]"),
        ([], [], "N >= 1"),
    ],
)
def test_evaluate_reward_rejects_logits_bad_labels_and_mismatched_lengths(probabilities, clean, message):
    with pytest.raises(ArgumentError, match=message):
        causalrm.evaluate_reward(np.asarray(probabilities), np.asarray(clean))


def test_losses_accept_lists_and_check_per_item_shapes():
    logits, observed, labels, propensity = [0.0, 1.0, -1.0], [True, False, True], [1, 0, 1], [0.5, 0.5, 0.5]
    arrays = [jnp.asarray(x) for x in (logits, observed, labels, propensity)]
    for lists, array in [
        (causalrm.naive_loss(logits, observed, labels), causalrm.naive_loss(*arrays[:3])),
        (causalrm.noise_corrected_loss(logits, observed, labels, 0.1, 0.2), causalrm.noise_corrected_loss(*arrays[:3], 0.1, 0.2)),
        (causalrm.ips_loss(logits, observed, labels, propensity), causalrm.ips_loss(*arrays)),
        (causalrm.dr_loss(logits, observed, labels, propensity, propensity, 0.1, 0.2), causalrm.dr_loss(*arrays, arrays[3], 0.1, 0.2)),
    ]:
        np.testing.assert_allclose(lists, array, rtol=1e-6)
    with pytest.raises(ArgumentError, match=r"noisy_labels must have the shape \(3,\) of logits"):
        causalrm.naive_loss(logits, observed, labels[:2])
    with pytest.raises(ArgumentError, match="imputed"):
        causalrm.dr_loss(logits, observed, labels, propensity, jnp.full((3, 1), 0.5), 0.1, 0.2)


_LOSSES = {
    "naive": lambda f, o, y: causalrm.naive_loss(f, o, y),
    "noise_corrected": lambda f, o, y: causalrm.noise_corrected_loss(f, o, y, 0.1, 0.2),
    "ips": lambda f, o, y: causalrm.ips_loss(f, o, y, jnp.full(3, 0.5), 0.1, 0.2),
    "dr": lambda f, o, y: causalrm.dr_loss(f, o, y, jnp.full(3, 0.5), jnp.full(3, 0.5), 0.1, 0.2),
}


@pytest.mark.parametrize("loss", _LOSSES.values(), ids=_LOSSES.keys())
def test_losses_reject_non_binary_labels_and_observations_but_stay_jittable(loss):
    logits, observed, labels = jnp.asarray([2.0, -1.0, 0.5]), jnp.asarray([1, 1, 0]), jnp.asarray([1, 0, 1])
    with pytest.raises(ArgumentError, match=r"noisy_labels must be labels in \{0, 1\}, got -1 \(element \(1,\)\)"):
        loss(logits, observed, 2 * labels - 1)  # ±1 labels: a negative naive BCE before the check
    with pytest.raises(ArgumentError, match=r"observed must be labels in \{0, 1\}, got 0.5"):
        loss(logits, jnp.asarray([1.0, 0.5, 0.0]), labels)
    # Traced arguments cannot be inspected and pass through unchecked.
    assert jax.jit(loss)(logits, observed, labels) == pytest.approx(float(loss(logits, observed, labels)), rel=1e-6)


@pytest.mark.parametrize(
    "clean, propensity, message",
    [
        ([1, 2, 3, 4, 5], np.full(5, 0.9), r"clean must be labels in \{0, 1\}, got 2"),  # ratings, not preferences
        ([0, 1, 1], np.full(2, 0.9), r"propensity must have the shape \(3,\) of clean"),
    ],
)
def test_simulate_rejects_non_binary_clean_labels_and_mismatched_propensity(clean, propensity, message):
    with pytest.raises(ArgumentError, match=message):
        causalrm.simulate(jax.random.key(0), np.asarray(clean), propensity, 0.1, 0.1)


def test_simulate_draws_the_same_under_x64():
    # The uniforms had the default dtype, which follows jax_enable_x64: other draws for the same key.
    clean, propensity = np.tile([0, 1, 1, 0], 8), np.linspace(0.05, 1.0, 32)  # float64 propensities

    def run():
        return causalrm.simulate(jax.random.key(0), clean, propensity, 0.3, 0.2)

    expected = run()
    with jax.enable_x64(True):
        got = run()
    for old, new in zip(expected, got):
        np.testing.assert_array_equal(new, old)
        assert new.dtype == old.dtype
