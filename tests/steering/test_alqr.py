"""A-LQR: Riccati gains, rank-one control, setpoint no-op, tracking on a linear system,
Jacobians against finite differences, save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import models, steering
from jaxsample.errors import ArgumentError, CheckpointError
from tests.models.test_gradients import CONFIG as F64_CONFIG
from tests.models.test_kv_cache import ATOL, CONFIG, random_params


@pytest.fixture(scope="module")
def lm():
    return models.make_language_model(CONFIG, random_params(CONFIG, 0), name="tiny")


def _direct_lqr(A, q, r, qf, x0):
    """Minimises Σ_k q‖x_k‖² + r‖u_k‖² + qf‖x_T‖² over the stacked controls u (x_{k+1} =
    A_k x_k + u_k) by solving the normal equations of the quadratic; returns u* [T, n]."""
    T, n, _ = A.shape
    # x_k = Φ_k x0 + Σ_{j<k} Ψ_{k,j} u_j
    phi = [np.eye(n)]
    for k in range(T):
        phi.append(A[k] @ phi[-1])
    psi = np.zeros((T + 1, T, n, n))
    for k in range(1, T + 1):
        for j in range(k):
            M = np.eye(n)
            for m in range(j + 1, k):
                M = A[m] @ M
            psi[k, j] = M
    H, g = r * np.eye(T * n), np.zeros(T * n)
    for k in range(1, T + 1):
        weight = qf if k == T else q
        G = psi[k].transpose(1, 0, 2).reshape(n, T * n)  # x_k = phi_k x0 + G u
        H += weight * G.T @ G
        g += weight * G.T @ (phi[k] @ x0)
    return np.linalg.solve(H, -g).reshape(T, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_riccati_gains_match_the_direct_lqr_solution(seed):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(3, 4, 4))
    q, r, qf = 0.7, 1.3, 2.0
    x0 = rng.normal(size=4)
    with jax.enable_x64(True):
        K = np.asarray(steering.riccati_gains(jnp.asarray(A), q, r, qf))
    x, feedback = x0, []
    for k in range(3):
        feedback.append(-K[k] @ x)
        x = A[k] @ x + feedback[-1]
    np.testing.assert_allclose(np.stack(feedback), _direct_lqr(A, q, r, qf, x0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("q, r, q_final, name", [(1.0, 0.0, 1.0, "r"), (-1.0, 1.0, 1.0, "q"), (1.0, 1.0, np.nan, "q_final")])
def test_riccati_gains_reject_weights_out_of_range(q, r, q_final, name):
    with pytest.raises(ArgumentError, match=f"^{name} must be a number in"):
        steering.riccati_gains(jnp.eye(2)[None], q, r, q_final)


def _controller(lm, lam, seed=0):
    n = CONFIG.hidden_size
    keys = jax.random.split(jax.random.key(seed), 2)
    A = jnp.eye(n) + 0.1 * jax.random.normal(keys[0], (CONFIG.num_hidden_layers, n, n))
    K = steering.riccati_gains(A, 0.5, 1.0, 0.5)
    E = jax.random.normal(keys[1], (CONFIG.num_hidden_layers + 1, n))
    return K, steering.controller(K, E, lam)


def test_rank_one_control_equals_the_full_gain_path(lm):
    K, ctrl = _controller(lm, lam=3.0)
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2]], jnp.int32)
    for positions in ("last", "all"):
        rank_one = lm.with_intervention(steering.alqr_intervention(ctrl, positions=positions)).logits(tokens)
        full = lm.with_intervention(steering.full_gain_intervention(K, ctrl, positions=positions)).logits(tokens)
        assert not np.allclose(rank_one, lm.logits(tokens), atol=1e-2)
        np.testing.assert_allclose(rank_one, full, atol=ATOL)


def test_setpoint_equal_to_the_current_feature_is_a_no_op(lm):
    """β*_k = v_kᵀx_k at the prompt's last token: α_k = 0 at every layer, u = 0 exactly."""
    K, ctrl = _controller(lm, lam=1.0)
    prompt = jnp.asarray([5, 9, 14, 2, 7], jnp.int32)
    states = steering.last_token_states(lm, prompt[None])[:, 0]  # [L+1, D]
    on_target = ctrl._replace(beta=jnp.sum(states[: CONFIG.num_hidden_layers] * ctrl.v, axis=-1))
    x = states[1]
    h = jnp.ones_like(x) * 0.3
    assert np.array_equal(steering.alqr_feedback(1, h, on_target, x), h)  # α = 0 exactly
    steered = lm.with_intervention(steering.alqr_intervention(on_target))
    plain = js.generate(jax.random.key(0), lm, prompt, 1, num_samples=32)
    same = js.generate(jax.random.key(0), steered, prompt, 1, num_samples=32)
    np.testing.assert_array_equal(same.tokens, plain.tokens)
    np.testing.assert_allclose(same.log_p, plain.log_p, atol=ATOL)


def test_controller_drives_the_feature_to_its_setpoint_on_a_linear_system():
    """One concept direction at every layer (E_k = E): x_{k+1} = A_k x_k + α_k d_k."""
    n, T = 6, 6
    rng = np.random.default_rng(3)
    E = jnp.broadcast_to(jnp.asarray(rng.normal(size=n)), (T, n))
    setpoint = 2.0 * float(jnp.linalg.norm(E[0]))  # λ = 2
    x0 = jnp.asarray(rng.normal(size=n))

    def feature_errors(A, r, steer=True):
        ctrl = steering.controller(steering.riccati_gains(A, 1.0, r, 1.0), E, 2.0)
        x, errors = x0, []
        for k in range(T):
            errors.append(abs(float(ctrl.v[k] @ x) - setpoint))
            x = A[k] @ x + steer * (ctrl.beta[k] - ctrl.v[k] @ x) * ctrl.d[k]
        return np.asarray(errors)

    # Identity dynamics, cheap control: K_k → I, so the feature reaches the setpoint after
    # one layer and stays there.
    identity = jnp.broadcast_to(jnp.eye(n), (T, n, n))
    errors = feature_errors(identity, r=1e-6)
    assert errors[0] > 0.5
    np.testing.assert_array_less(errors[1:], 1e-4 * errors[0])
    # Dynamics near the identity: the feedback keeps the feature near its setpoint while the
    # open loop drifts away (x_{k+1} = A_k x_k).
    near = identity + 0.05 * jnp.asarray(rng.normal(size=(T, n, n)))
    closed, open_loop = feature_errors(near, r=1e-3), feature_errors(near, r=1e-3, steer=False)
    assert closed[-1] < 0.2 * open_loop[-1]
    assert closed[1:].max() < 0.2 * errors[0]


def test_jacobian_matches_finite_differences_in_float64():
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), random_params(F64_CONFIG, 0))
        lm = models.make_language_model(F64_CONFIG, params)
        tokens = jnp.asarray([[1, 4, 9, 16, 5]])
        hidden = lm.hidden_states(tokens)
        for layer in range(F64_CONFIG.num_hidden_layers):
            block_input = hidden[layer]
            J = steering.last_token_jacobian(lm, layer, block_input, column_block=3)  # 3 ∤ 8: ragged blocks
            x0, eps = block_input[0, -1], 1e-6
            out = lambda x: lm.apply_layer(layer, block_input.at[:, -1].set(x))[0, -1]  # noqa: E731
            numeric = jnp.stack(
                [(out(x0 + eps * e) - out(x0 - eps * e)) / (2 * eps) for e in jnp.eye(x0.shape[0])], axis=1
            )
            np.testing.assert_allclose(J, numeric, rtol=1e-6, atol=1e-7)
            errors = steering.linearisation_error(lm, layer, block_input, J, [1e-4, 1e-3, 1e-2], jax.random.key(0))
            # smooth block: the residual grows about linearly with ‖δ‖
            assert errors[0] < errors[1] < errors[2] and errors[2] / errors[1] > 3
        averaged = steering.layer_jacobians(lm, jnp.concatenate([tokens, tokens[:, ::-1]]), column_block=8)
        assert averaged.shape == (2, 8, 8)


def test_controller_save_and_load(tmp_path, lm):
    _, ctrl = _controller(lm, lam=2.0)
    steering.save_controller(tmp_path / "c.safetensors", ctrl, {"q": 0.5, "lam": 2.0})
    loaded, settings = steering.load_controller(tmp_path / "c.safetensors")
    assert settings == {"q": 0.5, "lam": 2.0}
    jax.tree.map(np.testing.assert_array_equal, loaded, ctrl)
    with pytest.raises(CheckpointError, match="no such steering controller"):
        steering.load_controller(tmp_path / "missing.safetensors")


def test_a_layer_without_contrast_gets_no_control(lm):
    """E_k = 0 (both prompt sets end in the same token at the embedding): v_k = d_k = 0 and
    β*_k = 0, so that layer is left alone; the other layers are unchanged."""
    K, ctrl = _controller(lm, lam=2.0)
    E = jax.random.normal(jax.random.key(1), (CONFIG.num_hidden_layers + 1, CONFIG.hidden_size)).at[0].set(0.0)
    zeroed = steering.controller(K, E, 2.0)
    assert not np.any(zeroed.d[0]) and not np.any(zeroed.v[0]) and zeroed.beta[0] == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1:], b[1:], rtol=1e-6), zeroed, steering.controller(K, E.at[0].set(1.0), 2.0))
    h = jnp.ones((1, 1, CONFIG.hidden_size))
    assert np.array_equal(steering.alqr_feedback(0, h, zeroed, 2 * h), h)
    vectors = steering.mean_difference_intervention(E, 3.0, CONFIG.num_hidden_layers).params
    assert not np.any(vectors[0]) and np.all(np.isfinite(vectors))


TOKENS = jnp.asarray([[3, 1, 4, 1, 5, 9, 2]], jnp.int32)
L, D = CONFIG.num_hidden_layers, CONFIG.hidden_size
VECTOR, DIRECTIONS = jnp.ones(D), jnp.ones((L + 1, D))
STATES = jnp.ones((L + 1, 2, D))
GAINS = jnp.broadcast_to(jnp.eye(D), (L, D, D))
ONE_ROW = steering.Controller(np.ones((1, D)), np.ones((1, D)), np.ones(1))  # T = 1: block 0 only
WIDE = steering.Controller(np.ones((L, D + 3)), np.ones((L, D + 3)), np.ones(L))


@pytest.mark.parametrize(
    "call, message",
    [
        # one [D] vector used to be indexed per coordinate: a scalar added to every feature
        (lambda lm: steering.actadd_intervention(VECTOR, 1, 4.0), r"E must have shape \[L\(\+1\), D\].*got \(32,\)"),
        (lambda lm: steering.mean_difference_intervention(VECTOR, 1.0, L), r"E must have shape \[L\(\+1\), D\]"),
        (lambda lm: steering.mean_difference_intervention(DIRECTIONS, 1.0, L + 2), r"num_layers must be an integer in \[1, 4\], got 5"),
        (lambda lm: steering.controller(GAINS, VECTOR, 1.0), r"E must have shape \[L\(\+1\), D\]"),
        (lambda lm: steering.controller(GAINS, DIRECTIONS[:, :4], 1.0), r"E must have shape \[T\(\+1\), n\] = \[3\(\+1\), 32\]"),
        # layer L (hidden_states has L+1 entries) used to give layer L-1's Jacobian
        (lambda lm: steering.last_token_jacobian(lm, L, STATES[0]), r"layer must be an integer in \[0, 2\], got 3"),
        (lambda lm: steering.last_token_jacobian(lm, jnp.int32(99), STATES[0]), r"layer must be an integer in \[0, 2\], got 99"),
        (lambda lm: steering.linearisation_error(lm, -1, STATES[0], jnp.eye(D), 0.01, jax.random.key(0)), r"layer must be an integer"),
        (lambda lm: steering.linearisation_error(lm, 0, STATES[0], jnp.eye(D), [[0.01]], jax.random.key(0)), r"scales must be a number or a \[S\] array"),
        (lambda lm: steering.linearisation_error(lm, 0, STATES[0], jnp.eye(D), [0.01, 0.0], jax.random.key(0)), r"scales must be a number in \(0, inf\), got 0.0"),
        # length 0 used to wrap to the padded last position, 20 > T to read NaN states
        (lambda lm: steering.last_token_states(lm, TOKENS, jnp.array([0])), r"lengths holds 0 at index \(0,\), outside the prompt width \[1, 8\)"),
        (lambda lm: steering.last_token_states(lm, TOKENS, jnp.array([20])), r"lengths holds 20 at index \(0,\), outside the prompt width \[1, 8\)"),
        (lambda lm: steering.last_token_states(lm, TOKENS, jnp.array([3, 4])), r"lengths must have shape \[P\] = \(1,\), one per prompt, got \(2,\)"),
        (lambda lm: steering.last_token_states(lm, TOKENS, jnp.array([2.5])), "lengths must hold integers, got dtype float32"),
        # one layer's [P, D] states used to be averaged over features
        (lambda lm: steering.contrastive_directions(STATES[1], STATES[2]), r"desired must have shape \[L\+1, P, D\].*got \(2, 32\)"),
        (lambda lm: steering.contrastive_directions(STATES, STATES[:, :, :4]), r"desired and undesired must share L\+1 and D"),
        # blocks past the controller's rows used to reuse its last row (JAX clamps the index)
        (lambda lm: steering.alqr_intervention(ONE_ROW, layers=(0, 1, 2)), r"layers must be block indices in \[0, T\) = \[0, 1\).*got \(0, 1, 2\)"),
        (lambda lm: steering.full_gain_intervention(GAINS[:1], ONE_ROW, layers=(1,)), r"layers must be block indices in \[0, T\) = \[0, 1\)"),
        (lambda lm: steering.full_gain_intervention(GAINS, ONE_ROW), r"K must have shape \[T, n, n\] = \[1, 32, 32\].*got \(3, 32, 32\)"),
        # a controller of another width used to fail inside XLA's broadcasting
        (lambda lm: lm.with_intervention(steering.alqr_intervention(WIDE)).logits(TOKENS), r"controller's width n = 35 does not match the model's hidden size D = 32"),
        (lambda lm: lm.with_intervention(steering.full_gain_intervention(np.ones((L, D + 3, D + 3)), WIDE)).logits(TOKENS), r"width n = 35"),
        (lambda lm: lm.with_intervention(steering.actadd_intervention(WIDE.v, 1, 4.0)).logits(TOKENS), r"width n = 35 does not match .* D = 32"),
    ],
)
def test_steering_helpers_reject_bad_shapes_and_ranges(lm, call, message):
    with pytest.raises(ArgumentError, match=message):
        call(lm)


def test_linearisation_error_accepts_a_scalar_scale(lm):
    run = lambda h: steering.linearisation_error(lm, 0, h, jnp.eye(D), 0.01, jax.random.key(0))  # noqa: E731
    assert jax.eval_shape(run, STATES[:1]).shape == (1,)  # shapes only: no compile
