"""GRPO losses: exact KL-estimator gradients by enumeration, aggregation weights, μ = 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample.errors import ArgumentError
from jaxsample.training import (
    group_advantages,
    k1_reward_to_go,
    kl_term,
    masked_mean,
    policy_loss,
    token_weights,
    zero_variance_fraction,
)

V = 6


def _tabular():
    keys = jax.random.split(jax.random.key(0), 3)
    theta = jax.random.normal(keys[0], (V,))
    log_ref = jax.nn.log_softmax(jax.random.normal(keys[1], (V,)))
    log_old = jax.nn.log_softmax(jax.random.normal(keys[2], (V,)))
    return theta, log_ref, log_old


def _expected_gradient(theta, log_ref, log_old, kind, sampler_log_probs):
    """Σ_a q(a) ∇_θ kl_term(a): the estimator's expected loss gradient, samples a ~ q fixed."""
    tokens = jnp.arange(V)

    def term(theta, a):
        logp = jax.nn.log_softmax(theta)[a]
        return kl_term(logp, log_ref[a], log_old[a], kind)

    per_token = jax.jit(jax.vmap(jax.grad(term), in_axes=(None, 0)))(theta, tokens)
    return jnp.exp(sampler_log_probs) @ per_token


def _reverse_kl(theta, log_ref):
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(logp) * (logp - log_ref))


def _forward_kl(theta, log_ref):
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(log_ref) * (log_ref - logp))


def test_kl_estimator_expected_gradients_by_enumeration():
    theta, log_ref, log_old = _tabular()
    on_policy = jax.nn.log_softmax(theta)
    reverse = jax.grad(_reverse_kl)(theta, log_ref)
    forward = jax.grad(_forward_kl)(theta, log_ref)
    assert np.abs(reverse - forward).max() > 0.05  # the two KLs' gradients are distinguishable here
    k1 = _expected_gradient(theta, log_ref, log_old, "k1_reward", on_policy)
    np.testing.assert_allclose(k1, 0.0, atol=1e-6)
    np.testing.assert_allclose(_expected_gradient(theta, log_ref, log_old, "k2_loss", on_policy), reverse, atol=1e-6)
    np.testing.assert_allclose(_expected_gradient(theta, log_ref, log_old, "k3_loss", on_policy), forward, atol=1e-6)
    ratio_k3 = _expected_gradient(theta, log_ref, log_old, "k3_ratio_loss", log_old)
    np.testing.assert_allclose(ratio_k3, reverse, atol=1e-6)


def test_ratio_weighted_k3_monte_carlo_within_three_standard_errors():
    theta, log_ref, log_old = _tabular()
    samples = jax.random.categorical(jax.random.key(1), log_old, shape=(100_000,))

    def term(theta, a):
        return kl_term(jax.nn.log_softmax(theta)[a], log_ref[a], log_old[a], "k3_ratio_loss")

    grads = np.asarray(jax.jit(jax.vmap(jax.grad(term), in_axes=(None, 0)))(theta, samples), np.float64)
    standard_error = grads.std(axis=0, ddof=1) / np.sqrt(len(grads))
    error = np.abs(grads.mean(axis=0) - np.asarray(jax.grad(_reverse_kl)(theta, log_ref)))
    assert np.all(error < 3 * standard_error), (error, standard_error)


def test_k1_in_the_reward_gives_the_sequence_kl_gradient():
    """Two-token tabular sequences: the REINFORCE gradient with −β·(k1 reward-to-go) in the
    advantage, summed over all V² sequences, is −β ∇KL(π_θ ‖ π_ref) over whole sequences."""
    key_theta, key_ref = jax.random.split(jax.random.key(2))
    theta = jax.random.normal(key_theta, (V + 1, V))  # row 0: first token; row 1+a: after a
    ref = jax.nn.log_softmax(jax.random.normal(key_ref, (V + 1, V)))
    first, second = jnp.meshgrid(jnp.arange(V), jnp.arange(V), indexing="ij")
    first, second = first.ravel(), second.ravel()

    def token_logps(table):
        table = jax.nn.log_softmax(table) if table is not ref else table
        return jnp.stack([table[0, first], table[1 + first, second]], axis=1)

    mask = jnp.ones((V * V, 2))
    sequence_probs = jnp.exp(token_logps(theta).sum(axis=1))
    beta = 0.5

    def loss(t):
        logp = token_logps(t)
        per_seq, _ = jax.vmap(
            lambda lp, lr, m: policy_loss(lp[None], None, lr[None], jnp.zeros(1), m[None], beta=beta, kl_kind="k1_reward", aggregation="constant")
        )(logp, token_logps(ref), mask)
        return jnp.sum(jax.lax.stop_gradient(sequence_probs) * per_seq) * 2  # undo 1/L_max

    def sequence_kl(t):
        logp = token_logps(t).sum(axis=1)
        return jnp.sum(jnp.exp(logp) * (logp - token_logps(ref).sum(axis=1)))

    np.testing.assert_allclose(jax.jit(jax.grad(loss))(theta), beta * jax.jit(jax.grad(sequence_kl))(theta), atol=1e-6)


def test_aggregation_weights_on_lengths_two_and_eight():
    mask = jnp.asarray([[1.0] * 2 + [0.0] * 6, [1.0] * 8])
    expected = {"seq_mean_token_mean": (1 / 4, 1 / 16), "token_mean": (1 / 10, 1 / 10), "constant": (1 / 16, 1 / 16)}
    for aggregation, (short, long) in expected.items():
        weights = token_weights(mask, aggregation)
        np.testing.assert_allclose(weights[0], [short] * 2 + [0.0] * 6, rtol=1e-7)
        np.testing.assert_allclose(weights[1], [long] * 8, rtol=1e-7)
        loss, _ = policy_loss(jnp.zeros((2, 8)), None, None, jnp.ones(2), mask, aggregation=aggregation)
        np.testing.assert_allclose(loss, -(2 * short + 8 * long), rtol=1e-6)


def test_on_policy_gradient_is_group_baselined_reinforce():
    key_logits, key_tokens, key_rewards = jax.random.split(jax.random.key(3), 3)
    groups, group_size, slots = 2, 4, 5
    rows = groups * group_size
    logits = jax.random.normal(key_logits, (rows, slots, V))
    tokens = jax.random.randint(key_tokens, (rows, slots), 0, V)
    lengths = jnp.asarray([1, 5, 3, 2, 5, 4, 1, 3])
    mask = (jnp.arange(slots)[None] < lengths[:, None]).astype(jnp.float32)
    rewards = jax.random.bernoulli(key_rewards, 0.5, (groups, group_size)).astype(jnp.float32)
    advantages = group_advantages(rewards).reshape(rows)

    def logp_of(logits):
        return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], axis=-1)[..., 0]

    @jax.jit
    def both_gradients(logits):
        pairs = []
        for aggregation in ("seq_mean_token_mean", "token_mean", "constant"):
            weights = token_weights(mask, aggregation)
            grad = jax.grad(lambda x: policy_loss(logp_of(x), None, None, advantages, mask, aggregation=aggregation)[0])(logits)
            pairs.append((grad, jax.grad(lambda x: -jnp.sum(weights * advantages[:, None] * logp_of(x)))(logits)))
        return pairs

    for grad, reinforce in both_gradients(logits):
        np.testing.assert_allclose(grad, reinforce, rtol=1e-6, atol=1e-9)


def test_clipping_and_metrics():
    logp_old = jnp.zeros((1, 4))
    logp = jnp.log(jnp.asarray([[0.5, 0.9, 1.1, 1.5]]))
    mask = jnp.ones((1, 4))
    loss, metrics = policy_loss(logp, logp_old, None, jnp.ones(1), mask, aggregation="token_mean")
    # A > 0: the clip binds only above 1 + ε_high (1.5 → 1.2).
    np.testing.assert_allclose(loss, -(0.5 + 0.9 + 1.1 + 1.2) / 4, rtol=1e-6)
    np.testing.assert_allclose(metrics.clip_fraction, 0.25)
    np.testing.assert_allclose(metrics.mean_ratio, 1.0, rtol=1e-6)
    loss, metrics = policy_loss(logp, logp_old, None, -jnp.ones(1), mask, aggregation="token_mean", eps_low=0.2)
    np.testing.assert_allclose(loss, (0.8 + 0.9 + 1.1 + 1.5) / 4, rtol=1e-6)
    np.testing.assert_allclose(metrics.clip_fraction, 0.25)
    ratio = np.array([0.5, 0.9, 1.1, 1.5])
    np.testing.assert_allclose(metrics.approx_kl, np.mean(ratio - 1 - np.log(ratio)), rtol=1e-5)
    # Asymmetric clip (DAPO's clip-higher): ratios clip to [1 − ε_low, 1 + ε_high] = [0.8, 1.28].
    logp = jnp.log(jnp.asarray([[0.7, 0.75, 1.25, 1.3]]))
    asymmetric = dict(aggregation="token_mean", eps_low=0.2, eps_high=0.28)
    loss, metrics = policy_loss(logp, logp_old, None, jnp.ones(1), mask, **asymmetric)
    np.testing.assert_allclose(loss, -(0.7 + 0.75 + 1.25 + 1.28) / 4, rtol=1e-6)  # A > 0: only 1.3 clips
    np.testing.assert_allclose(metrics.clip_fraction, 0.25)
    loss, metrics = policy_loss(logp, logp_old, None, -jnp.ones(1), mask, **asymmetric)
    np.testing.assert_allclose(loss, (0.8 + 0.8 + 1.25 + 1.3) / 4, rtol=1e-6)  # A < 0: 0.7 and 0.75 clip
    np.testing.assert_allclose(metrics.clip_fraction, 0.5)


def test_group_advantages_modes():
    rewards = jnp.asarray([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0]])
    r = np.asarray(rewards, np.float64)
    centred = r - r.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(group_advantages(rewards, "dr_grpo"), centred, atol=1e-7)
    varied = [0, 2]
    np.testing.assert_allclose(
        np.asarray(group_advantages(rewards, "grpo", eps=0.0))[varied],
        centred[varied] / r[varied].std(axis=1, ddof=1, keepdims=True),
        rtol=1e-6,
    )
    np.testing.assert_allclose(group_advantages(rewards, "grpo")[1], 0.0)
    # Identical rewards give A = 0 even with eps = 0 (no 0/0) and when their mean rounds.
    np.testing.assert_array_equal(group_advantages(rewards, "grpo", eps=0.0)[1], 0.0)
    np.testing.assert_array_equal(group_advantages(jnp.full((2, 3), 0.1), "grpo", eps=0.0), 0.0)
    np.testing.assert_array_equal(group_advantages(jnp.full((2, 3), 0.1), "batch_std", eps=0.0), 0.0)
    np.testing.assert_allclose(group_advantages(rewards, "batch_std", eps=0.0), centred / r.std(ddof=1), rtol=1e-6)
    np.testing.assert_allclose(zero_variance_fraction(rewards), 1 / 3)


@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e30])
def test_group_advantages_are_scale_free_where_squares_leave_float32(scale):
    """grpo and batch_std advantages do not depend on the rewards' unit: at 1e20 and 1e30
    the squared deviations overflow float32 (the std became inf and the advantages 0), and
    at 1e-30 they underflow."""
    rewards = jnp.asarray([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.0, 1.0]])
    for mode in ("grpo", "batch_std"):
        np.testing.assert_allclose(group_advantages(rewards * scale, mode, eps=0.0),
                                   group_advantages(rewards, mode, eps=0.0), rtol=1e-6)


def test_k1_reward_to_go_sums_the_future():
    logp = jnp.log(jnp.asarray([[0.5, 0.25, 1.0]]))
    logp_ref = jnp.log(jnp.asarray([[0.25, 0.25, 0.5]]))
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    np.testing.assert_allclose(k1_reward_to_go(logp, logp_ref, mask), [[np.log(2), 0.0, 0.0]], atol=1e-6)
    impossible_pad = jnp.asarray([[0.0, 0.0, -jnp.inf]])  # log p = -inf in the masked slot
    np.testing.assert_allclose(k1_reward_to_go(logp + impossible_pad, logp_ref + impossible_pad, mask), [[np.log(2), 0.0, 0.0]], atol=1e-6)


def test_minus_inf_log_probs_in_padding_change_nothing():
    """A pad token the model never emits has log p = -inf; its slot is masked, so it must not matter."""
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logp, logp_old, logp_ref, entropy = (jnp.arange(1.0, 7.0).reshape(2, 3) / scale for scale in (-4, -5, -3, 2))

    @jax.jit  # one compilation instead of hundreds of eager ops
    def loss_and_gradient(fill):
        padded = lambda x: jnp.where(mask > 0, x, fill)  # noqa: E731
        loss = lambda x: policy_loss(  # noqa: E731
            x, padded(logp_old), padded(logp_ref), jnp.asarray([1.0, -1.0]), mask, beta=0.1, kl_kind="k3_ratio_loss", entropy=padded(entropy)
        )
        return jax.value_and_grad(loss, has_aux=True)(padded(logp))

    for got, expected in zip(jax.tree.leaves(loss_and_gradient(-jnp.inf)), jax.tree.leaves(loss_and_gradient(0.0))):
        assert np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: group_advantages(jnp.zeros((3, 1))), "G >= 2"),
        (lambda: group_advantages(jnp.zeros((3, 2)), mode="ppo"), "mode"),
        (lambda: group_advantages(jnp.zeros((3, 2)), eps=-1.0), "eps"),
        (lambda: kl_term(jnp.zeros(2), jnp.zeros(2), kind="k4"), "^kind must be one of"),
        (lambda: kl_term(jnp.zeros(2), jnp.zeros(2), kind="k3_ratio_loss"), "logp_old"),
        (lambda: policy_loss(jnp.zeros((1, 2)), None, None, jnp.zeros(1), jnp.ones((1, 2)), eps_low=1.0), "eps_low"),
        (lambda: policy_loss(jnp.zeros((1, 2)), None, None, jnp.zeros(1), jnp.ones((1, 2)), eps_high=-0.1), "eps_high"),
        (lambda: policy_loss(jnp.zeros((1, 2)), None, None, jnp.zeros(1), jnp.ones((1, 2)), beta=float("nan")), "beta"),
        (lambda: policy_loss(jnp.zeros((1, 2)), None, None, jnp.zeros(1), jnp.ones((1, 2)), kl_kind="k2_loss", beta=0.1), "logp_ref"),
        (lambda: policy_loss(jnp.zeros((1, 2)), None, None, jnp.zeros(1), jnp.ones((1, 2)), aggregation="sum"), "aggregation"),
        (lambda: policy_loss(jnp.zeros((1, 2)), None, None, jnp.zeros(3), jnp.ones((1, 2))), "advantages"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()


_LOGP, _MASK = -jnp.ones((4, 3)), jnp.ones((4, 3))
_SHORT = -jnp.ones((4, 2))  # off by one token slot


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: policy_loss(_LOGP, _SHORT, None, jnp.zeros(4), _MASK), r"logp_old must have the shape \(4, 3\) of logp, got \(4, 2\)"),
        (lambda: policy_loss(_LOGP, None, _LOGP[0], jnp.zeros(4), _MASK, beta=0.1, kl_kind="k3_loss"), r"logp_ref .* got \(3,\)"),
        (lambda: policy_loss(_LOGP, None, None, jnp.zeros(4), _MASK, entropy=_SHORT), "entropy"),
        (lambda: kl_term(_LOGP, _SHORT), "logp_ref"),
        (lambda: kl_term(_LOGP, _LOGP, _SHORT, kind="k3_ratio_loss"), "logp_old"),
        (lambda: k1_reward_to_go(_LOGP, _SHORT, _MASK), "logp_ref"),
        (lambda: k1_reward_to_go(_LOGP, _LOGP, _MASK[:, :1]), "mask"),
        (lambda: masked_mean(_LOGP, _MASK[:, :1]), r"mask must have the shape \(4, 3\) of values"),
        (lambda: group_advantages(jnp.asarray([[1.0, jnp.nan], [0.0, 1.0]])), r"rewards .* got nan \(element \(0, 1\)\)"),
        (lambda: group_advantages([[1.0, float("inf")], [0.0, 1.0]]), "rewards"),
        (lambda: zero_variance_fraction(jnp.ones(8)), r"rewards must have shape \[B, G\]"),
    ],
)
def test_per_token_shapes_and_rewards_are_checked(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()


def test_reward_values_are_not_checked_under_jit():
    rewards = jnp.asarray([[1.0, jnp.nan], [0.0, 1.0]])
    assert bool(jnp.isnan(jax.jit(group_advantages)(rewards)[0]).all())
