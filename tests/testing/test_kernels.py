"""The toolkit rejects the reference-code bugs of power_sampling.md §5, each written as a
small wrong log-ratio function, and accepts the library's ratio on the same kernels."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import testing
from jaxsample.errors import ArgumentError, VerificationError
from jaxsample.mcmc import entropy_jump, log_acceptance_ratio, uniform

SPACE = testing.enumerate_completions(
    testing.random_tabular_lm(vocab_size=4, max_new_tokens=4, seed=2, temperature=1 / 1.5), [0], 4)


class TruncatedCurrentSuffix(testing.PowerLogRatio):
    """§5.1 (Karan's `[idx−c : s−c]`): the current suffix only counts up to the proposal's
    length, so current tokens past the proposal's stop token drop out of both sums."""

    def __call__(self, cut, current, proposed):
        truncated = current._replace(length=jnp.minimum(current.length, proposed.length))
        wrong = log_acceptance_ratio(cut, self.alpha, truncated, proposed, self.cut_law)
        right = log_acceptance_ratio(cut, self.alpha, current, proposed, self.cut_law)
        return wrong.log_power + wrong.log_proposal + right.log_cut


class CurrentLengthCap(testing.PowerLogRatio):
    """§5.2: proposals stop at the current length, so a move can never lengthen the chain
    (modelled here by rejecting every longer proposal), while shortening moves stay possible:
    the reverse of a length-changing move is missing."""

    def __call__(self, cut, current, proposed):
        right = log_acceptance_ratio(cut, self.alpha, current, proposed, self.cut_law).log_ratio
        return jnp.where(proposed.length > current.length, -jnp.inf, right)


class MissingCutTerm(testing.PowerLogRatio):
    """§5.2 / §3: no log c(i | x') − log c(i | x) (for uniform cuts the length term
    log n − log n'; for entropy cuts the reverse-cut normaliser)."""

    def __call__(self, cut, current, proposed):
        parts = log_acceptance_ratio(cut, self.alpha, current, proposed, self.cut_law)
        return parts.log_power + parts.log_proposal


CASES = [
    # (wrong ratio, cut law, α, τ)
    (TruncatedCurrentSuffix, uniform, 2.0, 0.5),
    (TruncatedCurrentSuffix, uniform, 4.0, 1.0),
    (CurrentLengthCap, uniform, 2.0, 0.5),
    (MissingCutTerm, uniform, 2.0, 0.5),
    (MissingCutTerm, entropy_jump(4.0), 4.0, 0.25),
]


@pytest.mark.parametrize("wrong, cut_law, alpha, temperature", CASES,
                         ids=[f"{c[0].__name__}-{'uniform' if c[1] is uniform else 'entropy'}-"
                              f"alpha{c[2]:g}" for c in CASES])
def test_reference_code_bugs_are_rejected(wrong, cut_law, alpha, temperature):
    proposal = js.Proposal(temperature)
    target = testing.power_target(SPACE, alpha)
    right = testing.mh_transition_matrix(SPACE, cut_law, proposal,
                                         testing.power_log_ratio(alpha, cut_law))
    testing.assert_stationary(right, target, atol=1e-12)
    broken = testing.mh_transition_matrix(SPACE, cut_law, proposal, wrong(alpha, cut_law))
    with pytest.raises(VerificationError, match="does not leave the target invariant") as error:
        testing.assert_stationary(broken, target, atol=1e-12)
    # A wide margin, not rounding: the broken kernel's own stationary law is far from π.
    drift = testing.total_variation(testing.stationary_distribution(broken.matrix), target)
    assert drift > 0.02, drift
    assert f"TV {drift:.4f}" in str(error.value)


def test_failure_message_names_the_worst_state():
    alpha = 2.0
    target = testing.power_target(SPACE, alpha)
    kernel = testing.mh_transition_matrix(SPACE, uniform, js.Proposal(0.5),
                                          MissingCutTerm(alpha, uniform))
    moved = target.probs @ kernel.matrix
    worst = int(np.argmax(np.abs(moved - target.probs)))
    with pytest.raises(AssertionError) as error:  # VerificationError is an AssertionError
        testing.assert_stationary(kernel, target)
    message = str(error.value)
    assert f"worst at state {SPACE.sequences[worst]}" in message
    assert f"π = {target.probs[worst]:.6f}, πP = {moved[worst]:.6f}" in message


def test_non_stochastic_and_mismatched_inputs_are_reported():
    target = testing.power_target(SPACE, 2.0)
    kernel = testing.mh_transition_matrix(SPACE, uniform, js.Proposal(0.5),
                                          testing.power_log_ratio(2.0, uniform))
    leaky = kernel.matrix.copy()
    leaky[7, 7] -= 1e-3
    with pytest.raises(VerificationError, match=re.escape(f"row of state {SPACE.sequences[7]} sums to")):
        testing.assert_stationary(leaky, target)
    with pytest.raises(ArgumentError, match="different state lists"):
        testing.assert_stationary(kernel, testing.power_target(SPACE, 2.0, cap=2))
    # A closed class of a reducible kernel: the rows keep their mass.
    with pytest.raises(VerificationError, match="not stochastic"):
        testing.assert_stationary(kernel.restricted(np.arange(121) < 60),
                                  target.restricted(np.arange(121) < 60))


def test_sampler_law_without_steps_is_the_proposal_law():
    proposal = js.Proposal(0.5)
    law = testing.sampler_law(SPACE, uniform, proposal, testing.power_log_ratio(2.0, uniform),
                              block_size=2, num_mcmc_steps=0)
    expected = np.exp([SPACE.log_prob(x, proposal=proposal) for x in SPACE.sequences])
    np.testing.assert_allclose(law.probs, expected, rtol=0, atol=1e-14)
    with pytest.raises(ArgumentError, match="block_size must divide max_new_tokens=4, got 3"):
        testing.sampler_law(SPACE, uniform, proposal, testing.power_log_ratio(2.0, uniform),
                            block_size=3, num_mcmc_steps=1)
