"""Exact targets: tilted laws, log Z and the optimal twist satisfy their defining identities."""

import jax
import numpy as np
import pytest

from jaxsample import testing

ALPHA, LAM = 2.0, 0.7
LM = testing.random_tabular_lm(4, 4, seed=3)
SPACE = testing.enumerate_completions(LM, [0], 4)
REWARD = testing.random_reward(4, 4, seed=4)


def _direct_log_weights(cap=None):
    states = SPACE.states(cap)
    tokens, lengths = SPACE.tokens(states)
    rewards = [float(REWARD(t, n)) if n else 0.0 for t, n in zip(tokens, lengths)]
    return states, np.array([ALPHA * SPACE.log_prob(x) + LAM * r for x, r in zip(states, rewards)])


def test_tilted_target_and_log_z():
    states, log_w = _direct_log_weights()
    target = testing.tilted_target(SPACE, REWARD, ALPHA, LAM)
    assert target.states == tuple(states)
    np.testing.assert_allclose(target.log_z, np.log(np.exp(log_w).sum()), rtol=1e-6)
    np.testing.assert_allclose(target.probs, np.exp(log_w - target.log_z), rtol=1e-5)
    # λ = 0 is the power target.
    power = testing.power_target(SPACE, ALPHA)
    np.testing.assert_allclose(testing.tilted_target(SPACE, REWARD, ALPHA, 0.0).probs, power.probs,
                               rtol=0, atol=1e-15)


def test_value_function_identities():
    value = testing.value_function(SPACE, REWARD, ALPHA, LAM)
    target = testing.tilted_target(SPACE, REWARD, ALPHA, LAM)
    np.testing.assert_allclose(value.log_z, target.log_z, rtol=0, atol=1e-12)
    # The optimal proposal is a normalised law at every open prefix, and its product along a
    # completion is π(y): zero-variance sampling.
    for prefix in SPACE.logits:
        q = np.exp(value.optimal_proposal_log_probs(SPACE, prefix, ALPHA))
        np.testing.assert_allclose(q.sum(), 1.0, rtol=0, atol=1e-12)
    for y, pi in zip(target.states, target.probs):
        log_q = sum(value.optimal_proposal_log_probs(SPACE, y[:t], ALPHA)[y[t]] for t in range(len(y)))
        np.testing.assert_allclose(np.exp(log_q), pi, rtol=1e-9, atol=1e-15)
    # π_t ∝ γ_t V_t is π's marginal at the block cap.
    for cap in (1, 2, 3):
        states, log_gamma = _direct_log_weights(cap)
        log_marginal = log_gamma + np.array([value.log_value[x] for x in states])
        marginal = [target.probs[[y[:cap] == x for y in target.states]].sum() for x in states]
        np.testing.assert_allclose(np.exp(log_marginal - value.log_z), marginal, rtol=1e-5)


def test_value_tables_as_jax_functions():
    value = testing.value_function(SPACE, REWARD, ALPHA, LAM)
    log_value, next_twist = jax.jit(jax.vmap(value.log_value_fn())), value.next_log_twist_fn()
    prefixes = [(), (0,), (1, 2), (2, 0, 1), (0, 3)]
    tokens, lengths = SPACE.tokens(prefixes)
    np.testing.assert_allclose(log_value(tokens, lengths), [value.log_value[p] for p in prefixes],
                               rtol=1e-5, atol=1e-6)
    for p, row, n in zip(prefixes[:4], tokens, lengths):
        np.testing.assert_allclose(next_twist(row, n), value.next_log_twist(p), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="no effect without a reward_fn"):
        testing.value_function(SPACE, None, ALPHA, LAM)
