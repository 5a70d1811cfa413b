"""SMC over a batch of prompts: every prompt's particles run what they would alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from jaxsample import models, testing
from jaxsample.errors import ArgumentError
from jaxsample.smc import Lookahead, SMCResult, build_kernel, init, make_target, resample_if_needed, smc_decode
from jaxsample.smc.twisted import twisted_smc
from jaxsample.sampling import Proposal
from tests.models.test_kv_cache import CONFIG, random_params

EXACT = ("tokens", "lengths", "done", "sample_index", "num_unique", "resampled", "num_decoded", "all_zero")


def _count(token, tokens, length):
    return jnp.sum((tokens == token) & (jnp.arange(tokens.shape[0]) < length)).astype(jnp.float32)


def _tiny_transformer():
    return models.make_language_model(CONFIG, random_params(CONFIG, 0), name="tiny")


def _assert_same_run(batch: SMCResult, alone: SMCResult, prompt: int):
    for name in SMCResult._fields:
        got, want = np.asarray(getattr(batch, name)), np.asarray(getattr(alone, name))
        message = f"{name} of prompt {prompt}"
        if name in EXACT:
            np.testing.assert_array_equal(got, want, err_msg=message)
        else:  # the batched matmuls may round differently
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=message)


@pytest.mark.parametrize("model", ["tabular", "transformer"])
def test_a_batch_of_prompts_gives_each_prompt_its_own_run(model):
    if model == "tabular":  # prompt 2's reward favours short answers: its run ends first
        lm, prompts = testing.random_tabular_lm(4, 4, seed=2), [[0], [1], [2]]
        short = testing.prefix_table_fn(lambda prefix: -4.0 * sum(token != 3 for token in prefix), 4, 4)
        rewards = [testing.random_reward(4, 4, seed=3), testing.random_reward(4, 4, seed=4), short]
        settings = dict(num_particles=8, max_new_tokens=4, block_size=1, ess_threshold=0.9,
                        num_rejuvenation_steps=1)
    else:  # prompts of three lengths share one padded prefill; Monte Carlo lookahead
        lm, prompts = _tiny_transformer(), [[3, 1, 4, 1, 5], [2, 7], [9, 2, 6, 5, 3, 5, 8]]
        rewards = [Partial(_count, jnp.int32(token)) for token in (4, 7, 11)]
        settings = dict(num_particles=4, max_new_tokens=6, block_size=2, ess_threshold=1.0,
                        num_rejuvenation_steps=1, lookahead=Lookahead(2, 2))
    # Each prompt with its own α and λ (the default τ = 1/α too), and top-p on the transformer.
    per_prompt = dict(alpha=[2.0, 1.0, 3.0], lam=[1.5, 0.5, 2.0])
    if model == "transformer":
        per_prompt.update(top_p=[1.0, 0.9, 1.0])
    keys = jax.random.split(jax.random.key(7), len(prompts))
    batch = smc_decode(keys, lm, prompts, rewards, **{name: jnp.asarray(v) for name, v in per_prompt.items()},
                       **settings)
    assert isinstance(batch, list) and len(batch) == len(prompts)
    for p, prompt in enumerate(prompts):
        own = {name: values[p] for name, values in per_prompt.items()}
        alone = smc_decode(keys[p], lm, jnp.asarray(prompt, jnp.int32), rewards[p], **own, **settings)
        _assert_same_run(batch[p], alone, p)
    # Each run resampled and moved particles, and differs from the others.
    assert all(run.resampled.any() for run in batch)
    assert all(np.nanmax(np.asarray(run.acceptance_rate)) > 0 for run in batch)
    assert len({np.asarray(run.tokens).tobytes() for run in batch}) == len(prompts)
    if model == "tabular":  # trimmed to each run's own number of blocks
        assert len({run.ess.shape[0] for run in batch}) > 1, [run.ess.shape for run in batch]


def test_one_reward_serves_every_prompt_of_a_batch():
    lm, prompts = testing.random_tabular_lm(4, 4, seed=2), [[0], [1]]
    reward = testing.random_reward(4, 4, seed=3)
    keys = jax.random.split(jax.random.key(1), 2)
    settings = dict(num_particles=8, max_new_tokens=4, block_size=2, alpha=1.5, lam=2.0)
    batch = smc_decode(keys, lm, prompts, reward, **settings)
    for p, prompt in enumerate(prompts):
        _assert_same_run(batch[p], smc_decode(keys[p], lm, jnp.asarray(prompt), reward, **settings), p)


def test_twisted_smc_on_a_batch_of_prompts_is_each_prompts_run():
    lm, prompts = testing.random_tabular_lm(4, 4, seed=2), [[0], [2]]
    log_potential = testing.random_reward(4, 4, seed=6)
    keys = jax.random.split(jax.random.key(3), 2)
    settings = dict(num_particles=8, max_new_tokens=4, block_size=1, ess_threshold=1.0)
    batch = twisted_smc(keys, lm, prompts, None, None, log_potential, **settings)
    for p, prompt in enumerate(prompts):
        alone = twisted_smc(keys[p], lm, jnp.asarray(prompt), None, None, log_potential, **settings)
        _assert_same_run(batch[p], alone, p)
    with pytest.raises(ArgumentError, match="conditional_sample clamps one reference sequence"):
        twisted_smc(keys, lm, prompts, None, None, log_potential, conditional_sample=jnp.zeros(4, jnp.int32),
                    **settings)


def test_kernel_steps_a_finished_prompt_no_further():
    # Prompt 1's reward favours short answers: once all its particles have stopped, its group
    # neither resamples nor changes, while prompt 0's particles go on.
    lm, n = testing.random_tabular_lm(4, 4, seed=2), 6
    short = testing.prefix_table_fn(lambda prefix: -4.0 * sum(token != 3 for token in prefix), 4, 4)
    target = make_target(1.0, 1.5, [testing.random_reward(4, 4, seed=3), short])
    state = init(lm, jnp.array([[0], [1]], jnp.int32), n, 4, jnp.array([1, 1], jnp.int32))
    step = jax.jit(build_kernel(lm, Proposal(1.0), target, block_size=1, ess_threshold=1.0))
    keys = jax.random.split(jax.random.key(0), 2)
    finished_steps = 0
    for index in range(4):
        before = state
        state, info = step(jax.vmap(jax.random.fold_in, (0, None))(keys, index), state)
        assert info.ess.shape == (2,) and info.ancestors.shape == (2, n) and info.non_finite.shape == (2, n)
        if np.asarray(before.particles.decode.done[n:]).all():
            finished_steps += bool(info.num_decoded[0] > 0)
            assert not info.resampled[1] and info.num_decoded[1] == 0
            for name in ("log_weights", "log_weight_residual"):
                np.testing.assert_array_equal(getattr(state, name)[n:], getattr(before, name)[n:])
            np.testing.assert_array_equal(state.particles.decode.tokens[n:], before.particles.decode.tokens[n:])
    assert finished_steps > 0  # prompt 1 was done while prompt 0 still decoded


def test_grouped_resampling_is_each_groups_own():
    n = 6
    keys = jax.random.split(jax.random.key(4), 3)
    skewed = jnp.log(jnp.array([8.0, 1, 1, 1, 1, 1]))
    log_weights = jnp.stack([jnp.zeros(n), skewed, skewed[::-1]])
    particles = jnp.arange(3 * n, dtype=jnp.float32)
    new, weights, info = resample_if_needed(keys, log_weights, particles, 0.9, "systematic")
    np.testing.assert_array_equal(info.resampled, [False, True, True])
    np.testing.assert_array_equal(new[:n], particles[:n])
    np.testing.assert_array_equal(weights[0], log_weights[0])
    np.testing.assert_array_equal(info.ancestors[0], np.arange(n))
    for group in (1, 2):
        rows = slice(group * n, (group + 1) * n)
        alone, alone_weights, alone_info = resample_if_needed(
            keys[group], log_weights[group], particles[rows], 0.9, "systematic")
        np.testing.assert_array_equal(new[rows], alone)
        np.testing.assert_array_equal(weights[group], alone_weights)
        np.testing.assert_array_equal(info.ancestors[group], alone_info.ancestors)
        assert alone_info.resampled and alone_info.ancestors.shape == (n,)
    assert np.asarray(new[n:]).min() >= n  # no group drew another group's particle


def test_per_prompt_rewards_are_checked():
    lm = testing.random_tabular_lm(4, 4, seed=2)
    keys = jax.random.split(jax.random.key(0), 2)
    settings = dict(num_particles=2, max_new_tokens=4, lam=1.0)
    with pytest.raises(ArgumentError, match="3 per-prompt rewards for 2 prompts"):
        smc_decode(keys, lm, [[0], [1]], [testing.random_reward(4, 4)] * 3, **settings)
    with pytest.raises(ArgumentError, match=r"reward_fn\[1\] must be a jax.tree_util.Partial"):
        smc_decode(keys, lm, [[0], [1]], [testing.random_reward(4, 4), lambda t, n: 0.0], **settings)
    with pytest.raises(ArgumentError, match=r"reward_fn\[1\]'s arrays have shapes"):
        smc_decode(keys, lm, [[0], [1]], [testing.random_reward(4, 4), testing.random_reward(4, 3)], **settings)
    with pytest.raises(ArgumentError, match=r"reward_fn\[1\] is not a Partial of the same function"):
        smc_decode(keys, lm, [[0], [1]], [Partial(_count, 1), testing.random_reward(4, 4)], **settings)
