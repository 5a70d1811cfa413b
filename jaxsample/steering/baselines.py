"""Steering baselines in the same `Intervention` API as A-LQR: ActAdd (a constant vector at
one layer), a constant mean-difference vector at every layer (both open loop) and S-PID,
the reference code's PID feedback across layers on A-LQR's error signal.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsample.errors import ArgumentError
from jaxsample.models.intervention import Intervention
from jaxsample.steering.alqr import Controller, check_directions, check_width, controller_layers, unit_directions
from jaxsample.validation import check_int

Array = jax.Array


def add_vector(layer, h, vectors):
    """Adds row `layer` of `vectors [L, D]` to block `layer`'s output."""
    check_width(h, vectors.shape[-1])
    return h + vectors[layer].astype(h.dtype)


def actadd_intervention(E: Array, layer: int, coefficient, positions: str = "last") -> Intervention:
    """ActAdd: u = c · E_layer added after one block (E `[L(+1), D]` contrastive directions,
    c traced)."""
    E = check_directions(E)
    if not 0 <= layer < E.shape[0]:
        raise ArgumentError(f"layer must be in [0, {E.shape[0]}), got {layer}")
    vectors = jnp.zeros_like(E).at[layer].set(coefficient * E[layer])
    return Intervention(add_vector, vectors, (int(layer),), positions)


def mean_difference_intervention(E: Array, coefficient, num_layers: int, positions: str = "last") -> Intervention:
    """A constant mean-difference vector at every block: u_k = c · E_k / ‖E_k‖ (0 where
    E_k = 0)."""
    E = check_directions(E)
    # Fewer rows than layers would leave the later blocks indexing past the end (clamped).
    num_layers = check_int("num_layers", num_layers, 1, E.shape[0])
    vectors = coefficient * unit_directions(E[:num_layers])[0]
    return Intervention(add_vector, vectors, tuple(range(num_layers)), positions)


class PIDGains(NamedTuple):
    """S-PID's setpoint and gains (all traced).

    Attributes:
      v: `[T, n]` unit setpoint directions (A-LQR's v_k).
      beta: `[T]` setpoints β*_k.
      kp, ki, kd: scalar proportional, integral and derivative gains.
    """

    v: Array
    beta: Array
    kp: Array
    ki: Array
    kd: Array


def pid_carry(h, params):
    """S-PID's per-position state entering the first block: (Σ_{j<k} e_j, e_{k−1}), both
    zero, float32 `[B, T, D]`."""
    zeros = jnp.zeros(h.shape, jnp.float32)
    return zeros, zeros


def pid_feedback(layer, h, params: PIDGains, x, carry):
    """u_k = K_p e_k + K_i Σ_{j≤k} e_j + K_d (e_k − e_{k−1}) added to block k's output `h`,
    e_k = (β*_k − v_kᵀx_k) v_k from the block input `x`; carry = (Σ_{j<k} e_j, e_{k−1})."""
    check_width(h, params.v.shape[-1])
    integral, previous = carry
    v = params.v[layer].astype(jnp.float32)
    error = (params.beta[layer] - jnp.sum(x.astype(jnp.float32) * v, axis=-1, keepdims=True)) * v
    integral = integral + error
    u = params.kp * error + params.ki * integral + params.kd * (error - previous)
    return h + u.astype(h.dtype), (integral, error)


def pid_intervention(ctrl: Controller, kp, ki, kd, layers=None, positions: str = "last") -> Intervention:
    """S-PID: PID control across layers at each edited position, on A-LQR's error
    e_k = (β*_k − v_kᵀx_k) v_k (same v, β* as `ctrl`; its gains d are not used).

    The sums run over the edited blocks `layers` (default all) of one forward or decode
    step, at the same position. [Reconstruction] e_{−1} = 0: the derivative term at the
    first edited block is K_d e_k (the anchors give only the formula
    u = K_p e + K_i Σe + K_d Δe).

    Args:
      ctrl: an A-LQR `Controller` (its v and β*).
      kp, ki, kd: gains (traced scalars).
      layers: edited blocks, default every layer of the controller.
      positions: `"last"` or `"all"`, as for `alqr_intervention`.

    Raises:
      ArgumentError: as `alqr_intervention` (a layer past the controller's rows, a model of
        another hidden size).
    """
    layers = controller_layers(layers, ctrl.v.shape[0])
    gains = PIDGains(ctrl.v, ctrl.beta, *(jnp.asarray(g, jnp.float32) for g in (kp, ki, kd)))
    return Intervention(pid_feedback, gains, layers, positions, reads_block_input=True, carry_init=pid_carry)
