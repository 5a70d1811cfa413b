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


SQRT2 = float(np.sqrt(2))


@pytest.mark.parametrize("weights, activation_lipschitz, expected, expected_groups", [
    # sigmoid (a = 1/4): a · ‖W_2‖ · ‖W_1‖ = 1/4 · √2 · 2, groups 1/4 · √2 · (2, 1)
    ([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0]]], 0.25, 0.25 * SQRT2 * 2, [0.25 * SQRT2 * 2, 0.25 * SQRT2]),
    # three layers, a = 3/2 (> 1, as GELU's): a² · √2 · 3 · 2
    ([[[2.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 1.0]], [[1.0, 1.0]]], 1.5, 2.25 * SQRT2 * 6,
     [2.25 * SQRT2 * 6, 2.25 * SQRT2 * 3]),
])
def test_mlp_bound_scales_with_the_activation_constant_per_hidden_layer(weights, activation_lipschitz, expected,
                                                                        expected_groups):
    # One factor a per activation, i.e. K − 1 of them for K layers: no test passed a ≠ 1,
    # so a^K (an unsound bound for a < 1) went unnoticed.
    weights = [jnp.asarray(w) for w in weights]
    bound = safety.mlp_lipschitz_bound(weights, activation_lipschitz=activation_lipschitz)
    group_bound = safety.mlp_lipschitz_bound(weights, activation_lipschitz=activation_lipschitz, group_ids=[0, 1])
    np.testing.assert_allclose(float(bound.value), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(group_bound.value), expected_groups, rtol=1e-6)


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


def test_sampled_probes_are_uniform_in_the_ball():
    # s = ½‖θ‖² has ‖∇s(θ)‖ = ‖θ‖, so at centre 0 with one probe and κ = 1 the bound is that
    # probe's distance ‖u‖. Uniform in the d-ball means (‖u‖/r)^d ~ U(0, 1); a radius drawn
    # uniform on [0, r] (probes crowding the centre) gives the CDF x^{1/d} instead, off by 0.38
    # at d = 3. DKW: P(sup |F_n − F| > t) ≤ 2 exp(−2 n t²), so t below fails a correct law with
    # probability 1e-6.
    dim, radius, n = 3, 2.0, 4000
    params = jnp.zeros(dim, jnp.float32)

    def distance(key):
        bound_fn = safety.sampled_lipschitz_bound(lambda p: 0.5 * jnp.sum(p**2), key, params, radius=radius,
                                                  num_samples=1, kappa=1.0)
        return bound_fn(params).value

    distances = np.asarray(jax.jit(jax.vmap(distance))(jax.random.split(jax.random.key(0), n)), np.float64)
    assert distances.max() <= radius * (1 + 1e-6)
    u = np.sort((distances / radius) ** dim)
    gap = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))
    tolerance = np.sqrt(np.log(2 / 1e-6) / (2 * n))
    assert gap < tolerance, f"KS distance {gap:.4f} of (‖u‖/r)^d from U(0, 1) exceeds {tolerance:.4f}"
    # The probes are drawn in float32 whatever jax_enable_x64 says: the same key, the same bound.
    with jax.enable_x64(True):
        again = jax.jit(distance)(jax.random.key(1))
    assert again.dtype == jnp.float32
    np.testing.assert_array_equal(again, jax.jit(distance)(jax.random.key(1)))
