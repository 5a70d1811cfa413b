"""A-LQR: layer-wise linearisation and finite-horizon LQR feedback on the residual stream.

Skifstad, Yang, Chou, "Local Linearity of LLMs Enables Activation Steering via Model-Based
Linear Optimal Control" (arXiv 2604.19018); public code trustworthyrobotics/lqr-activation-
steering. The state x_k is the residual stream at the last position entering block k; the
control u_k is added to block k's output there (B = I), so x_{k+1} = f_k(x_k) + u_k. Offline:
Jacobians A_k of each block at the last position (averaged over prompts), a contrastive
setpoint direction E_k per layer, Riccati gains K_k. Online: u_k = K_k e_k with
e_k = (β*_k − v_kᵀx_k) v_k, v_k = E_k/‖E_k‖, β*_k = λ‖E_k‖.

Rank-one runtime form [reconstruction: our derivation, exact for this controller]: K_k and
v_k are fixed, so u_k = α_k d_k with d_k = K_k v_k precomputed and α_k = β*_k − v_kᵀx_k;
O(n) per layer and token instead of the reference code's n×n product (the full-K form is
kept as `full_gain_intervention`, the test oracle). It runs inside every sampler as a
`jaxsample.Intervention` reading the block input (`reads_block_input=True`).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.errors import ArgumentError
from jaxsample.lm import LanguageModel
from jaxsample.models.intervention import Intervention
from jaxsample.validation import check_int, check_int_array, check_real, is_int

Array = jax.Array


class Controller(NamedTuple):
    """The rank-one A-LQR controller of T = L layers (n = D).

    Attributes:
      d: `[T, n]` feedback directions d_k = K_k v_k.
      v: `[T, n]` unit setpoint directions v_k = E_k / ‖E_k‖.
      beta: `[T]` setpoints β*_k = λ‖E_k‖.
    """

    d: Array
    v: Array
    beta: Array


def check_directions(E: Array) -> Array:
    """E as an array; raises unless it is `[L(+1), D]`, one contrastive direction per layer
    (a single `[D]` vector would be indexed per coordinate instead of per layer)."""
    E = jnp.asarray(E)
    if E.ndim != 2:
        raise ArgumentError(f"E must have shape [L(+1), D] (one contrastive direction per layer), got {E.shape}")
    return E


def controller_layers(layers, rows: int) -> tuple[int, ...]:
    """The blocks an intervention edits (default: one per controller row) as a tuple of ints;
    raises unless each is a row of the controller. The feedback at block k reads row k of its
    params, and JAX would clamp an index past the last row to that row."""
    if layers is None:
        return tuple(range(rows))
    layers = tuple(np.atleast_1d(layers).tolist())
    for layer in layers:
        if not is_int(layer) or not 0 <= layer < rows:
            raise ArgumentError(
                f"layers must be block indices in [0, T) = [0, {rows}), T the controller's rows "
                f"(row k steers block k), got {layers}"
            )
    return layers


def check_width(h: Array, width: int) -> None:
    """Raises unless the residual stream `h [..., D]` has the controller's width n = D (shapes
    are static, so this runs once when the model is traced, not per step)."""
    if h.shape[-1] != width:
        raise ArgumentError(
            f"the controller's width n = {width} does not match the model's hidden size D = {h.shape[-1]}"
        )


def _check_layer(lm: LanguageModel, layer) -> None:
    """A concrete `layer` must name a block in [0, L): `hidden_states` has L+1 entries, and an
    index past the blocks would be clamped to the last one. Traced layers pass unchecked."""
    if not isinstance(layer, jax.core.Tracer):
        check_int("layer", layer, 0, lm.num_layers - 1)


def last_token_states(lm: LanguageModel, prompts: Array, lengths: Array | None = None) -> Array:
    """Residual stream at each prompt's last real token: int32 `[P, T]` (right-padded, real
    lengths `[P]`, default T) → float32 `[L+1, P, D]`; entry k is the input of block k,
    entry L the last block's output."""
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ArgumentError(f"prompts must have shape [P, T], got {prompts.shape}")
    if lengths is None:
        return lm.hidden_states(prompts)[:, :, -1]
    num_prompts, width = prompts.shape
    lengths = jnp.asarray(lengths)
    if lengths.shape != (num_prompts,):
        raise ArgumentError(f"lengths must have shape [P] = ({num_prompts},), one per prompt, got {lengths.shape}")
    # A length of 0 would wrap to the padded last position, one past T would read NaN.
    check_int_array("lengths", lengths, 1, width + 1, "the prompt width")
    hidden = lm.hidden_states(prompts)
    last = lengths.astype(jnp.int32) - 1
    return jnp.take_along_axis(hidden, last[None, :, None, None], axis=2)[:, :, 0]


def contrastive_directions(desired: Array, undesired: Array) -> Array:
    """E_k = mean(x_k | desired) − mean(x_k | undesired): states `[L+1, P, D]` and
    `[L+1, P', D]` (from `last_token_states`) → `[L+1, D]`."""
    desired, undesired = jnp.asarray(desired), jnp.asarray(undesired)
    for name, states in (("desired", desired), ("undesired", undesired)):
        if states.ndim != 3 or not states.shape[1]:
            raise ArgumentError(f"{name} must have shape [L+1, P, D] with P ≥ 1 (from last_token_states), got {states.shape}")
    if (desired.shape[0], desired.shape[2]) != (undesired.shape[0], undesired.shape[2]):
        raise ArgumentError(
            f"desired and undesired must share L+1 and D, got shapes {desired.shape} and {undesired.shape}"
        )
    return jnp.mean(desired, axis=1) - jnp.mean(undesired, axis=1)


def _block_output_at_last(lm: LanguageModel, layer, block_input: Array):
    """x ↦ block `layer`'s output at the last position of `block_input [1, T, D]` when the
    state there is x (other positions held at their values; only the last position is
    computed, so each Jacobian column costs one position's work)."""
    context = block_input[:, :-1]

    def f(x):
        return lm.apply_layer_at_last(layer, context, x.astype(block_input.dtype)[None])[0]

    return f


def last_token_jacobian(lm: LanguageModel, layer, block_input: Array, column_block: int = 64) -> Array:
    """A = ∂ f_layer(X)[last] / ∂ X[last] with the other positions held at their values.

    Forward mode (`jax.jvp`), streamed over blocks of `column_block` basis directions so a
    wide model holds `column_block` tangents at a time, not n.

    Args:
      lm: a Flax decoder port.
      layer: block index in [0, L) (int or traced int32).
      block_input: `[1, T, D]` (or `[T, D]`) residual stream entering the block.
      column_block: basis directions per forward-mode pass.

    Returns:
      float32 `[D, D]`, column j the response to a unit change of coordinate j.
    """
    column_block = check_int("column_block", column_block, 1)
    _check_layer(lm, layer)
    block_input = jnp.asarray(block_input)
    if block_input.ndim == 2:
        block_input = block_input[None]
    n = block_input.shape[-1]
    f = _block_output_at_last(lm, layer, block_input)
    x0 = block_input[0, -1]
    blocks = -(-n // column_block)
    basis = jnp.eye(blocks * column_block, n, dtype=x0.dtype).reshape(blocks, column_block, n)
    columns = jax.lax.map(lambda block: jax.vmap(lambda t: jax.jvp(f, (x0,), (t,))[1])(block), basis)
    return columns.reshape(blocks * column_block, -1)[:n].T


def layer_jacobians(lm: LanguageModel, prompts: Array, column_block: int = 64) -> Array:
    """A_k for every block, averaged over equal-length prompts `[P, T]` → `[L, D, D]`
    (one compilation: the layer index is traced)."""
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2:
        raise ArgumentError(f"prompts must have shape [P, T] (equal lengths), got {prompts.shape}")
    column_block = check_int("column_block", column_block, 1)
    hidden = lm.hidden_states(prompts)  # [L+1, P, T, D]
    return jnp.stack(
        [_mean_jacobian(lm, jnp.int32(k), hidden[k], column_block) for k in range(lm.num_layers)]
    )


@partial(jax.jit, static_argnames="column_block")
def _mean_jacobian(lm, layer, inputs, column_block):
    jacobians = jax.lax.map(lambda x: last_token_jacobian(lm, layer, x[None], column_block), inputs)
    return jnp.mean(jacobians, axis=0)


def linearisation_error(lm: LanguageModel, layer: int, block_input: Array, jacobian: Array, scales, key: Array) -> Array:
    """‖f(x+δ) − f(x) − Aδ‖ / ‖δ‖ for random directions δ of norm `scales[i]·‖x‖`.

    Args:
      layer: block index in [0, L) (int or traced int32).
      block_input: `[1, T, D]` or `[T, D]` residual stream entering block `layer`.
      jacobian: `[D, D]`, e.g. from `last_token_jacobian` (or averaged over prompts).
      scales: relative perturbation sizes > 0, `[S]` or a scalar.
      key: PRNG key for the directions.

    Returns:
      float32 `[S]` relative residuals; O(‖δ‖) when the block is smooth and A its Jacobian.
    """
    _check_layer(lm, layer)
    if np.ndim(scales) > 1:
        raise ArgumentError(f"scales must be a number or a [S] array, got shape {np.shape(scales)}")
    check_real("scales", scales, "(0, inf)")
    block_input = jnp.asarray(block_input)
    if block_input.ndim == 2:
        block_input = block_input[None]
    f = _block_output_at_last(lm, layer, block_input)
    x0 = block_input[0, -1]
    scales = jnp.atleast_1d(jnp.asarray(scales, x0.dtype))
    directions = jax.random.normal(key, (scales.shape[0], x0.shape[0]), x0.dtype)
    deltas = directions / jnp.linalg.norm(directions, axis=1, keepdims=True) * (scales * jnp.linalg.norm(x0))[:, None]
    base = f(x0)

    def residual(delta):
        return jnp.linalg.norm(f(x0 + delta) - base - jacobian @ delta) / jnp.linalg.norm(delta)

    return jax.vmap(residual)(deltas)


def riccati_gains(A: Array, q, r, q_final) -> Array:
    """Finite-horizon LQR gains for x_{k+1} = A_k x_k + u_k (B = I), cost
    Σ_k (q‖x_k‖² + r‖u_k‖²) + q_final‖x_T‖², optimal control u_k = −K_k x_k.

    Backward Riccati recursion (a reverse `lax.scan`, `linalg.solve` for P⁻¹):
    S_T = q_f I; P_k = S_{k+1} + rI; K_k = P_k⁻¹ S_{k+1} A_k;
    S_k = qI + A_kᵀ S_{k+1} A_k − (S_{k+1} A_k)ᵀ K_k.

    Args:
      A: `[T, n, n]` layer Jacobians.
      q, r, q_final: weights q, q_final ≥ 0 and r > 0 (traced under jit; checked when concrete).

    Returns:
      K `[T, n, n]`.
    """
    A = jnp.asarray(A)
    if A.ndim != 3 or A.shape[1] != A.shape[2]:
        raise ArgumentError(f"A must have shape [T, n, n], got {A.shape}")
    # r > 0 keeps S + rI invertible; q, q_final ≥ 0 keep S positive semidefinite.
    check_real("r", r, "(0, inf)")
    check_real("q", q, "[0, inf)")
    check_real("q_final", q_final, "[0, inf)")
    n = A.shape[-1]
    eye = jnp.eye(n, dtype=A.dtype)

    def step(S, A_k):
        F = S @ A_k
        K = jnp.linalg.solve(S + r * eye, F)
        S_prev = q * eye + A_k.T @ F - F.T @ K
        return 0.5 * (S_prev + S_prev.T), K

    _, K = jax.lax.scan(step, q_final * eye, A, reverse=True)
    return K


def unit_directions(E: Array) -> tuple[Array, Array]:
    """`(v [T, n], ‖E‖ [T])` with v_k = E_k/‖E_k‖, and v_k = 0 where E_k = 0: a layer where
    the two prompt sets do not differ (e.g. the embedding, when every prompt ends in the
    same token) has no direction to steer along."""
    norms = jnp.linalg.norm(E, axis=-1)
    return E / jnp.where(norms > 0, norms, 1.0)[:, None], norms


def controller(K: Array, E: Array, lam) -> Controller:
    """The rank-one controller: v_k = E_k/‖E_k‖, β*_k = λ‖E_k‖, d_k = K_k v_k (all zero at a
    layer with E_k = 0, see `unit_directions`: no control there).

    Args:
      K: `[T, n, n]` gains.
      E: `[T, n]` (or `[T+1, n]`: the final output's row is dropped) contrastive directions.
      lam: λ, the setpoint scale (traced).
    """
    K, E = jnp.asarray(K), check_directions(E)
    if K.ndim != 3 or K.shape[1] != K.shape[2]:
        raise ArgumentError(f"K must have shape [T, n, n], got {K.shape}")
    T, n = K.shape[0], K.shape[-1]
    if E.shape[0] < T or E.shape[1] != n:
        raise ArgumentError(f"E must have shape [T(+1), n] = [{T}(+1), {n}] to match K {K.shape}, got {E.shape}")
    v, norms = unit_directions(E[:T])
    return Controller(d=jnp.einsum("kij,kj->ki", K, v), v=v, beta=lam * norms)


def alqr_feedback(layer, h, params: Controller, x):
    """u_k = (β*_k − v_kᵀ x_k) d_k added to block k's output `h`; `x` is its input."""
    check_width(h, params.d.shape[-1])
    alpha = params.beta[layer] - jnp.sum(x * params.v[layer], axis=-1, keepdims=True)
    return h + (alpha * params.d[layer]).astype(h.dtype)


def alqr_intervention(ctrl: Controller, layers=None, positions: str = "last") -> Intervention:
    """The runtime A-LQR control as an `Intervention` (default: every layer, last position;
    `positions="all"` is the paper's "A-LQR+").

    Raises:
      ArgumentError: a layer past the controller's T rows (row k steers block k); a model
        whose hidden size is not the controller's n, when the intervention is traced.
    """
    layers = controller_layers(layers, ctrl.d.shape[0])
    return Intervention(alqr_feedback, ctrl, layers, positions, reads_block_input=True)


def full_gain_feedback(layer, h, params, x):
    """u_k = K_k e_k with e_k = (β*_k − v_kᵀx_k) v_k, the n×n product (test oracle)."""
    check_width(h, params["v"].shape[-1])
    alpha = params["beta"][layer] - jnp.sum(x * params["v"][layer], axis=-1, keepdims=True)
    return h + ((alpha * params["v"][layer]) @ params["K"][layer].T).astype(h.dtype)


def full_gain_intervention(K: Array, ctrl: Controller, layers=None, positions: str = "last") -> Intervention:
    """The same controller applying the full gain matrices K_k (the reference code's form);
    K `[T, n, n]` as `ctrl`'s rows and width, checked as for `alqr_intervention`."""
    K = jnp.asarray(K)
    T, n = ctrl.v.shape
    if K.shape != (T, n, n):
        raise ArgumentError(f"K must have shape [T, n, n] = [{T}, {n}, {n}] to match the controller, got {K.shape}")
    layers = controller_layers(layers, T)
    params = {"K": K, "v": ctrl.v, "beta": ctrl.beta}
    return Intervention(full_gain_feedback, params, layers, positions, reads_block_input=True)
