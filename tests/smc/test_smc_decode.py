"""`smc_decode` end to end: special cases, determinism, recompilation, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import chi2

from jaxsample import testing
from jaxsample.errors import ArgumentError, NumericalError
from jaxsample.sampling import Proposal
from jaxsample.smc import Lookahead, smc_decode
from jaxsample.smc.sampler import _run

S = 4
PROMPT = jnp.array([0], jnp.int32)


@pytest.fixture(scope="module")
def lm():
    return testing.random_tabular_lm(4, S, seed=2)


@pytest.fixture(scope="module")
def space(lm):
    return testing.enumerate_completions(lm, PROMPT, S)


@pytest.fixture(scope="module")
def reward():
    return testing.random_reward(4, S, seed=3)


def test_single_particle_is_plain_sampling_from_the_proposal(lm, space):
    # N = 1, λ = 0: the one weight never triggers a resampling and the output is a draw from
    # q (τ = 1/α = 2/3). Chi-square over the 121 sequences at level 1e-3 on 400 draws, with
    # the rarely-drawn sequences pooled so every expected count is ≥ 5.
    alpha, num = 1.5, 400
    states = space.sequences
    log_q = np.array([space.log_prob(x, proposal=Proposal(1 / alpha)) for x in states])
    counts = np.zeros(len(states))
    for seed in range(num):
        result = smc_decode(jax.random.key(seed), lm, PROMPT, num_particles=1,
                            max_new_tokens=S, alpha=alpha, block_size=2)
        seq = tuple(int(t) for t in result.sample[: result.lengths[0]])
        counts[states.index(seq)] += 1
        assert not result.resampled.any() and result.log_weights[0] == 0.0
        np.testing.assert_allclose(result.ess, 1.0)
        # log Z_hat of one particle is its importance weight α log p − log q.
        log_w = alpha * space.log_prob(seq) - log_q[states.index(seq)]
        np.testing.assert_allclose(result.log_z, log_w, rtol=1e-5, atol=1e-5)
    expected = num * np.exp(log_q)
    common = expected >= 5
    observed = np.append(counts[common], counts[~common].sum())
    expected = np.append(expected[common], expected[~common].sum())
    statistic = np.sum((observed - expected) ** 2 / expected)
    assert statistic < chi2.ppf(1 - 1e-3, df=len(observed) - 1), statistic


def test_power_smc_defaults_to_the_power_proposal(lm, space):
    # λ = 0, α = 4, default τ = 1/α, κ = 0 (never resample): every particle's log-weight is
    # Σ_t log Σ_v p(v | y_<t)^α, independent of the tokens drawn.
    alpha, num = 4.0, 16
    result = smc_decode(jax.random.key(0), lm, PROMPT, num_particles=num,
                        max_new_tokens=S, alpha=alpha, block_size=2, ess_threshold=0.0)
    log_weights = np.asarray(result.log_weights) + float(result.log_z) + np.log(num)
    for i in range(num):
        seq = tuple(int(t) for t in result.tokens[i, : result.lengths[i]])
        expected = sum(logsumexp(alpha * space.next_log_probs(seq[:t])) for t in range(len(seq)))
        np.testing.assert_allclose(log_weights[i], expected, rtol=1e-5, atol=1e-5)


def test_result_fields_determinism_and_no_recompilation(lm, space, reward):
    kwargs = dict(num_particles=8, max_new_tokens=S, block_size=1, num_rejuvenation_steps=1,
                  lookahead=Lookahead(num_rollouts=2, horizon=1))
    first = smc_decode(jax.random.key(0), lm, PROMPT, reward, alpha=2.0, lam=1.0, **kwargs)
    again = smc_decode(jax.random.key(0), lm, PROMPT, reward, alpha=2.0, lam=1.0, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, first, again)

    assert first.tokens.shape == (8, S) and first.log_weights.shape == (8,)
    np.testing.assert_allclose(jax.nn.logsumexp(first.log_weights), 0.0, atol=1e-6)
    steps = first.ess.shape[0]
    histories = (first.num_unique, first.resampled, first.acceptance_rate, first.log_z_history)
    assert 1 <= steps <= S and all(h.shape == (steps,) for h in histories)
    assert first.log_z == first.log_z_history[-1]
    assert (first.done | (first.lengths == S)).all()
    # Pad after the stop token; rewards are those of the final sequences.
    after = np.arange(S)[None, :] >= np.asarray(first.lengths)[:, None]
    assert (np.asarray(first.tokens)[after] == lm.pad_token_id).all()
    finals = [tuple(int(t) for t in row[:n]) for row, n in zip(first.tokens, first.lengths)]
    np.testing.assert_allclose(first.rewards, space.evaluate(reward, finals), rtol=1e-6)
    assert np.isnan(first.acceptance_rate[~first.resampled]).all()
    # Extension, rollouts (2 per particle and step) and rejuvenation all count.
    assert first.num_decoded > int(first.lengths.sum())

    cache_size = _run._cache_size()
    other = smc_decode(jax.random.key(0), lm, PROMPT, reward, alpha=3.0, lam=-0.5,
                       temperature=0.9, top_p=0.95, ess_threshold=0.8, **kwargs)
    assert _run._cache_size() == cache_size  # α, λ, τ, top-p, κ are traced
    assert other.log_z != first.log_z


def test_all_zero_weights_give_minus_inf_log_z_not_an_error(lm):
    def impossible(tokens, length):
        return jnp.where(length > 0, -jnp.inf, 0.0)

    result = smc_decode(jax.random.key(0), lm, PROMPT, impossible, num_particles=4,
                        max_new_tokens=S, lam=1.0)
    assert result.all_zero and result.log_z == -np.inf
    assert np.isneginf(result.log_weights).all() and not result.resampled.any()


def test_nan_reward_raises_numerical_error(lm):
    def broken(tokens, length):
        return jnp.where(length >= 2, jnp.nan, 0.0)

    with pytest.raises(NumericalError, match="NaN or \\+inf at SMC step 1"):
        smc_decode(jax.random.key(0), lm, PROMPT, broken, num_particles=4,
                   max_new_tokens=S, lam=1.0, ess_threshold=0.0)


def test_rollout_lookahead_with_a_hard_constraint_runs_and_nan_still_raises(lm):
    # A broken prefix (reward −inf) gets weight 0; it used to put −inf − (−inf) = NaN into its
    # rollouts' ratios and raise NumericalError. A NaN reward stays an error.
    def no_zeros(tokens, length):
        return jnp.where(jnp.any((jnp.arange(S) < length) & (tokens == 0)), -jnp.inf, 0.0)

    def nan_after_one(tokens, length):
        return jnp.where(length >= 2, jnp.nan, no_zeros(tokens, length))

    options = dict(num_particles=64, max_new_tokens=S, lam=1.0,
                   lookahead=Lookahead(num_rollouts=4, horizon=2))
    result = smc_decode(jax.random.key(0), lm, PROMPT, no_zeros, **options)
    assert np.isfinite(result.log_z) and not result.all_zero
    assert np.isneginf(result.log_weights[np.isneginf(result.rewards)]).all()
    with pytest.raises(NumericalError, match="NaN or \\+inf"):
        smc_decode(jax.random.key(0), lm, PROMPT, nan_after_one, **options)


def test_a_constant_value_offset_leaves_log_z_unchanged():
    # log V_hat ≡ C on unfinished prefixes (V = 1 at the end) multiplies every weight by e^C
    # from the first block to the last, which all particles share (this toy never stops
    # early): the same draws, resamplings and log Z_hat for every C. With the running
    # log-weights a lone float32 near C, each block's increments were rounded at ulp(C)/2,
    # 0.004 at C = 1e5 and 0.5 at 1e7 (the ESS moved by 2e-4 relative, log Z_hat by 0.005,
    # and at 1e7 a resampling changed). The compensated weights leave the float32 rounding of
    # log-weights below 16 (ulp 2e-6): a few roundings in each of 4 blocks, within 2e-5.
    rng = np.random.default_rng(0)
    never_stops = testing.tabular_lm(
        {prefix: [*rng.normal(scale=2.0, size=3), -np.inf] for n in range(S) for prefix in
         itertools.product(range(3), repeat=n)}, vocab_size=4, eos_token_id=3, max_new_tokens=S)
    runs = {}
    for offset in (None, 0.0, 1e5, 1e7):
        lookahead = None if offset is None else (lambda t, n, c=offset: jnp.float32(c))
        runs[offset] = smc_decode(jax.random.key(1), never_stops, PROMPT, num_particles=16,
                                  max_new_tokens=S, alpha=3.0, temperature=1.0,
                                  lookahead=lookahead)
    assert runs[None].resampled.any()
    for result in runs.values():
        np.testing.assert_array_equal(result.tokens, runs[None].tokens)
        np.testing.assert_array_equal(result.resampled, runs[None].resampled)
        np.testing.assert_allclose(result.ess, runs[None].ess, rtol=1e-5)
        np.testing.assert_allclose(result.log_z, runs[None].log_z, atol=2e-5)
        np.testing.assert_allclose(result.log_weights, runs[None].log_weights, atol=2e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), r"alpha must be a number in \(0, inf\), got 0.0"),
    (dict(alpha=float("inf")), r"alpha must be a number in \(0, inf\), got inf"),
    (dict(lam=1.0), "lam=1.0 has no effect without a reward_fn"),
    (dict(num_particles=0), r"num_particles must be an integer in \[1, inf\], got 0"),
    (dict(block_size=5), r"block_size must be an integer in \[1, 4\], got 5"),
    (dict(max_new_tokens=9), "exceeds the 5 positions"),
    (dict(ess_threshold=1.5), r"ess_threshold must be a number in \[0, 1\], got 1.5"),
    (dict(resampler="fancy"), "unknown resampler"),
    (dict(num_rejuvenation_steps=-1), r"num_rejuvenation_steps must be an integer in \[0, inf\]"),
    (dict(lookahead=Lookahead(num_rollouts=0)), r"Lookahead.num_rollouts must be an integer in \[1, inf\], got 0"),
    (dict(lookahead=3), "lookahead must be None"),
    (dict(temperature=0.0), r"temperature must be a number in \(0, inf\), got 0.0"),
    (dict(reward_fn=lambda t, n: jnp.zeros(2), lam=1.0), "one scalar per sequence"),
])
def test_argument_errors(lm, kwargs, message):
    args = dict(num_particles=4, max_new_tokens=S) | kwargs
    with pytest.raises(ArgumentError, match=message):
        smc_decode(jax.random.key(0), lm, PROMPT, **args)


def test_a_batch_of_prompts_needs_a_key_each(lm):
    with pytest.raises(ArgumentError, match=r"key must be 2 PRNG keys"):
        smc_decode(jax.random.key(0), lm, jnp.zeros((2, 1), jnp.int32), num_particles=2,
                   max_new_tokens=S)
