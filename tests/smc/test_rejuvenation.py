"""Rejuvenation moves leave the intermediate target π_t invariant.

The transition matrix comes from `jaxsample.testing.mh_transition_matrix` (every state, cut
and suffix with its probability) with the acceptance ratio supplied by
`jaxsample.smc.move_log_ratio`, in float64.
"""

import typing
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import chi2

import pytest

from jaxsample import testing
from jaxsample.decoding import DecodeState
from jaxsample.mcmc import Trace, uniform
from jaxsample.sampling import Proposal
from jaxsample.smc import Particles, RewardTarget, build_move, make_target, move_log_ratio

S, ALPHA, LAM, TAU = 4, 2.0, 1.5, 0.8
PROPOSAL = Proposal(temperature=TAU)


@pytest.fixture(scope="module")
def space():
    lm = testing.random_tabular_lm(4, S, seed=5, temperature=1 / 1.5)
    return testing.enumerate_completions(lm, [0], S)


@pytest.fixture(scope="module")
def reward():
    return testing.random_reward(4, S, seed=6)


class SMCMoveRatio(NamedTuple):
    """`move_log_ratio` of one move, as a `testing.LogRatioFn`."""

    alpha: float
    lam: float
    reward_fn: object
    log_value_fn: Optional[object] = None

    def __call__(self, cut, current: Trace, proposed: Trace):
        target = RewardTarget(jnp.asarray(self.alpha), jnp.asarray(self.lam), self.reward_fn)

        def particles(trace):
            rows = jax.tree.map(lambda a: a[None], trace)
            decode = DecodeState(rows.tokens, rows.log_p, rows.log_q, rows.entropy, rows.length,
                                 *(None,) * 5)
            log_value = (jax.vmap(self.log_value_fn)(rows.tokens, rows.length)
                         if self.log_value_fn else jnp.zeros_like(rows.log_p[:, 0]))
            return Particles(decode, target.reward(decode), log_value)

        return move_log_ratio(target, cut[None], particles(current), particles(proposed), uniform)[0]


@pytest.mark.parametrize("cap, lookahead", [(4, False), (3, False), (3, True)],
                         ids=["final_block", "prefix_only", "exact_lookahead"])
def test_move_leaves_the_intermediate_target_invariant(space, reward, cap, lookahead):
    value = testing.value_function(space, reward, ALPHA, LAM)
    log_value_fn = value.log_value_fn() if lookahead else None
    gamma = testing.tilted_target(space, reward, ALPHA, LAM, cap)
    log_value = [value.log_value[x] if lookahead else 0.0 for x in gamma.states]
    pi = testing.Distribution.from_log_weights(gamma.states, np.log(gamma.probs) + log_value)

    def kernel(lam, log_value_fn):
        return testing.mh_transition_matrix(space, uniform, PROPOSAL,
                                            SMCMoveRatio(ALPHA, lam, reward, log_value_fn), cap)

    right = kernel(LAM, log_value_fn)
    testing.assert_stationary(right, pi, atol=1e-12)
    assert np.diag(right.matrix).mean() < 0.5  # the chain does move (about 0.2 stays)

    # Negative controls: dropping the reward term, or (lookahead) the value term, leaves
    # max|πP − π| between 2e-3 and 2e-2 here, 13 orders of magnitude above the correct ratio.
    with pytest.raises(AssertionError, match="does not leave the target invariant"):
        testing.assert_stationary(kernel(0.0, log_value_fn), pi, atol=1e-4)
    if lookahead:
        with pytest.raises(AssertionError, match="does not leave the target invariant"):
            testing.assert_stationary(kernel(LAM, None), pi, atol=1e-4)


def test_jitted_moves_keep_exact_samples_exact():
    # N i.i.d. draws from π_3 moved independently by an invariant kernel stay i.i.d. from π_3,
    # so the counts are multinomial(N, π_3): a chi-square test at level 1e-3 (40 states, every
    # expected count ≥ 9 at N = 25000; measured 30 against 72). A move towards the wrong target
    # (no reward) must fail it (measured 1697).
    # A flatter toy than the fixtures keeps every state's expected count large enough.
    lm = testing.random_tabular_lm(4, S, seed=5, temperature=1 / 0.6)
    space = testing.enumerate_completions(lm, [0], S)
    reward_fn = testing.random_reward(4, S, seed=6, scale=0.5)
    alpha, lam, cap, num = 1.3, 1.0, 3, 25_000
    target = testing.tilted_target(space, reward_fn, alpha, lam, cap)
    states, pi = target.states, target.probs
    assert num * pi.min() >= 9
    rng = np.random.default_rng(0)
    start = rng.choice(len(states), size=num, p=pi)
    one_per_state = testing.decode_state(lm, space, states, PROPOSAL)
    decode = jax.jit(lambda state: jax.tree.map(lambda x: x[start], state))(one_per_state)
    particles = Particles(decode, jax.vmap(reward_fn)(decode.tokens, decode.length),
                          jnp.zeros((num,), jnp.float32))
    threshold = chi2.ppf(1 - 1e-3, df=len(states) - 1)

    @jax.jit
    def moves(key, particles, lam):
        target = make_target(alpha, lam, reward_fn)
        move = build_move(lm, target, PROPOSAL, None, uniform)
        def one(particles, key):
            particles, accepted, _, _ = move(key, particles, cap)
            return particles, jnp.mean(accepted)

        particles, acceptance = jax.lax.scan(one, particles, jax.random.split(key, 3))
        return particles, acceptance.mean()

    for move_lam, invariant in [(lam, True), (0.0, False)]:
        moved, acceptance = moves(jax.random.key(1), particles, move_lam)
        assert 0.2 < acceptance < 1.0
        decode = moved.decode
        counts = testing.empirical_distribution((decode.tokens, decode.length), states).probs * num
        statistic = np.sum((counts - num * pi) ** 2 / (num * pi))
        if invariant:
            assert statistic < threshold, (statistic, threshold)
            rescored = jax.vmap(reward_fn)(decode.tokens, decode.length)
            np.testing.assert_allclose(moved.reward, rescored)
        else:
            assert statistic > 10 * threshold, (statistic, threshold)


def test_build_move_annotation_names_the_four_returned_values():
    # move returns (particles, accepted, num_decoded, non_finite), unpacked above.
    returned = typing.get_type_hints(build_move)["return"]
    assert typing.get_args(typing.get_args(returned)[1]) == (Particles, jax.Array, jax.Array, jax.Array)


def test_move_log_ratio_keeps_float32_precision_on_long_suffixes():
    """The move's MH part is the MCMC log r summed per token as α ℓp − ℓq: adding the
    separately summed power and proposal parts cancelled in float32 (the twin of
    tests/mcmc/test_acceptance.py's check, through the SMC move). One next-token law, the
    proposed suffix the current one sorted: the exact log r is 0."""
    n, cut, vocab, alpha = 1024, 7, 32, 50.0
    logits = -0.02 * jnp.arange(vocab, dtype=jnp.float32)
    log_p_v = jax.nn.log_softmax(logits)
    log_q_v = jax.nn.log_softmax(alpha * logits)  # τ = 1/α
    tokens = jax.random.categorical(jax.random.key(1), log_q_v, shape=(n,))

    def trace(tokens):
        return Trace(tokens, log_p_v[tokens], log_q_v[tokens], jnp.zeros(n), jnp.int32(n))

    ratio = SMCMoveRatio(alpha, 0.0, None)(jnp.int32(cut), trace(tokens), trace(tokens.at[cut:].set(jnp.sort(tokens[cut:]))))
    per_token = np.asarray(jnp.float32(alpha) * log_p_v - log_q_v)[np.asarray(tokens)]
    assert abs(float(ratio)) <= n**2 * np.finfo(np.float32).eps * (per_token.max() - per_token.min())
