"""TRI-TSMC twist learning over the unmasking trajectory of a masked-diffusion LM.

**Reconstruction** (as `jaxsample.smc.trust_region`, from the TRI-TSMC abstract only). Each
iteration: (1) an SIS pass (twisted SMC with κ = 0) under the current twist ψ_θ gives N
unmasking paths and their log-weights lw_i = log p(X^i) φ(x_0^i) − log q_θ(X^i); (2) the landed
`solve_trust_region_beta(lw, ε)` picks β so that KL(Q̃_β ‖ Q_θ) = ε (β = 1 when the budget
does not bind); (3) θ is fitted by weighted maximum likelihood of the twisted proposal,
min_θ −Σ_i W̄_i(β) Σ_t log q_θ(i_t, v_t | x_t^i), with the exact normaliser over every
(position, token) child, by Adam; (4) repeat. The last step's proposal uses φ and has no θ.

The default twist head is linear on the frozen denoiser's features of x_t:
log ψ_θ(x_t[i←v]) = h_i(x_t) · W_{:, v} + b_v, initialised to 0 (ψ = 1, so q = p).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsample.diffusion.model import MaskedDiffusionLM
from jaxsample.diffusion.twisted import LogTwistFn, twisted_diffusion_smc
from jaxsample.smc.trust_region import solve_trust_region_beta, tempered_log_weights, trust_region_kl
from jaxsample.smc.twist_learning import TwistInfo, fit_steps, init_adam
from jaxsample.smc.weights import ess, log_evidence
from jaxsample.validation import check_int, check_real

Array = jax.Array


def init_linear_twist(model: MaskedDiffusionLM) -> dict:
    """Zero parameters of `linear_log_twist`: w f32 `[D, V]`, b f32 `[V]`."""
    c = model.config
    return {"w": jnp.zeros((c.hidden_size, c.vocab_size)), "b": jnp.zeros(c.vocab_size)}


def linear_log_twist(params: dict, tokens: Array, step: Array, features: Array) -> Array:
    """log ψ of every child x_t[i←v]: features `[T, D]` @ w + b → f32 `[T, V]`."""
    del tokens, step
    return features @ params["w"] + params["b"]


class UnmaskingPaths(NamedTuple):
    """N unmasking paths of one SIS pass, the data of a twist fit.

    Attributes:
      parents: int32 `[T, N, T]` x_t before step t.
      choices: int32 `[T, N]` position · V + token drawn at step t.
      log_weights: f32 `[N]` SIS log-weights lw_i = log p(X^i) φ(x_0^i) − log q_θ(X^i).
      log_potential: f32 `[N]` log φ(x_0^i) of each clean sequence.
    """

    parents: Array
    choices: Array
    log_weights: Array
    log_potential: Array


def reconstruct_paths(model: MaskedDiffusionLM, tokens: Array, positions: Array) -> tuple[Array, Array]:
    """Parents `[T, N, T]` and choices `[T, N]` of resampling-free runs from their clean
    tokens `[N, T]` and the position unmasked at each step `[T, N]`."""
    c = model.config
    steps = jnp.arange(c.seq_len)
    # unmasked_at[n, i]: the step at which particle n unmasked position i.
    unmasked_at = jnp.argmax(positions.T[:, :, None] == steps[None, None, :], axis=1)
    parents = jnp.where(unmasked_at[None] >= steps[:, None, None], c.mask_id, tokens[None])
    values = jnp.take_along_axis(tokens, positions.T, axis=1).T
    return parents, positions * c.vocab_size + values


def path_log_q(model: MaskedDiffusionLM, log_twist_fn: LogTwistFn, params: Any, paths: UnmaskingPaths) -> Array:
    """Σ over the twisted steps (all but the last) of log q_θ(choice | parent): f32 `[N]`."""
    c = model.config
    parents = paths.parents[:-1]
    log_p, features = model.logits_and_features(parents)        # [T-1, N, T, V], [T-1, N, T, D]
    log_p, features = jax.lax.stop_gradient((log_p, features))
    masked = parents == c.mask_id
    log_position = jnp.where(masked, -jnp.log(jnp.sum(masked, -1, keepdims=True).astype(jnp.float32)), -jnp.inf)
    steps = jnp.broadcast_to(jnp.arange(c.seq_len - 1)[:, None], parents.shape[:2])
    twist = jax.vmap(jax.vmap(log_twist_fn, (None, 0, 0, 0)), (None, 0, 0, 0))(params, parents, steps, features)
    log_joint = (log_position[..., None] + log_p + twist).reshape(*parents.shape[:2], -1)
    log_q = jnp.take_along_axis(jax.nn.log_softmax(log_joint, -1), paths.choices[:-1, :, None], -1)[..., 0]
    return jnp.sum(log_q, axis=0)


@partial(jax.jit, static_argnames=("log_twist_fn", "optimizer", "num_fit_steps"))
def _fit(model, params, opt_state, paths, weights, *, log_twist_fn, optimizer, num_fit_steps):
    def loss_fn(p):
        return -jnp.sum(weights * path_log_q(model, log_twist_fn, p, paths))

    params, opt_state, losses = fit_steps(loss_fn, optimizer, params, opt_state, num_fit_steps)
    return params, opt_state, losses[-1]


def tri_iteration(key: Array, model: MaskedDiffusionLM, log_potential_fn, params: Any, opt_state: Any, *,
                  log_twist_fn: LogTwistFn, optimizer: optax.GradientTransformation, kl_budget: float,
                  num_particles: int, num_fit_steps: int) -> tuple[Any, Any, TwistInfo]:
    """One TRI-TSMC iteration (module docstring).

    Returns:
      `(params, opt_state, info)`; info is a `jaxsample.smc.TwistInfo` of f32 `[]` fields,
      as the autoregressive twist learner reports (one target here, so no mean over prompts).
    """
    run = twisted_diffusion_smc(key, model, log_potential_fn, num_particles=num_particles,
                                log_twist_fn=log_twist_fn, twist_params=params, ess_threshold=0.0,
                                return_infos=True)
    result, infos = run
    parents, choices = reconstruct_paths(model, result.tokens, infos.position)
    log_potential = jax.vmap(log_potential_fn)(result.tokens)
    paths = UnmaskingPaths(parents, choices, result.log_weights, log_potential)
    beta = solve_trust_region_beta(result.log_weights, kl_budget)
    weights = jnp.exp(tempered_log_weights(result.log_weights, beta))
    params, opt_state, loss = _fit(model, params, opt_state, paths, weights, log_twist_fn=log_twist_fn,
                                   optimizer=optimizer, num_fit_steps=num_fit_steps)
    info = TwistInfo(beta=beta, kl=trust_region_kl(result.log_weights, beta), ess=ess(result.log_weights),
                     log_z=log_evidence(result.log_weights), mean_log_potential=jnp.mean(log_potential),
                     loss=loss)
    return params, opt_state, info


def learn_diffusion_twist(key: Array, model: MaskedDiffusionLM, log_potential_fn, *, num_iterations: int,
                          kl_budget: float = 0.5, num_particles: int = 64, learning_rate: float = 1e-2,
                          num_fit_steps: int = 20, log_twist_fn: LogTwistFn = linear_log_twist,
                          twist_params: Any = None) -> tuple[Any, list[dict]]:
    """Learns a twist for σ(x_0) ∝ p_θ(x_0) φ(x_0) by TRI-TSMC over the unmasking path.

    Args:
      key: PRNG key; iteration k uses `fold_in(key, k)`.
      model: the frozen `MaskedDiffusionLM` (num_steps == seq_len).
      log_potential_fn: `(tokens int32 [T]) -> f32 []`, log φ.
      num_iterations: ≥ 1. kl_budget: ε > 0. num_particles: N paths per SIS pass.
      learning_rate, num_fit_steps: Adam on the weighted MLE, per iteration.
      log_twist_fn, twist_params: the head (default: `linear_log_twist` from zero).
    Returns:
      (twist_params, history): one dict per iteration with beta, kl, ess, log_z,
      mean_log_potential, loss (floats).
    """
    check_int("num_iterations", num_iterations, 1)
    check_int("num_fit_steps", num_fit_steps, 1)
    check_real("learning_rate", learning_rate, "(0, inf)")
    params = init_linear_twist(model) if twist_params is None else twist_params
    optimizer, opt_state = init_adam(params, learning_rate)
    history = []
    for k in range(num_iterations):
        params, opt_state, info = tri_iteration(
            jax.random.fold_in(key, k), model, log_potential_fn, params, opt_state, log_twist_fn=log_twist_fn,
            optimizer=optimizer, kl_budget=kl_budget, num_particles=num_particles, num_fit_steps=num_fit_steps)
        history.append({name: float(value) for name, value in info._asdict().items()})
    return params, history
