"""Exact transition matrices of the library's power-MH move (`jaxsample.testing`).

Toy: 3 tokens + EOS, completions of up to 4 tokens (121 states), Gaussian logits (seed 2,
std 1.5); every state, cut and proposal suffix enumerated in float64. The toolkit's own
negative controls (the reference-code bugs) live in tests/testing/test_kernels.py.
"""

from functools import partial

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

import jaxsample as js
from jaxsample import testing
from jaxsample.mcmc import entropy_jump, log_acceptance_ratio, uniform

LM = testing.random_tabular_lm(vocab_size=4, max_new_tokens=4, seed=2, temperature=1 / 1.5)
SPACE = testing.enumerate_completions(LM, [0], 4)
CUT_LAWS = {"uniform": uniform, "entropy": entropy_jump(4.0)}


def _kernel(alpha, cut, temperature, top_k=0, cap=None):
    cut_law = CUT_LAWS[cut]
    return testing.mh_transition_matrix(SPACE, cut_law, js.Proposal(temperature, top_k),
                                        testing.power_log_ratio(alpha, cut_law), cap)


def _assert_invariant(kernel, target):
    testing.assert_stationary(kernel, target, atol=1e-12)
    np.testing.assert_allclose(testing.stationary_distribution(kernel.matrix), target.probs,
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("cut", ["uniform", "entropy"])
@pytest.mark.parametrize("alpha", [2.0, 4.0])
@pytest.mark.parametrize("low_temperature", [True, False])
def test_kernel_leaves_power_target_invariant(cut, alpha, low_temperature):
    kernel = _kernel(alpha, cut, 1.0 / alpha if low_temperature else 1.0)
    assert len(kernel.states) == 121
    _assert_invariant(kernel, testing.power_target(SPACE, alpha))


@pytest.mark.parametrize("cut", ["uniform", "entropy"])
def test_top_k_kernel_leaves_restricted_target_invariant(cut):
    # Top-k makes the chain reducible: the completions a q-sampled start can reach form a
    # closed class, on which the target is π restricted (full p, not renormalised on top-k).
    alpha = 4.0
    kernel = _kernel(alpha, cut, 1.0 / alpha, top_k=3)
    reachable = kernel.reachable()
    assert 1 < reachable.sum() < len(kernel.states)
    assert np.all(kernel.matrix[reachable][:, ~reachable] == 0)
    _assert_invariant(kernel.restricted(reachable),
                      testing.power_target(SPACE, alpha).restricted(reachable))


@pytest.mark.parametrize("cut", ["uniform", "entropy"])
def test_block_kernel_leaves_prefix_target_invariant(cut):
    # Block cap 2 < 4: states are completions of ≤ 2 tokens or unterminated 2-token
    # prefixes, with the prefix marginal p(x_{≤2}) (no stop factor) as the base.
    alpha = 4.0
    kernel = _kernel(alpha, cut, 1.0 / alpha, cap=2)
    assert len(kernel.states) == 13
    _assert_invariant(kernel, testing.power_target(SPACE, alpha, cap=2))


@pytest.mark.parametrize("top_k", [0, 3])
def test_power_and_proposal_terms_are_log_normaliser_differences(top_k):
    # With q ∝ p^α on a fixed support K_h, α ℓp − ℓq = log Z_α(h) per token, so
    # log_power + log_proposal = Σ_{x'} log Z − Σ_x log Z over the suffixes from the cut.
    alpha = 3.0
    proposal = js.Proposal(1.0 / alpha, top_k)
    states = [x for x in SPACE.sequences if np.isfinite(SPACE.log_prob(x, proposal=proposal))]
    assert 20 < len(states) <= 121
    traces = SPACE.traces(states, proposal)

    def log_normaliser(prefix):
        support = np.isfinite(SPACE.proposal_log_probs(prefix, proposal))
        return logsumexp(alpha * SPACE.next_log_probs(prefix)[support])

    log_z = np.zeros(traces.log_p.shape)
    for s, state in enumerate(states):
        log_z[s, : len(state)] = [log_normaliser(state[:t]) for t in range(len(state))]
    # Every pair (x, x') and cut i ≤ their common prefix, i < n, n'.
    x, y, cut = zip(*[(a, b, i) for a in range(len(states)) for b in range(len(states))
                      for i in range(min(len(states[a]), len(states[b])))
                      if states[a][:i] == states[b][:i]])
    x, y, cut = map(np.array, (x, y, cut))
    ratio = jax.jit(jax.vmap(partial(log_acceptance_ratio, cut_law=uniform), in_axes=(0, None, 0, 0)))
    with jax.enable_x64(True):
        parts = ratio(cut, alpha, jax.tree.map(lambda a: a[x], traces),
                      jax.tree.map(lambda a: a[y], traces))
        measured = np.asarray(parts.log_power + parts.log_proposal)
    after_cut = np.arange(4)[None, :] >= cut[:, None]
    expected = np.sum(np.where(after_cut, log_z[y] - log_z[x], 0.0), axis=1)
    np.testing.assert_allclose(measured, expected, rtol=0, atol=1e-12)


def test_total_variation_of_a_sharp_power_target_stays_within_one():
    # At α = 1000 the target's probabilities sum to 1 + 1e-14, and a law on a state the
    # target gives probability 0 lies at TV 1: the unnormalised sum made it 1 + 6e-15, which
    # chain_histogram_tv then refused as a bias.
    pi = testing.power_target(SPACE, 1000.0)
    assert pi.probs.sum() > 1 + 1e-14
    state = int(np.argmin(pi.probs))
    assert pi.probs[state] == 0
    tv = testing.total_variation(np.eye(len(pi.probs))[state], pi)
    assert tv == 1.0
    check = testing.chain_histogram_tv(SPACE.tokens([SPACE.sequences[state]] * 8), pi, bias=tv)
    assert check.tv == 1.0 <= check.bound
    # Normalising needs a law's total: a zero or negative one is refused, not divided by.
    for bad in (np.zeros(len(pi.probs)), -np.eye(len(pi.probs))[state]):
        with pytest.raises(js.errors.ArgumentError, match="p must be a law with a positive finite total"):
            testing.total_variation(bad, pi)
