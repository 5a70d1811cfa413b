"""The jitted sampler against exact laws on tabular toys; determinism, recompilation, errors."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample.errors import ArgumentError
from jaxsample.mcmc import (PowerMHState, build_kernel, entropy_jump, init, power_sample,
                            temperature_sample, uniform)
from jaxsample.mcmc.blocks import _power_sample
from toy_models import TabularLM, karan_du_example, power_target, total_variation

from .exact import exact_chain, sampler_law

TOY = TabularLM.random(seed=2, vocab_size=4, cap=4, scale=1.5)
LM = TOY.lm()
CUT_LAWS = {"uniform": uniform, "entropy": entropy_jump(4.0)}


def _histogram(result, states):
    index = {state: s for s, state in enumerate(states)}
    counts = np.zeros(len(states))
    for row, length in zip(np.asarray(result.tokens), np.asarray(result.lengths)):
        counts[index[tuple(row[:length].tolist())]] += 1
    return counts / counts.sum()


def _tv_bound(law, num_samples, failure=1e-6):
    """A bound TV(empirical, law) stays under with probability ≥ 1 − failure, for
    `num_samples` i.i.d. draws (the chains are independent rows).

    E|p̂_k − law_k| ≤ sd(p̂_k) (Jensen), so E TV ≤ ½ Σ_k sqrt(law_k (1 − law_k) / n); one
    draw moves TV by at most 1/n, so McDiarmid gives P(TV ≥ E TV + t) ≤ exp(−2 n t²).
    """
    mean = 0.5 * np.sum(np.sqrt(law * (1 - law) / num_samples))
    return mean + np.sqrt(np.log(1 / failure) / (2 * num_samples))


@pytest.mark.parametrize("cut", ["uniform", "entropy"])
def test_long_chains_reach_power_target(cut):
    # One block = plain MH on π. The exact law after S steps (start from q, P^S) separates
    # sampling noise from mixing bias: TV(p̂, π) ≤ TV(p̂, law_S) + TV(law_S, π).
    alpha, num_chains, num_steps = 2.0, 16384, 100
    chain = exact_chain(TOY, alpha, CUT_LAWS[cut], 1.0 / alpha)
    pi = power_target(chain.log_p, alpha)
    law = np.exp(chain.log_start) @ np.linalg.matrix_power(chain.transition, num_steps)
    mixing = total_variation(law, pi)
    assert mixing < 1e-3
    result = power_sample(jax.random.key(0), LM, TOY.prompt(), alpha, cut, num_chains,
                          block_size=4, num_mcmc_steps=num_steps, max_new_tokens=4)
    tv = total_variation(_histogram(result, chain.states), pi)
    bound = _tv_bound(law, num_chains) + mixing  # ≈ 0.04
    assert tv < bound, (tv, bound)


def test_low_temperature_samples_fail_the_same_bound():
    alpha, num_chains = 2.0, 16384
    chain = exact_chain(TOY, alpha, uniform, 1.0 / alpha)
    pi = power_target(chain.log_p, alpha)
    result = temperature_sample(jax.random.key(0), LM, TOY.prompt(), alpha, num_chains,
                                max_new_tokens=4)
    # Exact TV(q-law, π) = 0.30.
    assert total_variation(_histogram(result, chain.states), pi) > _tv_bound(pi, num_chains)


# One compiled program serves the block-wise tests: 2 blocks of 2 tokens, 30 steps each.
BLOCKS = dict(num_chains=8192, block_size=2, num_mcmc_steps=30, max_new_tokens=4)


@pytest.fixture(scope="module")
def block_results():
    return {freeze: power_sample(jax.random.key(1), LM, TOY.prompt(), 2.0, "uniform",
                                 freeze_finished=freeze, **BLOCKS)
            for freeze in (True, False)}


@pytest.mark.parametrize("freeze_finished", [True, False])
def test_block_wise_sampler_matches_its_exact_law(block_results, freeze_finished):
    alpha = 2.0
    law = sampler_law(TOY, alpha, uniform, 1.0 / alpha, block_size=2,
                      num_steps=BLOCKS["num_mcmc_steps"], freeze_finished=freeze_finished)
    states = TOY.completions()
    law = np.array([law[state] for state in states])
    pi = power_target([TOY.sequence_log_prob(state) for state in states], alpha)
    # Frozen chains keep block 0's target: 0.037 from π; unfrozen ones reach π.
    assert (total_variation(law, pi) > 0.03) == freeze_finished
    empirical = _histogram(block_results[freeze_finished], states)
    assert total_variation(empirical, law) < _tv_bound(law, BLOCKS["num_chains"])


def test_karan_du_example_is_power_not_low_temperature():
    # Spec §1, α = 2: P(x_0 = a) is 0.16/0.285 = 0.5614 under p^α, 0.16/0.41 = 0.3902 at
    # τ = 1/2. Two blocks of one token, 40 steps each: the exact sampler law is 0.56140.
    toy, alpha, num_chains = karan_du_example(), 2.0, 8192
    law = sampler_law(toy, alpha, uniform, 1.0 / alpha, block_size=1, num_steps=40)
    p_a = sum(mass for state, mass in law.items() if state[0] == 0)
    assert abs(p_a - 0.16 / 0.285) < 1e-4
    lm, prompt = toy.lm(), toy.prompt()
    mh = power_sample(jax.random.key(2), lm, prompt, alpha, "uniform", num_chains,
                      block_size=1, num_mcmc_steps=40, max_new_tokens=2)
    low = temperature_sample(jax.random.key(2), lm, prompt, alpha, num_chains, max_new_tokens=2)
    for result, expected in [(mh, p_a), (low, 0.16 / 0.41)]:
        estimate = float(np.mean(np.asarray(result.tokens[:, 0]) == 0))
        # 5 binomial standard deviations: a false failure has probability < 1e-6.
        assert abs(estimate - expected) < 5 * np.sqrt(expected * (1 - expected) / num_chains)


def test_decoder_values_are_the_exact_model_values():
    proposal = js.Proposal(temperature=0.5, top_k=3).validated()
    state = init(jax.random.key(3), LM, TOY.prompt(), CHAINS, 4, proposal).decode
    for row in range(CHAINS):
        seq = tuple(np.asarray(state.tokens[row, : state.length[row]]).tolist())
        exact = TOY.per_token(seq, lambda h: TOY.log_q(h, 0.5, top_k=3))
        for name in ("log_p", "log_q", "entropy"):
            np.testing.assert_allclose(getattr(state, name)[row, : len(seq)], exact[name],
                                       atol=2e-5)


@partial(jax.jit, static_argnames="cut_law")
def _step(key, state, alpha, cap, active, proposal, cut_law=entropy_jump()):
    return build_kernel(LM, cut_law, proposal)(key, state, alpha, cap, active)


PROPOSAL = js.Proposal(temperature=0.7).validated()
CHAINS = 64
ALL = jnp.ones((CHAINS,), bool)


@pytest.fixture(scope="module")
def chains():
    return init(jax.random.key(4), LM, TOY.prompt(), CHAINS, 4, PROPOSAL)


def test_step_bookkeeping(chains):
    active = jnp.arange(CHAINS) % 4 != 0
    new, info = _step(jax.random.key(5), chains, 3.0, 4, active, PROPOSAL)
    old, new = chains.decode, new.decode
    np.testing.assert_allclose(info.log_ratio, info.log_power + info.log_proposal + info.log_cut,
                               rtol=1e-5, atol=1e-5)
    moved = np.asarray(info.accepted)
    assert 0 < moved.sum() < active.sum()
    assert not np.any(moved & ~np.asarray(active))
    assert np.all(np.asarray(info.tokens_decoded)[~np.asarray(active)] == 0)
    # An accepted chain holds the proposal: prefix up to the cut, then the decoded tokens.
    np.testing.assert_array_equal(np.asarray(new.length - info.cut)[moved],
                                  np.asarray(info.tokens_decoded)[moved])
    for row in np.nonzero(moved)[0]:
        cut = int(info.cut[row])
        np.testing.assert_array_equal(new.tokens[row, :cut], old.tokens[row, :cut])
    for field in ("tokens", "log_p", "log_q", "entropy", "length", "done"):
        np.testing.assert_array_equal(np.asarray(getattr(new, field))[~moved],
                                      np.asarray(getattr(old, field))[~moved])


def test_step_is_the_same_with_and_without_jit(chains):
    # Unjitted, the kernel runs op by op (its decode loops are still XLA while-loops).
    jitted = _step(jax.random.key(6), chains, 2.5, 4, ALL, PROPOSAL)
    eager = build_kernel(LM, entropy_jump(), PROPOSAL)(jax.random.key(6), chains, 2.5, 4, ALL)
    assert np.any(np.asarray(jitted[1].accepted))
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_a_chain_does_not_depend_on_the_other_chains(chains):
    # Same key; chains 1.. replaced by the chains of another run (other lengths, other
    # padding): chain 0's move, its diagnostics and its new state are unchanged.
    other = init(jax.random.key(7), LM, TOY.prompt(), CHAINS, 4, PROPOSAL)
    mixed = PowerMHState(jax.tree.map(lambda a, b: b.at[0].set(a[0]), chains.decode, other.decode))
    assert np.any(np.asarray(mixed.decode.length != chains.decode.length))
    outputs = [_step(jax.random.key(8), s, 2.0, 4, ALL, PROPOSAL) for s in (chains, mixed)]
    for a, b in zip(*[jax.tree.leaves(out) for out in outputs]):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])


def test_same_key_same_result_and_alpha_tau_do_not_recompile(block_results):
    first = block_results[True]
    compiled = _power_sample._cache_size()
    again = power_sample(jax.random.key(1), LM, TOY.prompt(), 2.0, "uniform", **BLOCKS)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = power_sample(jax.random.key(10), LM, TOY.prompt(), 3.0, "uniform", temperature=0.9,
                         top_p=0.8, **BLOCKS)
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(other.tokens))
    assert _power_sample._cache_size() == compiled


def test_result_token_accounting_and_frozen_chains(block_results):
    result = block_results[True]
    extension = result.tokens_decoded - result.accepted_tokens - result.rejected_tokens
    assert np.all(np.asarray(extension) >= 1) and np.all(np.asarray(extension) <= 4)
    # A chain that held a stop token after block 0 is frozen in block 1.
    frozen = ~np.asarray(result.active[1])
    assert 0 < frozen.sum() < BLOCKS["num_chains"]
    assert not np.any(np.asarray(result.info.accepted[1])[:, frozen])
    assert not np.any(np.asarray(result.info.tokens_decoded[1])[:, frozen])
    assert np.all(np.asarray(result.lengths)[frozen] <= 2)
    assert np.all(np.asarray(block_results[False].active))
    after = np.arange(4)[None, :] >= np.asarray(result.lengths)[:, None]
    assert np.all(np.asarray(result.tokens)[after] == LM.pad_token_id)
    assert np.all(np.asarray(result.log_p)[after] == 0)
    rate = np.asarray(result.acceptance_rate)
    assert rate.shape == (2,) and np.all((rate > 0) & (rate < 1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(alpha=0.0), r"alpha must be a number in \(0, inf\), got 0.0"),
        (dict(alpha=-2.0), r"alpha must be a number in \(0, inf\)"),
        (dict(alpha=float("inf")), r"alpha must be a number in \(0, inf\), got inf"),
        (dict(max_new_tokens=np.int64(4), block_size=np.int64(3)), "must divide max_new_tokens=4"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=3), "must divide max_new_tokens"),
        (dict(num_mcmc_steps=-1), "num_mcmc_steps"),
        (dict(num_chains=0), "num_chains"),
        (dict(max_new_tokens=8, block_size=4), "exceeds"),
        (dict(cut="surprisal"), "cut must be"),
        (dict(temperature=0.0), "temperature"),
    ],
)
def test_bad_arguments_raise(overrides, message):
    kwargs = dict(alpha=2.0, **BLOCKS) | overrides
    with pytest.raises(ArgumentError, match=message):
        power_sample(jax.random.key(0), LM, TOY.prompt(), **kwargs)
