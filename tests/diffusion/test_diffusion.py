"""The masked-diffusion LM's sampler and twisted SMC against exact enumeration (T = 4, V = 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample import diffusion as jd
from jaxsample import testing
from jaxsample.errors import ConfigError

SEQ_LEN, VOCAB = 4, 3


def tiny_model(num_steps: int) -> jd.MaskedDiffusionLM:
    config = jd.DiffusionConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, num_steps=num_steps, hidden_size=16,
                                num_layers=1, num_heads=2, head_dim=8, mlp_size=16)
    model = jd.init_model(jax.random.key(0), config)
    # Scaled-up random weights: a law far from uniform, with position-dependent conditionals.
    return model.replace(params=jax.tree.map(lambda w: 2.0 * w, model.params))


def log_potential(tokens):
    return 1.5 * (tokens[0] == tokens[3]).astype(jnp.float32) - 0.5 * tokens[1]


@pytest.fixture(scope="module")
def one_per_step():
    model = tiny_model(num_steps=SEQ_LEN)
    return model, jd.optimal_log_twist(model, log_potential)


def test_unmasking_law_matches_enumeration():
    model = tiny_model(num_steps=2)  # two positions per step
    law = jd.model_law(model)
    assert len(law.states) == VOCAB**SEQ_LEN and np.isclose(law.probs.sum(), 1.0)
    num_samples = 4000
    samples = jd.unmask(jax.random.key(1), model, num_samples)
    assert samples.log_probs.shape == (num_samples, 2)
    testing.assert_tv_below((samples.tokens, np.full(num_samples, SEQ_LEN)), law)
    # Per-step log-probabilities: their sum is log p of the tokens given the positions, ≤ 0.
    assert np.all(np.asarray(samples.log_probs) <= 0)


def test_optimal_twist_table_is_log_z(one_per_step):
    model, table = one_per_step
    law = jd.model_law(model)
    z = np.sum(law.probs * np.exp([float(log_potential(jnp.asarray(s))) for s in law.states]))
    np.testing.assert_allclose(table[-1], np.log(z), atol=1e-6)


def test_exact_twist_has_zero_variance(one_per_step):
    model, table = one_per_step
    twist = jd.tabular_log_twist_fn(model)
    for seed in range(3):
        result = jd.twisted_diffusion_smc(jax.random.key(seed), model, log_potential, num_particles=16,
                                          log_twist_fn=twist, twist_params=jnp.asarray(table))
        np.testing.assert_allclose(result.log_weights, table[-1], atol=1e-5)
        np.testing.assert_allclose(result.ess, 16.0, rtol=1e-5)
        assert not np.any(result.resampled)


@pytest.mark.parametrize("twisted", [False, True])
def test_smc_is_unbiased_for_z(one_per_step, twisted):
    model, table = one_per_step
    kwargs = {}
    if twisted:  # an imperfect twist: the exact one plus noise
        noise = np.random.default_rng(0).normal(scale=0.5, size=table.shape)
        kwargs = dict(log_twist_fn=jd.tabular_log_twist_fn(model), twist_params=jnp.asarray(table + noise))
    log_z = np.array([jd.twisted_diffusion_smc(jax.random.key(seed), model, log_potential, num_particles=4,
                                               **kwargs).log_z for seed in range(300)])
    testing.assert_unbiased(np.exp(log_z - table[-1]), 1.0)
    assert np.mean(log_z) <= table[-1] + 4 * np.std(log_z) / np.sqrt(len(log_z))  # Jensen


def test_a_twist_that_kills_particles_leaves_them_dead_not_nan():
    """ψ = 0 on every child at step 2 of states whose position 0 is unmasked; ψ = φ = 1
    otherwise. Those particles keep weight −inf (no NaN one step later) and still end clean;
    the survivors weigh 1 each, so Ẑ is the surviving fraction."""
    model = tiny_model(num_steps=SEQ_LEN)
    mask_id = model.config.mask_id

    def kill(params, tokens, step, features):
        return jnp.where((step == 2) & (tokens[0] != mask_id), -jnp.inf, 0.0) * jnp.ones((SEQ_LEN, VOCAB))

    result, infos = jd.twisted_diffusion_smc(jax.random.key(0), model, lambda tokens: jnp.float32(0.0),
                                             num_particles=32, log_twist_fn=kill, ess_threshold=0.0,
                                             return_infos=True)
    # The twist at step 2 scores the children of the state after two unmaskings.
    dead = np.any(np.asarray(infos.position)[:2] == 0, axis=0)
    assert 0 < dead.sum() < 32
    np.testing.assert_array_equal(np.isneginf(result.log_weights), dead)
    np.testing.assert_allclose(np.asarray(result.log_weights)[~dead], 0.0, atol=1e-5)
    np.testing.assert_allclose(result.log_z, np.log(np.mean(~dead)), atol=1e-5)
    assert not np.any(np.asarray(result.tokens) == mask_id)


def test_bad_configs_raise():
    with pytest.raises(ConfigError, match="num_steps"):
        jd.DiffusionConfig(vocab_size=3, seq_len=4, num_steps=5)
    with pytest.raises(ConfigError, match="one position per step"):
        jd.twisted_diffusion_smc(jax.random.key(0), tiny_model(num_steps=2), log_potential, num_particles=4)


def test_init_is_all_mask_and_documented():
    model = tiny_model(num_steps=SEQ_LEN)
    state = jd.init(model, 3)
    np.testing.assert_array_equal(state.tokens, np.full((3, SEQ_LEN), model.config.mask_id))
    assert state.log_weights.shape == state.log_twist.shape == (3,) and int(state.step) == 0
    assert "int32 `[N, T]`" in jd.init.__doc__
