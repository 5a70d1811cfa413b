"""Baselines: base / low-temperature sampling and (budget-matched) best-of-N."""

import jax
import numpy as np
import pytest

from jaxsample.errors import ArgumentError
from jaxsample import testing
from jaxsample.mcmc import base_sample, best_of_n, temperature_sample

LM = testing.random_tabular_lm(vocab_size=4, max_new_tokens=4, seed=2, temperature=1 / 1.5)
PROMPT = jax.numpy.array([0])
CHAINS, CANDIDATES = 4, 8


@pytest.fixture(scope="module")
def candidates():
    # best_of_n decodes its C·M candidates exactly as base_sample decodes C·M chains.
    return base_sample(jax.random.key(0), LM, PROMPT, num_chains=CHAINS * CANDIDATES, max_new_tokens=4)


def _per_chain(x):
    return np.asarray(x).reshape((CHAINS, CANDIDATES) + np.shape(x)[1:])


@pytest.mark.parametrize("budget", [None, 1, [3, 6, 9, 1000]])
def test_best_of_n_picks_highest_mean_log_likelihood_within_budget(candidates, budget):
    result = best_of_n(jax.random.key(0), LM, PROMPT, CANDIDATES, num_chains=CHAINS, max_new_tokens=4,
                       token_budget=budget)
    lengths = _per_chain(candidates.lengths)
    spent = np.cumsum(lengths, axis=1)
    limit = np.broadcast_to(np.iinfo(np.int32).max if budget is None else budget, (CHAINS,))
    affordable = (spent <= np.asarray(limit)[:, None]) | (np.arange(CANDIDATES) == 0)
    score = np.where(affordable, _per_chain(candidates.log_p).sum(-1) / lengths, -np.inf)
    best = np.argmax(score, axis=1)
    chains = np.arange(CHAINS)
    np.testing.assert_array_equal(result.tokens, _per_chain(candidates.tokens)[chains, best])
    np.testing.assert_array_equal(result.lengths, lengths[chains, best])
    np.testing.assert_array_equal(result.tokens_decoded,
                                  np.sum(np.where(affordable, lengths, 0), axis=1))
    if budget == 1:
        np.testing.assert_array_equal(best, 0)
    if budget is None:
        assert np.any(best > 0)  # a later candidate wins somewhere: selection is exercised


def test_temperature_sample_is_base_sample_at_one_over_alpha():
    low = temperature_sample(jax.random.key(1), LM, PROMPT, 4.0, num_chains=16, max_new_tokens=4)
    base = base_sample(jax.random.key(1), LM, PROMPT, num_chains=16, max_new_tokens=4, temperature=0.25)
    np.testing.assert_array_equal(low.tokens, base.tokens)
    np.testing.assert_array_equal(low.tokens_decoded, low.lengths)
    assert low.info.accepted.shape == (1, 0, 16)


def test_baseline_arguments():
    with pytest.raises(ArgumentError, match="num_candidates"):
        best_of_n(jax.random.key(0), LM, PROMPT, 0, num_chains=1, max_new_tokens=4)
    # Cast to int32 these would truncate (2.5) or wrap (2**32 + 5 -> 5).
    for budget, message in ((2.5, "must hold integers, got dtype float"),
                            (np.int64(2**32 + 5), r"holds 4294967301, outside the int32 range \[0, 2147483648\)"),
                            ([4, -1, 4, 4], r"holds -1 at index \(1,\)")):
        with pytest.raises(ArgumentError, match=f"token_budget {message}"):
            best_of_n(jax.random.key(0), LM, PROMPT, CANDIDATES, num_chains=CHAINS, max_new_tokens=4, token_budget=budget)
    with pytest.raises(ArgumentError, match="alpha"):
        temperature_sample(jax.random.key(0), LM, PROMPT, 0.0, num_chains=1, max_new_tokens=4)
    with pytest.raises(ArgumentError, match="exceeds"):
        base_sample(jax.random.key(0), LM, PROMPT, num_chains=1, max_new_tokens=5)
