"""Twisted SMC over the unmasking trajectory of a masked-diffusion LM.

The path is the sequence of partially masked states x_T (all MASK) → … → x_0 (clean), one
position per step (`num_steps == seq_len`). With terminal potential φ(x_0) = exp(log_potential)
(e.g. exp(r(x_0)/λ)) the target is σ(x_{T:0}) ∝ p(x_{T:0}) φ(x_0) with Z = E_p[φ(x_0)], and a twist
ψ_t(x_t) ≈ E[φ(x_0) | x_t] gives the intermediate targets γ_t ∝ p(x_{T:t}) ψ_t(x_t).

Proposal (twist-induced, over position and token jointly):

    q(i, v | x_t) ∝ P(i | x_t) p_θ(v | x_t, i) ψ_{t−1}(x_t[i←v]),  P(i | x_t) uniform on masked i,

with normaliser N_t(x_t) = Σ_{i,v} (same); the weight increment N_t(x_t) / ψ_t(x_t) does not
depend on the draw, so it is added first, then the particles are resampled when the ESS falls
below `ess_threshold · N` (the landed `resample_if_needed` and resamplers), then the children
are drawn. At the last step ψ_0 = φ. With the exact twist ψ* every increment after the first
is 0 and the first is log Z: every weight equals log Z and the ESS stays N. With ψ ≡ 1 the
proposal is the model itself until the last step (bootstrap SMC with a twisted last step).

A `log_twist_fn(twist_params, tokens int32 [T], step int32 [], features f32 [T, D]) -> [T, V]`
returns log ψ of every child x_t[i←v] (the diffusion analogue of the autoregressive twist's
`[V]` of candidate next tokens); learned heads read the denoiser's features of x_t.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsample.diffusion.model import MaskedDiffusionLM
from jaxsample.diffusion.sampler import all_masked
from jaxsample.errors import ConfigError, NumericalError
from jaxsample.smc.resampling import Resampler, get_resampler
from jaxsample.smc.weights import log_evidence, resample_if_needed
from jaxsample.validation import check_int, check_real

Array = jax.Array
LogTwistFn = Callable[[Any, Array, Array, Array], Array]


class DiffusionSMCState(NamedTuple):
    """N particles partway down the unmasking path.

    Attributes:
      tokens: int32 `[N, T]` the partially masked states x_t (MASK = V).
      log_weights: f32 `[N]` unnormalised log-weights (`-inf`: a dead particle).
      log_twist: f32 `[N]` log ψ_t(x_t) of each particle (0 for the all-MASK start).
      step: int32 `[]` steps taken (positions unmasked), in [0, T].
    """

    tokens: Array
    log_weights: Array
    log_twist: Array
    step: Array


class DiffusionSMCInfo(NamedTuple):
    """What one step did.

    Attributes:
      ess: f32 `[]` ESS in [0, N] after the reweighting, before resampling.
      resampled: bool `[]` whether the step resampled (ESS < κ N).
      ancestors: int32 `[N]` each particle's ancestor (the identity when not resampled).
      nan_or_inf: bool `[]` a NaN / +inf log-weight appeared (`twisted_diffusion_smc` raises).
      position: int32 `[N]` the position each (post-resampling) particle unmasked.
    """

    ess: Array
    resampled: Array
    ancestors: Array
    nan_or_inf: Array
    position: Array


class DiffusionSMCResult(NamedTuple):
    """The particles after the T unmasking steps of `twisted_diffusion_smc`.

    Attributes:
      tokens: int32 `[N, T]` clean sequences x_0.
      log_weights: f32 `[N]` unnormalised (softmax them for the particles' weights;
        log Ẑ = logsumexp − log N).
      log_z: f32 `[]` log Ẑ (Ẑ is unbiased for Z = E_p[φ(x_0)]).
      ess: f32 `[T]` ESS at each step, before its resampling.
      resampled: bool `[T]` whether each step resampled.
    """

    tokens: Array
    log_weights: Array
    log_z: Array
    ess: Array
    resampled: Array


def init(model: MaskedDiffusionLM, num_particles: int) -> DiffusionSMCState:
    """N all-MASK particles (x_T): tokens int32 `[N, T]`, log_weights and log_twist f32 `[N]`
    zeros, step int32 `[]` 0, where T = `model.config.seq_len` and N = `num_particles`."""
    zeros = jnp.zeros(num_particles, jnp.float32)
    return DiffusionSMCState(all_masked(model, num_particles), zeros, zeros, jnp.int32(0))


def _children_log_potential(model: MaskedDiffusionLM, log_potential_fn, tokens: Array) -> Array:
    """log φ of every child x[i←v]: f32 `[N, T, V]`."""
    c = model.config
    values = jnp.arange(c.vocab_size, dtype=jnp.int32)
    position = jnp.arange(c.seq_len)

    def one(x):
        children = jnp.where(position[:, None, None] == position[None, None, :],
                             values[None, :, None], x[None, None, :])  # [T, V, T]
        return jax.vmap(jax.vmap(log_potential_fn))(children)

    return jax.vmap(one)(tokens).astype(jnp.float32)


def build_kernel(model: MaskedDiffusionLM, log_twist_fn: LogTwistFn | None, log_potential_fn,
                 resampler: Resampler, ess_threshold):
    """`step(key, state, twist_params) -> (state, DiffusionSMCInfo)`: one unmasking step of twisted SMC."""
    c = model.config

    def step(key, state: DiffusionSMCState, twist_params):
        resample_key, draw_key = jax.random.split(key)
        log_p, features = model.logits_and_features(state.tokens)  # [N, T, V], [N, T, D]
        masked = state.tokens == c.mask_id
        log_position = jnp.where(masked, -jnp.log(jnp.sum(masked, -1, keepdims=True).astype(jnp.float32)),
                                 -jnp.inf)

        def intermediate(_):
            if log_twist_fn is None:
                return jnp.zeros_like(log_p)
            steps = jnp.broadcast_to(state.step, state.tokens.shape[:1])
            return jax.vmap(log_twist_fn, (None, 0, 0, 0))(twist_params, state.tokens, steps, features)

        last = state.step == c.seq_len - 1
        log_twist_next = jax.lax.cond(
            last, lambda _: _children_log_potential(model, log_potential_fn, state.tokens), intermediate, None
        )
        log_untwisted = (log_position[..., None] + log_p).reshape(log_p.shape[0], -1)
        log_twist_next = log_twist_next.reshape(log_untwisted.shape)
        log_normaliser = jax.nn.logsumexp(log_untwisted + log_twist_next, axis=-1)
        # A dead particle (weight -inf, log ψ -inf) stays dead: -inf - (-inf) would be NaN.
        log_weights = jnp.where(jnp.isneginf(state.log_weights), -jnp.inf,
                                state.log_weights + log_normaliser - state.log_twist)
        (log_untwisted, log_twist_next, tokens), log_weights, info = resample_if_needed(
            resample_key, log_weights, (log_untwisted, log_twist_next, state.tokens), ess_threshold, resampler,
        )
        log_joint = log_untwisted + log_twist_next
        # A particle of normaliser 0 has weight -inf; it still unmasks a masked position (its
        # clean output holds no MASK), drawn from the untwisted model.
        finite = jnp.isfinite(jax.nn.logsumexp(log_joint, axis=-1, keepdims=True))
        choice = jax.random.categorical(draw_key, jnp.where(finite, log_joint, log_untwisted))
        position, value = choice // c.vocab_size, (choice % c.vocab_size).astype(jnp.int32)
        tokens = tokens.at[jnp.arange(tokens.shape[0]), position].set(value)
        log_twist = jnp.take_along_axis(log_twist_next, choice[:, None], axis=-1)[:, 0]
        new_state = DiffusionSMCState(tokens, log_weights, log_twist, state.step + 1)
        return new_state, DiffusionSMCInfo(info.ess, info.resampled, info.ancestors, info.nan_or_inf,
                                           position.astype(jnp.int32))

    return step


@partial(jax.jit, static_argnames=("log_twist_fn", "log_potential_fn", "num_particles", "resampler"))
def _run(key, model, twist_params, ess_threshold, *, log_twist_fn, log_potential_fn, num_particles, resampler):
    step = build_kernel(model, log_twist_fn, log_potential_fn, resampler, ess_threshold)
    keys = jax.random.split(key, model.config.seq_len)
    state, infos = jax.lax.scan(lambda s, k: step(k, s, twist_params), init(model, num_particles), keys)
    return state, infos


def twisted_diffusion_smc(key: Array, model: MaskedDiffusionLM, log_potential_fn, *, num_particles: int,
                          log_twist_fn: LogTwistFn | None = None, twist_params: Any = None,
                          ess_threshold: float = 0.5, resampler: str | Resampler = "systematic",
                          return_infos: bool = False):
    """Twisted SMC for σ(x_0) ∝ p_θ(x_0) φ(x_0) over the unmasking trajectory (module docstring).

    Args:
      key: PRNG key.
      model: a `MaskedDiffusionLM` with `num_steps == seq_len` (one position per step).
      log_potential_fn: `(tokens int32 [T]) -> f32 []`, log φ(x_0) (jax-traceable, hashable).
      num_particles: N ≥ 1.
      log_twist_fn: `(twist_params, tokens [T], step [], features [T, D]) -> [T, V]`, log ψ of
        each child state; None for ψ ≡ 1.
      twist_params: its (traced) parameters.
      ess_threshold: κ in [0, 1]: resample when ESS < κ N (traced).
      resampler: a name of `jaxsample.smc.RESAMPLERS` or a resampler.
      return_infos: also return the per-step `DiffusionSMCInfo` (leaves `[T, ...]`).
    Returns:
      `DiffusionSMCResult` (Ẑ = exp(log_z) is unbiased for Z), or `(result, infos)`.
    Raises:
      ConfigError: num_steps != seq_len. ArgumentError: bad N or κ.
      NumericalError: a NaN or +inf log-weight appeared.
    """
    c = model.config
    if c.num_steps != c.seq_len:
        raise ConfigError(f"twisted diffusion SMC unmasks one position per step: needs num_steps == "
                          f"seq_len ({c.seq_len}), got num_steps={c.num_steps}")
    num_particles = check_int("num_particles", num_particles, 1)
    check_real("ess_threshold", ess_threshold, "[0, 1]")
    state, infos = _run(key, model, twist_params, jnp.float32(ess_threshold), log_twist_fn=log_twist_fn,
                        log_potential_fn=log_potential_fn, num_particles=num_particles,
                        resampler=get_resampler(resampler))
    if bool(np.any(np.asarray(infos.nan_or_inf))) or bool(np.isnan(np.asarray(state.log_weights)).any()):
        raise NumericalError("twisted diffusion SMC produced a NaN or +inf log-weight (check log_potential_fn "
                             "and log_twist_fn)")
    result = DiffusionSMCResult(state.tokens, state.log_weights, log_evidence(state.log_weights),
                                infos.ess, infos.resampled)
    return (result, infos) if return_infos else result
