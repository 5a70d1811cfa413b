"""S-PID: PID feedback across layers through the intervention's carried state, against the
same control computed by hand with embed / apply_layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsample as js
from jaxsample import models, steering
from jaxsample.errors import ArgumentError
from tests.models.test_kv_cache import ATOL, CONFIG, random_params

L, D = CONFIG.num_hidden_layers, CONFIG.hidden_size
TOKENS = jnp.asarray([3, 1, 4, 1, 5, 9], jnp.int32)


@pytest.fixture(scope="module")
def lm():
    return models.make_language_model(CONFIG, random_params(CONFIG, 0), name="tiny")


def _ctrl(lam=2.0, seed=0):
    E = jax.random.normal(jax.random.key(seed), (L + 1, D))
    return steering.controller(jnp.broadcast_to(jnp.eye(D), (L, D, D)), E, lam)


def _pid_by_hand(lm, ctrl, gains, layers, edit_from):
    """Logits `[T, V]` of TOKENS with u_k = K_p e_k + K_i Σ e + K_d (e_k − e_prev) added after
    the blocks in `layers` at positions ≥ edit_from; sums over the edited blocks only."""
    kp, ki, kd = gains
    h = lm.embed(TOKENS[None])
    integral = previous = jnp.zeros_like(h)
    for k in range(L):
        out = lm.apply_layer(k, h)
        if k in layers:
            error = (ctrl.beta[k] - h @ ctrl.v[k])[..., None] * ctrl.v[k]
            integral = integral + error
            u = kp * error + ki * integral + kd * (error - previous)
            previous = error
            out = out.at[:, edit_from:].add(u[:, edit_from:])
        h = out
    return lm.final_logits(h)[0]


@pytest.mark.parametrize("layers", [(0, 1, 2), (0, 2)])
def test_pid_equals_the_control_computed_by_hand_at_every_position(lm, layers):
    ctrl, gains = _ctrl(), (0.4, 0.3, -0.2)
    steered = lm.with_intervention(steering.pid_intervention(ctrl, *gains, layers=layers, positions="all"))
    expected = _pid_by_hand(lm, ctrl, gains, layers, 0)
    assert not np.allclose(expected, lm.logits(TOKENS), atol=1e-2)  # the control matters
    np.testing.assert_allclose(steered.logits(TOKENS), expected, atol=ATOL)


def test_pid_integral_in_prefill_and_decode_steps(lm):
    """The carry starts fresh in prefill and in each decode step: both reproduce the
    last-position control of the full forward."""
    ctrl, gains = _ctrl(seed=1), (0.2, 0.5, 0.3)
    steered = lm.with_intervention(steering.pid_intervention(ctrl, *gains))
    expected = _pid_by_hand(lm, ctrl, gains, range(L), 4)
    np.testing.assert_allclose(steered.forward(TOKENS, intervene_from=4), expected, atol=ATOL)
    logits, cache = steered.prefill(TOKENS[None, :5], jnp.asarray([5]), steered.init_cache(1, 8))
    np.testing.assert_allclose(logits[0], expected[4], atol=ATOL)
    logits, _ = steered.decode(TOKENS[5:], cache)
    np.testing.assert_allclose(logits[0], expected[5], atol=ATOL)


def test_proportional_pid_is_proportional_feedback(lm):
    """K_i = K_d = 0: u_k = K_p e_k, i.e. A-LQR's feedback with d_k = K_p v_k."""
    ctrl, kp = _ctrl(seed=2), 0.6
    pid = lm.with_intervention(steering.pid_intervention(ctrl, kp, 0.0, 0.0, positions="all"))
    proportional = lm.with_intervention(steering.alqr_intervention(ctrl._replace(d=kp * ctrl.v), positions="all"))
    np.testing.assert_allclose(pid.logits(TOKENS), proportional.logits(TOKENS), atol=ATOL)
    np.testing.assert_allclose(pid.logits(TOKENS), _pid_by_hand(lm, ctrl, (kp, 0.0, 0.0), range(L), 0), atol=ATOL)


def test_setpoint_equal_to_the_current_feature_is_a_no_op(lm):
    prompt = TOKENS[:5]
    states = steering.last_token_states(lm, prompt[None])[:, 0]
    ctrl = _ctrl(seed=3)
    on_target = ctrl._replace(beta=jnp.sum(states[:L] * ctrl.v, axis=-1))
    h, zeros = jnp.full((1, 1, D), 0.3), jnp.zeros((1, 1, D))
    gains = steering.PIDGains(on_target.v, on_target.beta, 1.0, 1.0, 1.0)
    edited, (integral, previous) = steering.pid_feedback(1, h, gains, states[1][None, None], (zeros, zeros))
    assert np.array_equal(edited, h) and not np.any(integral) and not np.any(previous)  # e = 0 exactly
    steered = lm.with_intervention(steering.pid_intervention(on_target, 1.0, 1.0, 1.0))
    np.testing.assert_allclose(steered.logits(prompt)[-1], lm.logits(prompt)[-1], atol=ATOL)


def test_a_carry_of_the_wrong_structure_is_rejected(lm):
    def drops_the_carry(layer, h, params, carry):
        return h, None

    iv = js.Intervention(drops_the_carry, jnp.zeros(()), (0,), carry_init=lambda h, params: jnp.zeros(h.shape))
    with pytest.raises(ArgumentError, match="carry of structure"):
        lm.with_intervention(iv).logits(TOKENS)
    with pytest.raises(ArgumentError, match="carry_init must be callable"):
        lm.with_intervention(js.Intervention(drops_the_carry, jnp.zeros(()), (0,), carry_init=3))


def test_a_controller_that_does_not_fit_is_rejected(lm):
    """Blocks past the controller's rows used to reuse its last row (JAX clamps the index); a
    controller of another width used to fail inside XLA's broadcasting."""
    one_row = steering.Controller(np.ones((1, D)), np.ones((1, D)), np.ones(1))
    with pytest.raises(ArgumentError, match=r"layers must be block indices in \[0, T\) = \[0, 1\).*got \(0, 2\)"):
        steering.pid_intervention(one_row, 1.0, 0.0, 0.0, layers=(0, 2))
    wide = steering.Controller(np.ones((L, D + 3)), np.ones((L, D + 3)), np.ones(L))
    with pytest.raises(ArgumentError, match=r"controller's width n = 35 does not match the model's hidden size D = 32"):
        lm.with_intervention(steering.pid_intervention(wide, 1.0, 0.0, 0.0)).logits(TOKENS)
