"""Rejuvenation moves leave the intermediate target π_t invariant.

The transition matrix is built by `tests/mcmc/exact.py` (every state, cut and suffix with its
probability) with the acceptance ratio supplied by `jaxsample.smc.move_log_ratio`, in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chi2

from jaxsample.decoding import DecodeState
from jaxsample.mcmc import uniform
from jaxsample.sampling import Proposal
from jaxsample.smc import Particles, RewardTarget, build_move, make_target, move_log_ratio
from mcmc.exact import exact_chain
from toy_models import TabularLM

from . import exact

S, ALPHA, LAM, TAU = 4, 2.0, 1.5, 0.8


@pytest.fixture(scope="module")
def toy():
    return TabularLM.random(5)


@pytest.fixture(scope="module")
def reward():
    return exact.PrefixTable.random(6, 4, S)


def _smc_ratio(lam, reward, value):
    """A `mcmc.exact` ratio function computed by `move_log_ratio` on traces."""
    reward_fn = reward.jax_fn

    def ratio(cut, alpha, current, proposed, cut_law):
        target = RewardTarget(jnp.asarray(alpha), jnp.asarray(lam), reward_fn)

        def particles(trace):
            decode = DecodeState(trace.tokens, trace.log_p, trace.log_q, trace.entropy,
                                 trace.length, *(None,) * 5)
            log_value = (jax.vmap(value.jax_fn)(trace.tokens, trace.length) if value
                         else jnp.zeros_like(trace.length, dtype=trace.log_p.dtype))
            return Particles(decode, target.reward(decode), log_value)

        return move_log_ratio(target, cut, particles(current), particles(proposed), cut_law)

    return ratio


@pytest.mark.parametrize("cap, lookahead", [(4, False), (3, False), (3, True)],
                         ids=["final_block", "prefix_only", "exact_lookahead"])
def test_move_leaves_the_intermediate_target_invariant(toy, reward, cap, lookahead):
    value = exact.value_table(toy, ALPHA, LAM, reward, S) if lookahead else None
    states, pi = exact.target(toy, cap, ALPHA, LAM, reward, value)
    chain = exact_chain(toy, ALPHA, uniform, temperature=TAU, cap=cap,
                        ratio=_smc_ratio(LAM, reward, value))
    assert chain.states == states
    transition = chain.transition
    assert transition.min() >= 0
    np.testing.assert_allclose(transition.sum(1), 1.0, atol=1e-12)
    assert np.abs(pi @ transition - pi).max() < 1e-12
    assert np.diag(transition).mean() < 0.5  # the chain does move (about 0.2 stays)

    # Negative controls: dropping the reward term, or (lookahead) the value term, leaves
    # max|πP − π| between 2e-3 and 2e-2 here, 13 orders of magnitude above the correct ratio.
    wrong_reward = exact_chain(toy, ALPHA, uniform, temperature=TAU, cap=cap,
                               ratio=_smc_ratio(0.0, reward, value)).transition
    assert np.abs(pi @ wrong_reward - pi).max() > 1e-4
    if lookahead:
        without_value = exact_chain(toy, ALPHA, uniform, temperature=TAU, cap=cap,
                                    ratio=_smc_ratio(LAM, reward, None)).transition
        assert np.abs(pi @ without_value - pi).max() > 1e-4


def test_jitted_moves_keep_exact_samples_exact():
    # N i.i.d. draws from π_3 moved independently by an invariant kernel stay i.i.d. from π_3,
    # so the counts are multinomial(N, π_3): a chi-square test at level 1e-3 (40 states, every
    # expected count ≥ 9 at N = 25000; measured 30 against 72). A move towards the wrong target
    # (no reward) must fail it (measured 1697).
    # A flatter toy than the fixtures keeps every state's expected count large enough.
    toy, reward = TabularLM.random(5, scale=0.6), exact.PrefixTable.random(6, 4, S, scale=0.5)
    alpha, lam, cap, num = 1.3, 1.0, 3, 25_000
    states, pi = exact.target(toy, cap, alpha, lam, reward)
    assert num * pi.min() >= 9
    rng = np.random.default_rng(0)
    start = rng.choice(len(states), size=num, p=pi)
    lm = toy.lm()
    one_per_state = exact.decode_state(toy, lm, states, S, temperature=TAU)
    decode = jax.jit(lambda state: jax.tree.map(lambda x: x[start], state))(one_per_state)
    reward_fn = reward.jax_fn
    particles = Particles(decode, jax.vmap(reward_fn)(decode.tokens, decode.length),
                          jnp.zeros((num,), jnp.float32))
    threshold = chi2.ppf(1 - 1e-3, df=len(states) - 1)

    @jax.jit
    def moves(key, particles, lam):
        target = make_target(alpha, lam, reward_fn)
        move = build_move(lm, target, Proposal(temperature=TAU), None, uniform)
        def one(particles, key):
            particles, accepted, _ = move(key, particles, cap)
            return particles, jnp.mean(accepted)

        particles, acceptance = jax.lax.scan(one, particles, jax.random.split(key, 3))
        return particles, acceptance.mean()

    for move_lam, invariant in [(lam, True), (0.0, False)]:
        moved, acceptance = moves(jax.random.key(1), particles, move_lam)
        assert 0.2 < acceptance < 1.0
        decode = moved.decode
        counts = exact.histogram(states, np.asarray(decode.tokens), np.asarray(decode.length)) * num
        statistic = np.sum((counts - num * pi) ** 2 / (num * pi))
        if invariant:
            assert statistic < threshold, (statistic, threshold)
            rescored = jax.vmap(reward_fn)(decode.tokens, decode.length)
            np.testing.assert_allclose(moved.reward, rescored)
        else:
            assert statistic > 10 * threshold, (statistic, threshold)
