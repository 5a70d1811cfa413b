"""ESS, weight normalisation and the ESS-conditional resampling step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample.errors import ArgumentError
from jaxsample.smc import ess, log_evidence, normalize_log_weights, resample_if_needed, systematic


def test_ess_matches_direct_formula_without_overflow():
    rng = np.random.default_rng(0)
    for scale, shift in [(1.0, 0.0), (30.0, 0.0), (5.0, 1e4), (5.0, -1e4)]:
        lw = (rng.normal(size=64) * scale + shift).astype(np.float32)
        w = np.exp(lw.astype(np.float64) - lw.max())
        direct = w.sum() ** 2 / (w**2).sum()
        np.testing.assert_allclose(ess(jnp.asarray(lw, jnp.float32)), direct, rtol=1e-4)
    for num in (10, 13, 1000, 12345):  # exactly N: κ = 1 must not resample equal weights
        assert ess(jnp.full(num, -3.7)) == num
    np.testing.assert_allclose(ess(jnp.array([0.0, -jnp.inf, -jnp.inf])), 1.0, rtol=1e-6)


def test_all_minus_inf_weights_are_degenerate_not_nan():
    lw = jnp.full(4, -jnp.inf)
    assert ess(lw) == 0.0
    assert log_evidence(lw) == -jnp.inf
    log_w, log_total = normalize_log_weights(lw)
    assert log_total == -jnp.inf and bool(jnp.all(jnp.isneginf(log_w)))
    assert jnp.isnan(ess(jnp.array([0.0, jnp.nan])))


def test_normalize_log_weights():
    lw = jnp.array([[1.0, 2.0, -jnp.inf], [300.0, 300.0, 300.0]])
    log_w, log_total = normalize_log_weights(lw)
    expected = [1 / (1 + np.e), np.e / (1 + np.e), 0.0]
    np.testing.assert_allclose(jnp.exp(log_w[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(jnp.exp(log_w[1]), 1.0 / 3.0, rtol=1e-6)  # ulp(300) ~ 3e-5
    np.testing.assert_allclose(log_total[1], 300.0 + np.log(3.0), rtol=1e-7, atol=4e-5)


def _particles(num):
    return {"x": jnp.arange(num, dtype=jnp.float32), "y": jnp.arange(2 * num).reshape(num, 2)}


def test_resample_if_needed_resamples_only_below_threshold_and_keeps_log_z():
    key = jax.random.key(0)
    particles = _particles(4)
    balanced = jnp.log(jnp.array([0.3, 0.2, 0.25, 0.25]))
    same, lw, info = resample_if_needed(key, balanced, particles, 0.5, systematic)
    assert not info.resampled and info.num_unique == 4
    chex.assert_trees_all_equal(same, particles)
    np.testing.assert_array_equal(lw, balanced)

    skewed = jnp.log(jnp.array([0.97, 0.01, 0.01, 0.01])) + 3.0
    new, lw, info = resample_if_needed(key, skewed, particles, 0.5, systematic)
    assert info.resampled and info.ess < 2.0
    # A resampler name, as build_kernel and smc_decode take it.
    chex.assert_trees_all_equal(resample_if_needed(key, skewed, particles, 0.5, "systematic"),
                                (new, lw, info))
    with pytest.raises(ArgumentError, match="unknown resampler 'sytematic'"):
        resample_if_needed(key, skewed, particles, 0.5, "sytematic")
    np.testing.assert_array_equal(new["x"], np.asarray(info.ancestors, np.float32))
    np.testing.assert_array_equal(new["y"], np.asarray(particles["y"])[np.asarray(info.ancestors)])
    np.testing.assert_allclose(log_evidence(lw), log_evidence(skewed), rtol=1e-6)
    np.testing.assert_allclose(lw, jnp.full(4, lw[0]))
    assert info.num_unique == len(set(np.asarray(info.ancestors).tolist()))


@pytest.mark.parametrize("log_weights, kappa, expected_ess, resampled", [
    (jnp.zeros(4), 1.0, 4.0, False),  # κ = 1 resamples only weights that are not all equal
    (jnp.zeros(13), 1.0, 13.0, False),  # exp(log 13) rounds below 13: ESS must not go through it
    (jnp.log(jnp.array([1.0, 1.0, 1.0, 2.0])), 1.0, 25 / 7, True),
    (jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf]), 0.5, 2.0, False),  # ESS = κN exactly: not below
    (jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf]), 0.75, 2.0, True),
])
def test_resample_if_needed_resamples_only_strictly_below_kappa_n(log_weights, kappa, expected_ess, resampled):
    num = log_weights.shape[0]
    _, _, info = resample_if_needed(jax.random.key(0), log_weights, _particles(num), kappa, systematic)
    np.testing.assert_allclose(info.ess, expected_ess, rtol=1e-6)
    assert bool(info.resampled) == resampled


def test_resample_if_needed_flags_degenerate_and_nan_weights():
    key = jax.random.key(1)
    particles = _particles(3)
    cases = [(jnp.full(3, -jnp.inf), "all_zero"), (jnp.array([0.0, jnp.nan, 0.0]), "nan_or_inf"),
             (jnp.array([0.0, jnp.inf, 0.0]), "nan_or_inf")]
    for lw, flag in cases:
        new, out, info = resample_if_needed(key, lw, particles, 1.0, systematic)
        assert getattr(info, flag) and not info.resampled
        chex.assert_trees_all_equal(new, particles)


def test_threshold_is_traced_no_recompile():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(key, lw, kappa):
        return resample_if_needed(key, lw, _particles(4), kappa, systematic)[2].resampled

    lw = jnp.log(jnp.array([0.4, 0.4, 0.1, 0.1]))  # ESS = 2.94
    key = jax.random.key(2)
    assert not step(key, lw, 0.5) and step(key, lw, 0.9)
