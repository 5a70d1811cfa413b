"""Resamplers: unbiased counts, static shapes under jit/vmap, degenerate and invalid weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.smc import RESAMPLERS, get_resampler, multinomial, residual, stratified, systematic

SCHEMES = sorted(RESAMPLERS)
WEIGHTS = np.array([0.05, 0.0, 0.4, 0.1372, 0.2628, 0.15], np.float32)


NUM_KEYS = 10_000


@functools.lru_cache(maxsize=None)
def _counts(name, num_samples):
    """float64 `[NUM_KEYS, N]` copies of each particle over 10^4 keys (shared by two tests)."""
    keys = jax.random.split(jax.random.key(0), NUM_KEYS)
    resample = jax.jit(jax.vmap(RESAMPLERS[name], in_axes=(0, None, None)), static_argnums=2)
    ancestors = resample(keys, jnp.asarray(WEIGHTS), num_samples)
    assert ancestors.shape == (NUM_KEYS, num_samples) and ancestors.dtype == jnp.int32
    counts = jax.vmap(lambda a: jnp.bincount(a, length=len(WEIGHTS)))(ancestors)
    return np.asarray(counts, np.float64)


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("num_samples", [6, 11])
def test_expected_counts_are_num_samples_times_weights(name, num_samples):
    counts = _counts(name, num_samples)
    assert (counts.sum(axis=1) == num_samples).all()
    # Mean of 10^4 i.i.d. counts: standard error = sd / sqrt(10^4); 4 standard errors (plus
    # float32 slack for schemes whose count is deterministic, sd = 0).
    expected = num_samples * WEIGHTS.astype(np.float64)
    tolerance = 4 * counts.std(axis=0) / np.sqrt(NUM_KEYS) + 1e-5
    np.testing.assert_array_less(np.abs(counts.mean(axis=0) - expected), tolerance)
    assert counts[:, 1].max() == 0  # the zero-weight particle is never selected


def test_low_variance_schemes_beat_multinomial():
    variance = {name: _counts(name, 6).var(axis=0).sum() for name in SCHEMES}
    for name in ("stratified", "systematic", "residual"):
        assert variance[name] < 0.7 * variance["multinomial"], variance


@pytest.mark.parametrize("name", SCHEMES)
def test_degenerate_weights(name):
    resample = RESAMPLERS[name]
    key = jax.random.key(2)
    one_hot = jnp.zeros(7).at[4].set(1.0)
    assert (resample(key, one_hot, 9) == 4).all()
    # Weight zero at the very end of the CDF: never selected even by the last uniform.
    tail_zero = jnp.array([0.5, 0.5, 0.0])
    keys = jax.random.split(key, 2000)
    assert jax.vmap(resample, in_axes=(0, None, None))(keys, tail_zero, 3).max() <= 1
    np.testing.assert_array_equal(resample(key, jnp.ones(1), 5), np.zeros(5))


@pytest.mark.parametrize("name", ["stratified", "systematic", "residual"])
def test_uniform_weights_select_every_index_once(name):
    ancestors = RESAMPLERS[name](jax.random.key(3), jnp.full(8, 0.125), 8)
    np.testing.assert_array_equal(np.sort(np.asarray(ancestors)), np.arange(8))


def test_stratified_offsets_are_independent_per_stratum():
    # W = [1/4, 1/2, 1/4], M = 2: u_1 = U_1/2 picks 0 iff U_1 < 1/2, u_2 = (1 + U_2)/2 picks 2 iff
    # U_2 >= 1/2 (exact in float32). Independent U_m give each of (0,1), (0,2), (1,1), (1,2)
    # with probability 1/4; systematic's shared U gives (0,1) or (1,2) only.
    keys = jax.random.split(jax.random.key(4), 4000)
    weights = jnp.array([0.25, 0.5, 0.25])
    outcomes = {}
    for name in ("stratified", "systematic"):
        ancestors = np.asarray(jax.vmap(RESAMPLERS[name], in_axes=(0, None, None))(keys, weights, 2))
        outcomes[name] = {pair: np.mean((ancestors == pair).all(axis=1)) for pair in [(0, 1), (0, 2), (1, 1), (1, 2)]}
    tolerance = 4 * np.sqrt(0.25 * 0.75 / len(keys))  # 4 standard errors of a frequency of 1/4
    for frequency in outcomes["stratified"].values():
        assert abs(frequency - 0.25) < tolerance, outcomes
    assert outcomes["systematic"][(0, 2)] == outcomes["systematic"][(1, 1)] == 0, outcomes


@pytest.mark.parametrize("name", SCHEMES)
def test_jit_vmap_and_eager_agree(name):
    resample = RESAMPLERS[name]
    keys = jax.random.split(jax.random.key(4), 3)
    weights = jax.random.dirichlet(jax.random.key(5), jnp.ones(5), (3,))
    eager = np.stack([resample(k, w, 5) for k, w in zip(keys, weights)])
    batched = jax.jit(jax.vmap(resample, in_axes=(0, 0, None)), static_argnums=2)(keys, weights, 5)
    np.testing.assert_array_equal(eager, batched)


@pytest.mark.parametrize("name", SCHEMES)
def test_weights_outside_float32_range(name):
    resample = RESAMPLERS[name]
    keys = jax.random.split(jax.random.key(7), 200)
    many = jax.vmap(resample, in_axes=(0, None, None))
    # Finite, but the float32 total overflows; and float64 weights that float32 flushes to 0.
    overflow = np.array([3e38, 3e38, 0.0], np.float32)
    underflow = np.exp([-200.0, -199.0, -np.inf])
    for weights, probs in [(overflow, [0.5, 0.5]), (jnp.asarray(overflow), [0.5, 0.5]), (underflow, [0.269, 0.731])]:
        counts = np.bincount(np.asarray(many(keys, weights, 3)).ravel(), minlength=3)
        # 600 draws: 0.1 is over 4 standard errors.
        assert counts[2] == 0 and np.abs(counts[:2] / 600 - probs).max() < 0.1, counts
    np.testing.assert_array_equal(resample(keys[0], underflow, 3) < 2, True)
    with pytest.raises(NumericalError, match="underflowed"):
        resample(keys[0], jnp.exp(jnp.asarray([-200.0, -199.0])), 2)


@pytest.mark.parametrize("name", SCHEMES)
def test_invalid_weights(name):
    resample = RESAMPLERS[name]
    key = jax.random.key(6)
    with pytest.raises(NumericalError, match="NaN"):
        resample(key, jnp.array([0.5, jnp.nan, 0.5]), 3)
    with pytest.raises(NumericalError, match="all resampling weights are zero"):
        resample(key, jnp.zeros(3), 3)
    log_weights = jnp.log(jnp.array([0.05, 0.05, 0.9]))  # passed by mistake: all negative
    for negative in (jnp.array([1.5, -0.5]), log_weights):
        with pytest.raises(ArgumentError, match="non-negative"):
            resample(key, negative, 2)
    with pytest.raises(ArgumentError, match="num_samples"):
        resample(key, jnp.ones(2), 0)
    with pytest.raises(ArgumentError, match="shape"):
        resample(key, jnp.ones((2, 2)), 2)
    # Under jit nothing can raise: invalid weights give the documented identity ancestors.
    jitted = jax.jit(resample, static_argnums=2)
    for bad in (jnp.array([0.5, jnp.nan, 0.5]), jnp.zeros(3), log_weights, jnp.array([1.5, -0.5, 0.1])):
        np.testing.assert_array_equal(jitted(key, bad, 5), [0, 1, 2, 0, 1])


def test_get_resampler():
    assert get_resampler("systematic") is systematic
    assert get_resampler(stratified) is stratified
    assert {multinomial, residual} <= set(RESAMPLERS.values())
    with pytest.raises(ArgumentError, match="unknown resampler"):
        get_resampler("bogus")
