"""Lipschitz bounds: the analytic ones are bounds (no gradient search beats them); the
estimated one is κ · a sampled gradient norm and says so."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsample import safety


def random_mlp(key, sizes):
    keys = jax.random.split(key, 2 * len(sizes))
    weights = [jax.random.normal(keys[k], (sizes[k + 1], sizes[k])) / np.sqrt(sizes[k]) for k in range(len(sizes) - 1)]
    biases = [jax.random.normal(keys[-1 - k], (sizes[k + 1],)) for k in range(len(sizes) - 1)]

    def s(x):
        for w, b in zip(weights[:-1], biases[:-1]):
            x = jnp.tanh(w @ x + b)
        return (weights[-1] @ x + biases[-1])[0]

    return weights, s


def largest_gradient_norms(s, masks, key, starts=64, steps=120):
    """Gradient ascent on ‖∇s ⊙ mask‖² from many starts, for each mask `[M, dim]`: `[M]` maxima."""

    def norm_sq(x, mask):
        return jnp.sum((jax.grad(s)(x) * mask) ** 2)

    optimizer = optax.adam(0.05)

    def ascend(x, mask):
        def step(carry, _):
            x, opt_state = carry
            updates, opt_state = optimizer.update(-jax.grad(norm_sq)(x, mask), opt_state)
            return (optax.apply_updates(x, updates), opt_state), None

        (x, _), _ = jax.lax.scan(step, (x, optimizer.init(x)), None, length=steps)
        return jnp.sqrt(norm_sq(x, mask))

    starting_points = 3 * jax.random.normal(key, (starts, masks.shape[1]))
    found = jax.jit(jax.vmap(jax.vmap(ascend, in_axes=(0, None)), in_axes=(None, 0)))(starting_points, masks)
    return np.asarray(found.max(axis=1))


@pytest.mark.parametrize("sizes", [(12, 16, 1), (10, 24, 16, 1)])
def test_analytic_mlp_bound_dominates_gradient_search(sizes):
    weights, s = random_mlp(jax.random.key(len(sizes)), sizes)
    group_ids = np.arange(sizes[0]) % 3
    bound = safety.mlp_lipschitz_bound(weights)
    group_bound = safety.mlp_lipschitz_bound(weights, group_ids=group_ids)
    assert bound.kind == group_bound.kind == "analytic" and group_bound.value.shape == (3,)
    # the whole gradient, then each group's block of it (per-group bounds L_g)
    masks = jnp.asarray(np.stack([np.ones(sizes[0])] + [group_ids == g for g in range(3)]), jnp.float32)
    found = largest_gradient_norms(s, masks, jax.random.key(1))
    limits = np.concatenate([[float(bound.value)], np.asarray(group_bound.value)])
    assert (found <= limits * (1 + 1e-5)).all(), f"gradient norms {found} exceed the bounds {limits}"


def test_unembedding_bound_holds_on_random_pairs():
    features = jax.random.normal(jax.random.key(0), (20, 16))
    j, tau = 3, 1.0
    bound = safety.unembedding_lipschitz_bound(features)

    def s(w):  # w [D, V]
        return tau - jnp.max(features @ w[:, j])

    w1, w2 = jax.random.normal(jax.random.key(1), (2, 2000, 16, 8))
    gaps = jnp.abs(jax.vmap(s)(w1) - jax.vmap(s)(w2))
    distances = jnp.linalg.norm((w1 - w2).reshape(2000, -1), axis=1)
    assert bool((gaps <= bound.value * distances * (1 + 1e-5)).all())


def test_sampled_bound_is_kappa_times_gradient_norm_and_labelled_estimated():
    a = jax.random.normal(jax.random.key(0), (30,))
    bound_fn = safety.sampled_lipschitz_bound(lambda x: a @ x, jax.random.key(1), jnp.zeros(30), radius=1.0, num_samples=4, kappa=2.0)
    bound = bound_fn(jnp.ones(30))
    assert bound.kind == "estimated"
    np.testing.assert_allclose(float(bound.value), 2.0 * float(jnp.linalg.norm(a)), rtol=1e-5)
