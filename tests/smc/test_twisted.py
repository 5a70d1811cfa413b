"""Twisted SMC against exact enumeration on a tabular toy (3 tokens + stop, S = 4) with a
terminal potential φ: the optimal twist, unbiasedness of Z_hat, SMC / conditional-SMC bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import testing
from jaxsample.errors import ArgumentError
from jaxsample.smc import twisted_proposal

from . import twist_exact as tx
from .runner import run_twisted

S = tx.S


@pytest.fixture(scope="module")
def toy():
    return tx.make_toy()


@pytest.mark.parametrize("block_size", [1, 3])
def test_optimal_twist_gives_zero_variance(toy, block_size):
    estimates = []
    for seed in range(3):
        result = js.twisted_smc(jax.random.key(seed), toy.lm, tx.PROMPT, tx.table_twist_fn(),
                                toy.optimal, toy.log_phi, num_particles=16, max_new_tokens=S,
                                block_size=block_size)
        # Every final weight is Z: normalised log-weights all −log N, ESS = N at every step.
        np.testing.assert_allclose(result.log_weights, -np.log(16), atol=1e-5)
        np.testing.assert_allclose(result.ess, 16.0, rtol=1e-5)
        assert not np.asarray(result.resampled).any()
        estimates.append(float(result.log_z))
    np.testing.assert_allclose(estimates, toy.sigma.log_z, atol=1e-5)
    assert np.var(estimates) < 1e-10


def _log_z_hats(toy, params, seeds, *, num_particles, twist=True, conditional=False,
                ess_threshold=0.5):
    references = tx.sigma_references(toy, len(seeds), int(seeds[0]) + 7) if conditional else None
    log_z, _, slot0 = run_twisted(seeds, toy.lm, tx.PROMPT, tx.table_twist_fn() if twist else None,
                                  params, toy.log_phi, num_particles=num_particles,
                                  max_new_tokens=S, ess_threshold=ess_threshold,
                                  references=references)
    if conditional:  # particle 0 is the reference throughout
        np.testing.assert_array_equal(slot0, references)
    return np.asarray(log_z, np.float64)


@pytest.mark.parametrize("twist", ["none", "noisy"])
def test_z_hat_is_unbiased(toy, twist):
    # Z_hat / Z averages to 1 over 400 seeds (a t-test at failure_prob 1e-4); mean log Z_hat ≤ log Z.
    noise = np.random.default_rng(3).normal(scale=0.7, size=toy.optimal.shape)
    params = toy.optimal + jnp.asarray(noise, jnp.float32)
    estimates = _log_z_hats(toy, params, np.arange(400), num_particles=4, twist=twist == "noisy")
    testing.assert_unbiased(np.exp(estimates - toy.sigma.log_z), 1.0)
    assert estimates.mean() < toy.sigma.log_z


def test_smc_and_conditional_smc_bracket_log_z(toy):
    # E log Z_hat(SMC) ≤ log Z ≤ E log Z_hat(cSMC), each mean within 3 standard errors of its
    # side, with N = 3 particles and no twist so that both gaps are wide.
    log_z, seeds = toy.sigma.log_z, np.arange(300)
    smc = _log_z_hats(toy, None, seeds, num_particles=3, twist=False, ess_threshold=1.0)
    csmc = _log_z_hats(toy, None, seeds, num_particles=3, twist=False, conditional=True,
                       ess_threshold=1.0)
    se = lambda x: x.std(ddof=1) / np.sqrt(x.size)  # noqa: E731
    assert smc.mean() <= log_z + 3 * se(smc)
    assert csmc.mean() >= log_z - 3 * se(csmc)
    gap_se = np.sqrt(se(smc) ** 2 + se(csmc) ** 2)
    assert csmc.mean() - smc.mean() > 3 * gap_se, (smc.mean(), log_z, csmc.mean())


def test_twisted_proposal_is_p_times_psi(toy):
    # One decode step of the twisted proposal: recorded log q = log p + log ψ − log N_ψ.
    twist_fn = tx.table_twist_fn()
    state = js.init_decode(toy.lm, tx.PROMPT, 64, S, record_twist=True)
    state, _ = js.extend(jax.random.key(0), toy.lm, state, 1,
                         twisted_proposal(twist_fn, toy.optimal))
    log_p = toy.completions.next_log_probs(())
    log_psi = np.asarray(twist_fn(toy.optimal, jnp.zeros(S, jnp.int32), 0, None), np.float64)
    log_q = log_p + log_psi - np.logaddexp.reduce(log_p + log_psi)
    first = np.asarray(state.tokens[:, 0])
    np.testing.assert_allclose(state.log_q[:, 0], log_q[first], atol=1e-5)
    np.testing.assert_allclose(state.log_twist[:, 0], log_psi[first], atol=1e-6)


def test_errors(toy):
    kwargs = dict(num_particles=4, max_new_tokens=S)
    args = (toy.lm, tx.PROMPT, tx.table_twist_fn(), toy.optimal, toy.log_phi)
    with pytest.raises(ArgumentError, match="conditional_sample must have shape"):
        js.twisted_smc(jax.random.key(0), *args, conditional_sample=jnp.zeros(3, jnp.int32),
                       **kwargs)
    with pytest.raises(ArgumentError, match="multinomial"):
        js.twisted_smc(jax.random.key(0), *args, conditional_sample=jnp.zeros(S, jnp.int32),
                       resampler="systematic", **kwargs)
    with pytest.raises(ArgumentError, match="record_twist"):
        state = js.init_decode(toy.lm, tx.PROMPT, 2, S)
        js.extend(jax.random.key(0), toy.lm, state, 1,
                  twisted_proposal(tx.table_twist_fn(), toy.optimal))


@pytest.mark.parametrize("sample, match", [
    (np.array([1.9, 2.5, 3.0, 3.0]), "conditional_sample must hold integers, got dtype float64"),
    (np.array([2**32 + 1, 2, 3, 3], np.int64), r"conditional_sample holds 4294967297 at index \(0,\), outside the vocabulary \[0, "),
], ids=["float", "int64"])
def test_conditional_sample_is_checked_before_the_int32_cast(toy, sample, match):
    # Cast first, [1.9, 2.5, ...] truncated to [1, 2, ...] and 2**32 + 1 wrapped to 1.
    with pytest.raises(ArgumentError, match=match):
        js.twisted_smc(jax.random.key(0), toy.lm, tx.PROMPT, None, None, toy.log_phi,
                       num_particles=4, max_new_tokens=S, conditional_sample=sample)


@pytest.mark.parametrize("returned, shape", [((5,), r"\(4, 5\)"), ((), r"\(4,\)"), ((1,), r"\(4, 1\)")],
                         ids=["V+1", "scalar", "one"])
def test_twist_of_the_wrong_shape_is_named(toy, returned, shape):
    # Unchecked: a raw TypeError / ValueError from the draw, or ([1], broadcast) a NaN weight
    # reported as a NumericalError.
    def log_twist_fn(params, tokens, length, features):
        return jnp.zeros(returned)

    match = rf"log_twist_fn.* must return .* shape \[V\] = \[{toy.lm.vocab_size}\]; vmapped over 4 rows it returned shape {shape}"
    with pytest.raises(ArgumentError, match=match):
        js.twisted_smc(jax.random.key(0), toy.lm, tx.PROMPT, log_twist_fn, None, toy.log_phi,
                       num_particles=4, max_new_tokens=S)
