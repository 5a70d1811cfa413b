"""Twist learning on a tabular toy (3 tokens + stop, S = 4) with a terminal potential: the
weighted-MLE projection, TRI-TSMC and CTL against untwisted SMC, checkpoint resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp
from scipy.stats import f as f_distribution

import jaxsample as js
from jaxsample.errors import ArgumentError
from jaxsample.smc import path_log_q, teacher_forced_paths, tri_loss
from toy_models import TabularLM

from . import twist_exact as tx
from .runner import run_twisted

S = 4


@pytest.fixture(scope="module")
def toy():
    return TabularLM.random(5, scale=1.0)


@pytest.fixture(scope="module")
def lm(toy):
    return toy.lm()


@pytest.fixture(scope="module")
def log_phi(toy):
    return tx.terminal_table(toy, 6, S)


@pytest.fixture(scope="module")
def twist_fn(toy):
    return tx.table_twist_fn(toy.vocab_size, S)


@pytest.fixture(scope="module")
def zeros(log_phi):
    return jnp.zeros(log_phi.values.shape, jnp.float32)


def test_weighted_mle_projection_reaches_the_tempered_target(toy, lm, log_phi, twist_fn, zeros):
    # Every completion as a path; Q̃_β ∝ p^{1−β} σ^β (Q_0 = p: the zero twist), β = 0.6.
    # The tabular twist family holds every autoregressive law with p's support, so the
    # weighted MLE must reach KL(Q̃ ‖ Q_θ) ≈ 0.
    states = toy.completions(S)
    tokens = np.stack([tx.padded(x, S, lm.pad_token_id) for x in states])
    lengths = np.array([len(x) for x in states], np.int32)
    log_p = np.array([toy.sequence_log_prob(x) for x in states])
    potential = np.array([log_phi[x] for x in states])
    log_target = 0.6 * potential + log_p  # (1 − β) log p + β (log p + log φ)
    weights = np.exp(log_target - logsumexp(log_target))
    paths = teacher_forced_paths(lm, toy.prompt(), tokens, lengths, potential)

    def kl(params):
        log_q = np.asarray(path_log_q(twist_fn, params, paths)[0][0].sum(-1), np.float64)
        return float(np.sum(weights * (np.log(weights) - log_q)))

    optimizer = optax.adam(0.1)

    @jax.jit
    def fit(params):
        def step(carry, _):
            p, state = carry
            grads = jax.grad(tri_loss)(p, twist_fn, paths, jnp.asarray(weights, jnp.float32)[None])
            updates, state = optimizer.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), None
        return jax.lax.scan(step, (params, optimizer.init(params)), None, 600)[0][0]

    before, fitted = kl(zeros), kl(fit(zeros))
    assert before > 0.05
    assert fitted < 1e-4, (before, fitted)


def _untwisted_and(lm, toy, log_phi, twist_fn, params, seeds):
    """log Z_hat and final ESS of N = 8 paths with κ = 0 (importance sampling with the
    twist-induced proposal): both methods fit the path proposal, while the resampling schedule
    also depends on the twist's level, which TRI's projection leaves free."""
    prompt = toy.prompt()
    runs = [run_twisted(seeds, lm, prompt, fn, p, log_phi.jax_fn, num_particles=8,
                        max_new_tokens=S, ess_threshold=0.0)
            for fn, p in ((None, None), (twist_fn, params))]
    return [(np.asarray(z, np.float64), np.asarray(e, np.float64)[:, -1]) for z, e, _ in runs]


@pytest.mark.parametrize("method, iterations, fit_steps, lr", [("tri", 8, 20, 0.1),
                                                               ("ctl", 30, 1, 0.3)])
def test_learned_twist_beats_untwisted_smc(toy, lm, log_phi, twist_fn, zeros, method, iterations,
                                          fit_steps, lr):
    params, history = js.learn_twist(
        jax.random.key(0), lm, [toy.prompt()], log_phi.jax_fn, method=method,
        num_iterations=iterations, kl_budget=0.5, num_particles=32, max_new_tokens=S,
        log_twist_fn=twist_fn, twist_params=zeros, learning_rate=lr, num_fit_steps=fit_steps)
    assert len(history) == iterations
    assert all(0 < h["beta"] <= 1 for h in history)
    if method == "tri":  # the budget binds at the start (ESS of 32 untwisted paths is low)
        assert history[0]["beta"] < 1 and abs(history[0]["kl"] - 0.5) < 1e-4
    else:
        assert all(h["beta"] == 1 for h in history)
    # 300 fresh seeds. Variance of log Z_hat: one-sided F test at level 1e-3 that the learned
    # twist's variance is below the untwisted one's; final ESS: the mean difference exceeds 3
    # standard errors.
    seeds = np.arange(10_000, 10_300)
    (z0, e0), (z1, e1) = _untwisted_and(lm, toy, log_phi, twist_fn, params, seeds)
    ratio = z1.var(ddof=1) / z0.var(ddof=1)
    assert ratio < f_distribution.ppf(1e-3, len(seeds) - 1, len(seeds) - 1), ratio
    difference = e1 - e0
    assert difference.mean() > 3 * difference.std(ddof=1) / np.sqrt(len(seeds)), difference.mean()


def test_checkpoint_resume_continues_where_it_stopped(toy, lm, log_phi, twist_fn, zeros, tmp_path):
    kwargs = dict(method="tri", kl_budget=0.5, num_particles=16, max_new_tokens=S,
                  log_twist_fn=twist_fn, twist_params=zeros, num_fit_steps=3)
    key = jax.random.key(1)
    straight, straight_history = js.learn_twist(key, lm, [toy.prompt()], log_phi.jax_fn,
                                                num_iterations=4, **kwargs)
    js.learn_twist(key, lm, [toy.prompt()], log_phi.jax_fn, num_iterations=2,
                   checkpoint_dir=tmp_path, **kwargs)
    resumed, resumed_history = js.learn_twist(key, lm, [toy.prompt()], log_phi.jax_fn,
                                              num_iterations=4, checkpoint_dir=tmp_path, **kwargs)
    assert [h["iteration"] for h in resumed_history] == [0, 1, 2, 3]
    np.testing.assert_allclose(resumed, straight, rtol=1e-6, atol=1e-6)
    for a, b in zip(resumed_history, straight_history):
        np.testing.assert_allclose(a["beta"], b["beta"], rtol=1e-6)


def test_default_head_starts_at_zero_and_bad_arguments(toy, lm, log_phi):
    log_twist_fn, params = js.smc.init_twist_head(jax.random.key(0), lm, S)
    features = jax.random.normal(jax.random.key(1), (lm.vocab_size,))
    np.testing.assert_array_equal(log_twist_fn(params, jnp.zeros(S, jnp.int32), 2, features), 0.0)
    with pytest.raises(ArgumentError, match="method"):
        js.learn_twist(jax.random.key(0), lm, [toy.prompt()], log_phi.jax_fn, method="ppo",
                       num_iterations=1, num_particles=4, max_new_tokens=S)
    with pytest.raises(ArgumentError, match="kl_budget"):
        js.learn_twist(jax.random.key(0), lm, [toy.prompt()], log_phi.jax_fn, kl_budget=0.0,
                       num_iterations=1, num_particles=4, max_new_tokens=S)
