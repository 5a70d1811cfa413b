"""CoDistill-GRPO losses: KD reward gradient by enumeration, importance weights, π_L = π_S."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample.errors import ArgumentError
from jaxsample.training import (
    group_advantages,
    importance_weight_stats,
    importance_weights,
    kd_reward,
    large_loss,
    policy_loss,
    small_loss,
    small_model_advantages,
)

V = 6


def test_kd_reward_expected_gradient_is_minus_reverse_kl_gradient():
    key_small, key_large = jax.random.split(jax.random.key(0))
    theta = jax.random.normal(key_small, (V,))
    log_large = jax.nn.log_softmax(jax.random.normal(key_large, (V,)))

    def loss_on_token(theta, a):
        # One group of two identical one-token rollouts with zero task reward: only KD acts.
        logp = jnp.full((2, 1), jax.nn.log_softmax(theta)[a])
        loss, _ = small_loss(logp, None, jnp.full((2, 1), log_large[a]), jnp.zeros((1, 2)), jnp.ones((2, 1)), lam=1.0)
        return loss

    per_token = jax.jit(jax.vmap(jax.grad(loss_on_token), in_axes=(None, 0)))(theta, jnp.arange(V))
    expected_objective_gradient = -(jax.nn.softmax(theta) @ per_token)

    def reverse_kl(theta):
        logp = jax.nn.log_softmax(theta)
        return jnp.sum(jnp.exp(logp) * (logp - log_large))

    np.testing.assert_allclose(expected_objective_gradient, -jax.grad(reverse_kl)(theta), atol=1e-6)


def _batch(key, rows=8, slots=5):
    keys = jax.random.split(key, 4)
    lengths = jax.random.randint(keys[0], (rows,), 1, slots + 1)
    mask = (jnp.arange(slots)[None] < lengths[:, None]).astype(jnp.float32)
    logp_small = -jax.random.uniform(keys[1], (rows, slots), minval=0.1, maxval=3.0) * mask
    logp_large = -jax.random.uniform(keys[2], (rows, slots), minval=0.1, maxval=3.0) * mask
    rewards = jax.random.bernoulli(keys[3], 0.5, (2, rows // 2)).astype(jnp.float32)
    return mask, logp_small, logp_large, rewards


def test_equal_models_give_unit_weights_and_the_grpo_loss():
    mask, logp, _, rewards = _batch(jax.random.key(1))
    advantages = group_advantages(rewards).reshape(-1)
    logp_new = logp + 0.05 * mask  # a moved policy, so the clip and ratio are exercised

    @partial(jax.jit, static_argnames="level")
    def both_losses(logp_old, level):
        behaviour = logp if logp_old is not None else logp_new
        weights = importance_weights(behaviour, behaviour, mask, cap=2.0, level=level)
        loss, (_, stats) = large_loss(logp_new, logp_old, behaviour, advantages, mask, cap=2.0, level=level, eps_high=0.28)
        grpo, _ = policy_loss(logp_new, logp_old, None, advantages, mask, eps_high=0.28)
        return weights, stats, loss, grpo

    for level in ("token", "sequence"):
        for logp_old in (None, logp):
            weights, stats, loss, grpo = both_losses(logp_old, level)
            np.testing.assert_array_equal(weights, mask)
            np.testing.assert_allclose([stats.ess_fraction, stats.capped_fraction, stats.mean_weight], [1.0, 0.0, 1.0], rtol=1e-6)
            np.testing.assert_allclose(loss, grpo, rtol=1e-6)


def test_truncated_weights_and_their_statistics():
    mask = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    log_ratio = jnp.log(jnp.asarray([[0.5, 3.0, 1.0], [8.0, 2.0, 5.0]]))
    logp_small = -jnp.ones((2, 3))
    weights = importance_weights(logp_small + log_ratio, logp_small, mask, cap=2.0)
    np.testing.assert_allclose(weights, [[0.5, 2.0, 1.0], [2.0, 2.0, 0.0]], rtol=1e-6)
    stats = importance_weight_stats(weights, mask, 2.0)
    w = np.array([0.5, 2.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(stats.ess_fraction, w.sum() ** 2 / (w**2).sum() / 5, rtol=1e-6)
    np.testing.assert_allclose(stats.capped_fraction, 3 / 5)
    sequence = importance_weights(logp_small + log_ratio, logp_small, mask, cap=2.0, level="sequence")
    np.testing.assert_allclose(sequence[0], [1.5 ** (1 / 3)] * 3, rtol=1e-5)  # (0.5·3·1)^(1/3)
    np.testing.assert_allclose(sequence[1], [2.0, 2.0, 0.0], rtol=1e-6)  # (8·2)^(1/2) = 4 → cap
    np.testing.assert_array_equal(importance_weights(logp_small + log_ratio, logp_small, mask, level="none"), mask)


def test_kd_advantage_combinations():
    mask, logp_small, logp_large, rewards = _batch(jax.random.key(2))
    kd = kd_reward(logp_large, logp_small, mask)
    np.testing.assert_allclose(kd, (logp_large - logp_small) * mask, rtol=1e-6)
    token = small_model_advantages(rewards, kd, mask, 0.5, "token")
    np.testing.assert_allclose(token, (group_advantages(rewards).reshape(-1, 1) + 0.5 * kd) * mask, rtol=1e-6)
    sequence = small_model_advantages(rewards, kd, mask, 0.5, "sequence", mode="dr_grpo")
    shaped = rewards + 0.5 * (kd.sum(1) / mask.sum(1)).reshape(rewards.shape)
    np.testing.assert_allclose(sequence, (shaped - shaped.mean(1, keepdims=True)).reshape(-1, 1) * mask, rtol=1e-5, atol=1e-6)
    # All-failed groups still get a signal from the KD term at token level.
    silent = small_model_advantages(jnp.zeros_like(rewards), kd, mask, 0.5, "token")
    assert float(jnp.abs(silent).sum()) > 0


def test_minus_inf_log_probs_in_padding_change_nothing():
    """A pad token a model never emits has log p = -inf; its slot is masked, so it must not matter."""
    mask, logp_small, logp_large, rewards = _batch(jax.random.key(3))
    assert bool((mask == 0).any())
    advantages = group_advantages(rewards).reshape(-1)

    @jax.jit  # one compilation instead of hundreds of eager ops
    def losses_and_gradients(fill):
        padded = lambda x: jnp.where(mask > 0, x, fill)  # noqa: E731
        small = lambda x: small_loss(x, padded(logp_small - 0.1), padded(logp_large), rewards, mask)  # noqa: E731
        large = lambda x: large_loss(x, None, padded(logp_small), advantages, mask, level="sequence")  # noqa: E731
        return [jax.value_and_grad(loss, has_aux=True)(padded(logp)) for loss, logp in ((small, logp_small), (large, logp_large))]

    for got, expected in zip(jax.tree.leaves(losses_and_gradients(-jnp.inf)), jax.tree.leaves(losses_and_gradients(0.0))):
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: importance_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), cap=0.0), "cap"),
        (lambda: importance_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), level="product"), "level"),
        (lambda: small_model_advantages(jnp.zeros((1, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2)), -0.1), "lam"),
        (lambda: small_model_advantages(jnp.zeros((1, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2)), 0.1, "prompt"), "combine"),
        (lambda: small_model_advantages(jnp.zeros((1, 2)), jnp.zeros((3, 2)), jnp.ones((3, 2)), 0.1), "rows"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()


_LOGP, _MASK = -jnp.ones((4, 3)), jnp.ones((4, 3))
_SHORT = -jnp.ones((4, 2))  # off by one token slot
_REWARDS = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kd_reward(_LOGP, _SHORT, _MASK), r"logp_small must have the shape \(4, 3\) of logp_large, got \(4, 2\)"),
        (lambda: kd_reward(_LOGP, _LOGP, _SHORT), "mask"),
        (lambda: importance_weights(_LOGP, _SHORT, _MASK), "logp_small_old"),
        (lambda: importance_weights(_LOGP, _LOGP, _SHORT, level="none"), "mask"),
        (lambda: small_model_advantages(_REWARDS, _LOGP, _SHORT, 0.1), "mask"),
        (lambda: small_model_advantages(_REWARDS, _LOGP[:, 0], _MASK[:, 0], 0.1), r"kd must have shape \[S, N\]"),
        (lambda: small_loss(_LOGP, None, _SHORT, _REWARDS, _MASK), r"logp_large_old .* of logp"),
        (lambda: small_loss(_LOGP, None, _LOGP, _REWARDS, _MASK, logp_ref=_SHORT, kl_kind="k3_loss", beta=0.1), "logp_ref"),
        (lambda: large_loss(_LOGP, _SHORT, _LOGP, jnp.zeros(4), _MASK), r"logp_old .* of logp"),
        (lambda: large_loss(_LOGP, None, _SHORT, jnp.zeros(4), _MASK), r"logp_small_old .* of logp,"),
        (lambda: large_loss(_LOGP, None, _LOGP, jnp.zeros(4), _SHORT), "mask"),
        (lambda: large_loss(_LOGP, None, _LOGP, _REWARDS, _MASK), r"advantages must have shape \[S\] = \(4,\), got \(2, 2\)"),
    ],
)
def test_per_token_shapes_are_checked(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()
