"""ORCA: the TTT probe against a float64 reference, label-freeness, meta-gradients, LTT validity."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsample.calibration import orca
from jaxsample.errors import ArgumentError


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_scores(params, phi, mask):
    """Step-by-step float64 loop: score with (W, b), then one SGD step on (σ(⟨W, θ_K φ⟩ + b) − 0)²."""
    to64 = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    theta_k, theta_q, w, b = to64(params.theta_k), to64(params.theta_q), to64(params.w0), float(params.b0)
    eta = float(np.exp(params.log_eta))
    scores = []
    for x, real in zip(np.asarray(phi, np.float64), np.asarray(mask)):
        k = x if theta_k is None else theta_k @ x
        q = x if theta_q is None else theta_q @ x
        scores.append(sigmoid(w @ q + b))
        if real:
            p = sigmoid(w @ k + b)
            g = 2 * p * p * (1 - p)
            w, b = w - eta * g * k, b - eta * g
    return np.asarray(scores)


def tiny_problem(key, n=12, d=4, real=9):
    phi = jax.random.normal(key, (n, d))
    return phi, jnp.arange(n) < real


@pytest.mark.parametrize("hidden_size", [None, 3])
def test_probe_scan_matches_float64_reference(hidden_size):
    params = orca.init_probe(jax.random.key(0), 4, hidden_size=hidden_size, eta=0.5)
    params = params._replace(w0=params.w0 * 50.0)  # scores far from 1/2, so the updates matter
    phi, mask = tiny_problem(jax.random.key(1))
    scores = np.asarray(orca.probe_scan(params, phi, mask))
    expected = reference_scores(params, phi, mask)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    frozen = reference_scores(params._replace(log_eta=jnp.float32(-jnp.inf)), phi, mask)
    assert np.abs(expected - frozen).max() > 1e-2  # the inner steps changed the scores


def test_tied_probe_uses_the_key_projection_for_queries():
    tied = orca.init_probe(jax.random.key(0), 4, hidden_size=3, eta=0.5, tied=True)
    assert tied.theta_q is None
    phi, mask = tiny_problem(jax.random.key(1))
    np.testing.assert_allclose(np.asarray(orca.probe_scan(tied, phi, mask)),
                               reference_scores(tied._replace(theta_q=tied.theta_k), phi, mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ArgumentError, match="tied=True .* needs a hidden_size"):
        orca.init_probe(jax.random.key(0), 4, tied=True)


def test_eta_zero_is_a_static_linear_probe():
    params = orca.init_probe(jax.random.key(2), 4, hidden_size=3, eta=0.0)
    phi, mask = tiny_problem(jax.random.key(3))
    expected = jax.nn.sigmoid(phi @ params.theta_q.T @ params.w0 + params.b0)
    np.testing.assert_allclose(np.asarray(orca.probe_scan(params, phi, mask)), np.asarray(expected), rtol=1e-6)


def test_inner_update_is_sgd_on_the_label_free_loss():
    """The fast-weight change equals −η ∇(σ(⟨W, θ_K φ⟩ + b) − 0)²: the target is 0, never a label."""
    params = orca.init_probe(jax.random.key(4), 4, hidden_size=3, eta=0.3)
    params = params._replace(w0=params.w0 * 50.0)
    phi, _ = tiny_problem(jax.random.key(5), n=2)
    eta = float(jnp.exp(params.log_eta))

    def inner_loss(wb):
        return jax.nn.sigmoid(wb[0] @ (params.theta_k @ phi[0]) + wb[1]) ** 2

    grad_w, grad_b = jax.grad(inner_loss)((params.w0, params.b0))
    stepped = params._replace(w0=params.w0 - eta * grad_w, b0=params.b0 - eta * grad_b)
    # The second score of the scan is the first score of a scan started from the stepped weights.
    second = orca.probe_scan(params, phi, jnp.array([True, True]))[1]
    np.testing.assert_allclose(float(second), float(orca.probe_scan(stepped, phi[1:], jnp.array([True]))[0]), rtol=1e-5)
    assert "labels" not in inspect.signature(orca.probe_scan).parameters
    assert "labels" not in inspect.signature(orca.ttt_scores).parameters


def test_stop_decisions_ignore_permuted_labels():
    params = orca.init_probe(jax.random.key(6), 4, eta=0.01)
    params = params._replace(w0=params.w0 * 50.0)
    phi = jax.random.normal(jax.random.key(7), (20, 15, 4))
    mask = jnp.ones((20, 15), bool)
    labels = (jnp.arange(15)[None, :] >= jax.random.randint(jax.random.key(8), (20, 1), 2, 14)).astype(jnp.float32)
    permuted = labels[jax.random.permutation(jax.random.key(9), 20)]
    smoothed = orca.smooth(orca.ttt_scores(params, phi, mask), mask)
    lam = jnp.median(smoothed.max(axis=1))  # about half the problems stop early
    first, second = orca.evaluate(smoothed, labels, mask, lam), orca.evaluate(smoothed, permuted, mask, lam)
    np.testing.assert_array_equal(np.asarray(first.stops), np.asarray(second.stops))
    assert len(set(np.asarray(first.stops).tolist())) > 1
    wrong_at_stop = 1 - np.asarray(labels)[np.arange(20), np.asarray(first.stops)]
    assert int(first.num_wrong) == int(wrong_at_stop.sum()) and 0 < int(first.num_wrong) < 20
    # Labels reach only the outer (meta-training) loss.
    assert float(orca.meta_loss(params, phi, labels, mask)) != float(orca.meta_loss(params, phi, permuted, mask))


def test_evaluate_matches_hand_values():
    # λ = 0.5. Problem 0 first reaches it at step 1 (right there): T = 1 of n = 4, savings
    # 1 − 2/4. Problem 1 (n = 3, its padding slot scores high but is masked) never does: it
    # runs to T = 2, savings 0, and is wrong there.
    smoothed = jnp.array([[0.1, 0.9, 0.9, 0.9], [0.2, 0.3, 0.1, 0.95]])
    labels = jnp.array([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    mask = jnp.array([[True] * 4, [True, True, True, False]])
    result = orca.evaluate(smoothed, labels, mask, 0.5)
    np.testing.assert_array_equal(result.stops, [1, 2])
    assert int(result.num_wrong) == 1 and float(result.error_rate) == 0.5
    np.testing.assert_allclose(float(result.savings), (0.5 + 0.0) / 2, rtol=1e-6)


def test_meta_gradient_matches_finite_differences():
    params = orca.init_probe(jax.random.key(10), 3, hidden_size=2, eta=0.5)
    params = params._replace(w0=params.w0 * 40.0)
    phi = jax.random.normal(jax.random.key(11), (2, 6, 3))
    mask = jnp.arange(6)[None, :] < jnp.array([[6], [4]])
    labels = (jnp.arange(6)[None, :] >= jnp.array([[3], [2]])).astype(jnp.float32)
    grads = jax.grad(orca.meta_loss)(params, phi, labels, mask)
    leaves, treedef = jax.tree.flatten(params)
    for seed in range(3):
        keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
        direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        eps = 1e-2
        plus = jax.tree.map(lambda p, u: p + eps * u, params, direction)
        minus = jax.tree.map(lambda p, u: p - eps * u, params, direction)
        numeric = (orca.meta_loss(plus, phi, labels, mask) - orca.meta_loss(minus, phi, labels, mask)) / (2 * eps)
        analytic = sum(jnp.vdot(g, u) for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        assert abs(float(analytic)) > 1e-3
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2, atol=2e-4)
    assert abs(float(grads.log_eta)) > 0  # the gradient reaches η through the inner steps


def test_nan_padding_labels_leave_the_meta_gradient_finite():
    """Masking only the product sent 0 · NaN = NaN gradients back: meta_train returned NaN weights."""
    params = orca.init_probe(jax.random.key(15), 3)
    phi = jax.random.normal(jax.random.key(16), (2, 5, 3))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    labels = jnp.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], jnp.float32)
    meta_grad = jax.jit(jax.grad(orca.meta_loss))
    grads = meta_grad(params, phi, jnp.where(mask, labels, jnp.nan), mask)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(meta_grad(params, phi, labels, mask))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_meta_training_lowers_the_loss_and_can_freeze_eta():
    phi = jax.random.normal(jax.random.key(12), (16, 20, 4))
    labels = (jnp.arange(20)[None, :] >= 10).astype(jnp.float32) * jnp.ones((16, 1))
    phi = phi + 2.0 * labels[..., None] * jnp.array([1.0, 0, 0, 0])
    mask = jnp.ones((16, 20), bool)
    start = orca.init_probe(jax.random.key(13), 4)
    trained, losses = orca.meta_train(jax.random.key(14), start, phi, labels, mask, epochs=10, batch_size=4, learning_rate=0.05)
    assert float(orca.meta_loss(trained, phi, labels, mask)) < 0.6 * float(orca.meta_loss(start, phi, labels, mask))
    frozen, _ = orca.meta_train(jax.random.key(14), start, phi, labels, mask, epochs=1, learn_eta=False)
    assert float(frozen.log_eta) == float(start.log_eta)


def test_changing_the_learning_rate_does_not_recompile():
    # meta_train passed a new optax chain as a static argument (hashed by identity: one compile
    # per call); static_probe_fit built its scan inline (one compile per call).
    phi = jax.random.normal(jax.random.key(0), (3, 5, 2))
    labels, mask = (jnp.arange(5) >= 2) * jnp.ones((3, 1)), jnp.ones((3, 5), bool)
    start = orca.init_probe(jax.random.key(1), 2)
    sizes = []
    for learning_rate in (1e-3, 1e-3, 2e-3):
        orca.meta_train(jax.random.key(2), start, phi, labels, mask, epochs=1, learning_rate=learning_rate,
                        learn_eta=learning_rate < 2e-3)
        orca.static_probe_fit(phi, labels, mask, components=2, steps=3, learning_rate=learning_rate)
        sizes.append((orca._train_epoch._cache_size(), orca._fit_logistic._cache_size()))
    assert sizes[1:] == sizes[:1] * 2


@pytest.mark.parametrize("eta", [0.0, 0.01, 0.3])
def test_init_probe_takes_a_traced_eta(eta):
    # `if eta > 0` made a traced η a TracerBoolConversionError.
    make = lambda eta: orca.init_probe(jax.random.key(0), 4, 3, eta=eta)  # noqa: E731
    for got, want in zip(jax.jit(make)(eta), make(eta)):
        np.testing.assert_array_equal(got, want)


def test_probe_and_meta_training_are_the_same_under_x64():
    # init_probe drew with the default dtype: float64 weights under x64 (other draws), which
    # broke meta_train's scan carry next to the float32 b0 and log η.
    phi = jax.random.normal(jax.random.key(0), (3, 5, 2))
    labels, mask = (jnp.arange(5) >= 2) * jnp.ones((3, 1)), jnp.ones((3, 5), bool)

    def run():
        start = orca.init_probe(jax.random.key(1), 2, 3)
        return start, orca.meta_train(jax.random.key(2), start, phi, labels, mask, epochs=1)

    expected = run()
    with jax.enable_x64(True):
        got = run()
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
    for old, new in zip(expected[0], got[0]):
        np.testing.assert_array_equal(new, old)
    # optax computes Adam's bias correction 1 − β^t in float64 under x64: last-bit differences.
    for old, new in zip(jax.tree.leaves(expected[1]), jax.tree.leaves(got[1])):
        np.testing.assert_allclose(new, old, rtol=1e-5)


def test_smooth_and_stop_indices_match_loops():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 12))
    mask = np.arange(12)[None, :] < np.array([[12], [7], [1]])
    smoothed = np.asarray(orca.smooth(jnp.asarray(scores), jnp.asarray(mask), window=4))
    lambdas = jnp.array([0.9, 0.6, 0.3])
    stops = np.asarray(orca.stop_indices(jnp.asarray(smoothed), jnp.asarray(mask), lambdas))
    for i in range(3):
        n = mask[i].sum()
        for t in range(n):
            np.testing.assert_allclose(smoothed[i, t], scores[i, max(0, t - 3):t + 1].mean(), rtol=1e-6)
        for j, lam in enumerate(np.asarray(lambdas)):
            hits = [t for t in range(n) if smoothed[i, t] >= lam]
            assert stops[i, j] == (hits[0] if hits else n - 1)


def simulated_scores(key, problems, steps=30):
    """Smoothed-score paths whose jump follows the solve step t* with noise; labels 1{t ≥ t*}."""
    key_solve, key_noise = jax.random.split(key)
    solve = jax.random.randint(key_solve, (problems, 1), 5, 26)
    t = jnp.arange(steps)[None, :]
    noise = jax.random.normal(key_noise, (problems, steps))
    scores = jax.nn.sigmoid((t - solve) / 3.0 + noise)
    mask = jnp.ones((problems, steps), bool)
    return orca.smooth(scores, mask, window=3), (t >= solve).astype(jnp.float32), mask


def test_ltt_bounds_the_stopping_risk_over_resplits():
    """P(true error of the calibrated λ > δ) ≤ ε over independent calibration sets."""
    delta, epsilon, seeds, n = 0.2, 0.1, 300, 100
    lambdas = orca.lambda_grid(200)
    pool = simulated_scores(jax.random.key(20), 20000)
    true_risk = orca.stop_losses(*pool, lambdas).mean(axis=0)  # [J]; pool SE ≤ 0.003
    calibrate = jax.jit(jax.vmap(lambda s, l, m: orca.ltt_calibrate(s, l, m, delta, epsilon, lambdas)))
    smoothed, labels, mask = jax.vmap(lambda k: simulated_scores(k, n))(jax.random.split(jax.random.key(21), seeds))
    chosen = np.asarray(calibrate(smoothed, labels, mask))
    index = np.searchsorted(-np.asarray(lambdas), -chosen)  # grid position of each λ̂ (inf: none)
    risk = np.where(np.isfinite(chosen), np.asarray(true_risk)[np.minimum(index, len(lambdas) - 1)], 0.0)
    assert np.isfinite(chosen).mean() > 0.9 and float(true_risk[-1]) > delta  # a real trade-off
    tolerance = 3.0 * np.sqrt(epsilon * (1 - epsilon) / seeds)
    assert (risk > delta).mean() <= epsilon + tolerance


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: orca.init_probe(jax.random.key(0), 0), "feature_size must be an integer in [1, inf], got 0"),
        (lambda: orca.init_probe(jax.random.key(0), 4, hidden_size=0), "hidden_size must be an integer in [1, inf], got 0"),
        (lambda: orca.init_probe(jax.random.key(0), 4, eta=-1.0), "eta must be a number in [0, inf), got -1.0"),
        (lambda: orca.init_probe(jax.random.key(0), 4, eta=float("inf")), "eta must be a number in [0, inf), got inf"),
        (lambda: orca.ltt_calibrate(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3), bool), 1.5), "delta must be a number in (0, 1), got 1.5"),
        (lambda: orca.ltt_calibrate(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3), bool), 0.1, 0.0), "epsilon must be a number in (0, 1), got 0.0"),
        (lambda: orca.ltt_calibrate(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 2), bool), 0.5, 0.1),
         "smoothed must be [P, n] with labels and mask [P, n]; got (2, 3), (2, 3), (2, 2)"),
        (lambda: orca.ltt_calibrate(jnp.zeros(3), jnp.zeros(3), jnp.ones(3, bool), 0.5, 0.1), "smoothed must be [P, n]"),
        (lambda: orca.ltt_calibrate(jnp.zeros((2, 3)), jnp.full((2, 3), 0.7), jnp.ones((2, 3), bool), 0.5, 0.1),
         "labels must be 0 or 1 at real steps (the binomial p-values count wrong stops), got 0.7"),
        (lambda: orca.ltt_calibrate(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3), bool), 0.5, 0.1, lambdas=[]),
         "lambdas must be a non-empty 1-D grid [J], got shape (0,)"),
        # A row without a real step stopped at index −1, i.e. on its last padded label.
        (lambda: orca.ltt_calibrate(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.array([[1, 1, 0], [0, 0, 0]], bool), 0.5, 0.1),
         "mask must mark a non-empty prefix of real steps (1s then 0s) in every row; row 1 has no real step"),
        (lambda: orca.evaluate(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.array([[1, 1, 0], [1, 0, 1]], bool), 0.5),
         "row 1 has a real step after padding"),
        (lambda: orca.stop_indices(jnp.zeros((2, 3)), jnp.array([[0, 0, 0], [1, 1, 1]], bool), jnp.array([0.5])),
         "row 0 has no real step"),
        (lambda: orca.stop_losses(jnp.zeros((2, 0)), jnp.ones((2, 0)), jnp.ones((2, 0), bool), jnp.array([0.5])),
         "every row; row 0 has no real step"),
        (lambda: orca.smooth(jnp.zeros((2, 3)), jnp.ones((2, 3), bool), window=0), "window must be an integer in [1, inf], got 0"),
        (lambda: orca.static_probe_fit(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3), bool)), "phi must be [P, n, d]"),
        (lambda: orca.meta_train(jax.random.key(0), orca.init_probe(jax.random.key(0), 2), jnp.full((2, 3, 2), jnp.nan),
                                 jnp.zeros((2, 3)), jnp.ones((2, 3), bool)), "phi holds NaN or inf"),
        (lambda: orca.meta_train(jax.random.key(0), orca.init_probe(jax.random.key(0), 2), jnp.zeros((2, 3, 2)),
                                 jnp.zeros((2, 3)), jnp.ones((2, 3), bool), batch_size=3), "batch_size must be an integer in [1, 2], got 3"),
    ],
)
def test_argument_errors_are_clear(call, message):
    with pytest.raises(ArgumentError) as error:
        call()
    assert message in str(error.value)


def test_integer_and_scalar_arrays_are_accepted_and_padding_labels_are_free():
    params = orca.init_probe(jax.random.key(0), np.int64(4), hidden_size=jnp.int32(3), eta=jnp.float32(0.1))
    assert params.theta_k.shape == (3, 4)
    mask = jnp.array([[True, True, False]])
    smoothed = orca.smooth(jnp.full((1, 3), 0.5), mask, window=np.int64(2))
    labels = jnp.array([[0.0, 1.0, -1.0]])  # -1 marks padding
    # Every λ > 0.5 stops at the last real step (label 1): p = P(Bin(1, 0.5) ≤ 0) = 0.5 ≤ ε rejects it.
    lam = orca.ltt_calibrate(smoothed, labels, mask, jnp.float32(0.5), np.float32(0.5))
    assert float(lam) == float(orca.lambda_grid()[4999])
