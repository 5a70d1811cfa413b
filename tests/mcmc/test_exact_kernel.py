"""Exact transition matrices of the power-MH move: invariance, and controls that break it.

Toy: 3 tokens + EOS, completions of up to 4 tokens (121 states), Gaussian logits (seed 2,
std 1.5); every state, cut and proposal suffix enumerated in float64 (`exact.py`).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from jaxsample.mcmc import entropy_jump, uniform
from toy_models import TabularLM, power_target, total_variation

from .exact import enumerate_moves, exact_chain, move_log_ratios, ratio_components, stationary

TOY = TabularLM.random(seed=2, vocab_size=4, cap=4, scale=1.5)
CUT_LAWS = {"uniform": uniform, "entropy": entropy_jump(4.0)}


def _assert_invariant(transition, pi):
    assert np.all(transition >= 0)
    np.testing.assert_allclose(transition.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert np.max(np.abs(pi @ transition - pi)) < 1e-12
    np.testing.assert_allclose(stationary(transition), pi, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cut", ["uniform", "entropy"])
@pytest.mark.parametrize("alpha", [2.0, 4.0])
@pytest.mark.parametrize("low_temperature", [True, False])
def test_kernel_leaves_power_target_invariant(cut, alpha, low_temperature):
    temperature = 1.0 / alpha if low_temperature else 1.0
    chain = exact_chain(TOY, alpha, CUT_LAWS[cut], temperature)
    assert len(chain.states) == 121
    _assert_invariant(chain.transition, power_target(chain.log_p, alpha))


@pytest.mark.parametrize("cut", ["uniform", "entropy"])
def test_top_k_kernel_leaves_restricted_target_invariant(cut):
    # Top-k makes the chain reducible: the completions a q-sampled start can reach form a
    # closed class, on which the target is π restricted (full p, not renormalised on top-k).
    alpha = 4.0
    chain = exact_chain(TOY, alpha, CUT_LAWS[cut], 1.0 / alpha, top_k=3)
    reachable = np.isfinite(chain.log_start)
    assert 1 < reachable.sum() < len(chain.states)
    inside = chain.transition[reachable][:, reachable]
    assert np.all(chain.transition[reachable][:, ~reachable] == 0)
    _assert_invariant(inside, power_target(chain.log_p[reachable], alpha))


@pytest.mark.parametrize("cut", ["uniform", "entropy"])
def test_block_kernel_leaves_prefix_target_invariant(cut):
    # Block cap 2 < 4: states are completions of ≤ 2 tokens or unterminated 2-token
    # prefixes, with the prefix marginal p(x_{≤2}) (no stop factor) as the base.
    alpha = 4.0
    chain = exact_chain(TOY, alpha, CUT_LAWS[cut], 1.0 / alpha, cap=2)
    assert len(chain.states) == 13
    _assert_invariant(chain.transition, power_target(chain.log_p, alpha))


def _without_cut_term(cut, alpha, current, proposed, cut_law):
    parts = ratio_components(cut, alpha, current, proposed, cut_law)
    return parts.log_power + parts.log_proposal


def _truncated_current_suffix(cut, alpha, current, proposed, cut_law):
    # Reference-code bug: the current suffix only counts up to the proposal's length.
    truncated = current._replace(length=jnp.minimum(current.length, proposed.length))
    wrong = ratio_components(cut, alpha, truncated, proposed, cut_law)
    right = ratio_components(cut, alpha, current, proposed, cut_law)
    return wrong.log_power + wrong.log_proposal + right.log_cut


# Measured TV(stationary, π) on TOY: entropy cut without reverse term 0.039 (α=2), 0.042
# (α=4); uniform without log n − log n' 0.112, 0.119; truncated suffix (uniform, τ=1/α)
# 0.027, 0.092 and (τ=1) 0.100, 0.344. The correct kernel is at 1e-14.
@pytest.mark.parametrize(
    "cut, ratio, alpha, low_temperature",
    [
        ("entropy", _without_cut_term, 2.0, True),
        ("entropy", _without_cut_term, 4.0, True),
        ("uniform", _without_cut_term, 2.0, True),
        ("uniform", _without_cut_term, 4.0, True),
        ("uniform", _truncated_current_suffix, 2.0, True),
        ("uniform", _truncated_current_suffix, 4.0, False),
    ],
)
def test_broken_ratios_are_not_invariant(cut, ratio, alpha, low_temperature):
    temperature = 1.0 / alpha if low_temperature else 1.0
    chain = exact_chain(TOY, alpha, CUT_LAWS[cut], temperature, ratio=ratio)
    pi = power_target(chain.log_p, alpha)
    assert np.max(np.abs(pi @ chain.transition - pi)) > 1e-3
    assert total_variation(stationary(chain.transition), pi) > 0.02


@pytest.mark.parametrize("top_k", [0, 3])
def test_power_and_proposal_terms_are_log_normaliser_differences(top_k):
    # With q ∝ p^α on a fixed support K_h, α ℓp − ℓq = log Z_α(h) per token, so
    # log_power + log_proposal = Σ_{x'} log Z − Σ_x log Z over the suffixes.
    alpha = 3.0
    moves = enumerate_moves(TOY, uniform, 1.0 / alpha, top_k=top_k)

    def log_normaliser(prefix):
        log_p = TOY.log_p(prefix)
        support = np.isfinite(TOY.log_q(prefix, 1.0 / alpha, top_k))
        return logsumexp(alpha * log_p[support])

    log_z = np.zeros(moves.traces.log_p.shape)
    for s, state in enumerate(moves.states):
        log_z[s, : len(state)] = [log_normaliser(state[:t]) for t in range(len(state))]
    after_cut = np.arange(TOY.cap)[None, :] >= moves.cut[:, None]
    expected = np.sum(np.where(after_cut, log_z[moves.proposed] - log_z[moves.current], 0.0), 1)
    power_and_proposal = move_log_ratios(moves, alpha, uniform, ratio=_without_cut_term)
    # Under top-k only current states the proposal can produce have finite ℓq.
    sampled = np.isfinite(moves.traces.log_q.sum(axis=1))[moves.current]
    assert sampled.sum() > 100
    np.testing.assert_allclose(power_and_proposal[sampled], expected[sampled], rtol=0, atol=1e-12)
