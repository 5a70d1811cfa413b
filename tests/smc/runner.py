"""Many independent SMC runs at once: the public kernel, `lax.scan` over blocks, `vmap` over
keys."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxsample.sampling import Proposal
from jaxsample.smc import build_kernel, init, make_target


@partial(jax.jit, static_argnames=("num_particles", "max_new_tokens", "block_size",
                                   "reward_fn", "resampler", "num_rejuvenation_steps", "lookahead"))
def _runs(keys, lm, prompt, alpha, lam, temperature, ess_threshold, *,
          num_particles, max_new_tokens, block_size, reward_fn, resampler,
          num_rejuvenation_steps, lookahead):
    target = make_target(alpha, lam, reward_fn)
    proposal = Proposal(temperature=temperature)
    step = build_kernel(lm, proposal, target, block_size=block_size, ess_threshold=ess_threshold,
                        resampler=resampler, num_rejuvenation_steps=num_rejuvenation_steps,
                        lookahead=lookahead)
    num_blocks = -(-max_new_tokens // block_size)

    def one(key):
        state = init(lm, prompt, num_particles, max_new_tokens)
        return jax.lax.scan(lambda s, k: step(k, s), state, jax.random.split(key, num_blocks))

    return jax.vmap(one)(keys)


def run_smc(seeds, lm, prompt, *, alpha=1.0, lam=0.0, temperature=None, ess_threshold=0.5,
            reward_fn=None, resampler=None, num_rejuvenation_steps=0, lookahead=None,
            num_particles, max_new_tokens, block_size):
    """`(final SMCState, SMCInfo per step)`, both with a leading axis over `seeds`."""
    from jaxsample.smc import systematic

    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    temperature = 1.0 / alpha if temperature is None else temperature
    return _runs(keys, lm, prompt, jnp.float32(alpha), jnp.float32(lam), jnp.float32(temperature),
                 jnp.float32(ess_threshold), num_particles=num_particles,
                 max_new_tokens=max_new_tokens, block_size=block_size, reward_fn=reward_fn,
                 resampler=resampler or systematic, num_rejuvenation_steps=num_rejuvenation_steps,
                 lookahead=lookahead)


@partial(jax.jit, static_argnames=("num_particles", "max_new_tokens", "twist_fn", "potential",
                                   "resampler", "conditional"))
def _twisted_runs(keys, references, lm, prompt, params, ess_threshold, *, num_particles,
                  max_new_tokens, twist_fn, potential, resampler, conditional):
    from jaxsample.smc import (ProposalTwist, log_evidence, terminal_potential,
                               twisted_proposal)

    target = make_target(1.0, 1.0, terminal_potential(lm, potential))
    proposal = twisted_proposal(twist_fn, params)

    def one(key, reference):
        step = build_kernel(lm, proposal, target, block_size=1, ess_threshold=ess_threshold,
                            resampler=resampler,
                            lookahead=None if twist_fn is None else ProposalTwist(),
                            conditional_sample=reference if conditional else None)
        state = init(lm, prompt, num_particles, max_new_tokens, record_twist=twist_fn is not None)
        state, info = jax.lax.scan(lambda s, k: step(k, s), state,
                                   jax.random.split(key, max_new_tokens))
        return log_evidence(state.log_weights), info.ess, state.particles.decode.tokens[0]

    return jax.vmap(one)(keys, references)


def run_twisted(seeds, lm, prompt, twist_fn, params, potential, *, num_particles, max_new_tokens,
                ess_threshold=0.5, references=None):
    """Twisted SMC (block size 1) through the public kernel, vmapped over `seeds`:
    `(log Z_hat [R], ESS per step [R, S], particle 0's tokens [R, S])`. With `references`
    (int32 `[R, S]`) each run is conditional SMC clamped to its reference."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    conditional = references is not None
    if references is None:
        references = jnp.zeros((len(seeds), max_new_tokens), jnp.int32)
    return _twisted_runs(keys, jnp.asarray(references), lm, prompt, params,
                         jnp.float32(ess_threshold), num_particles=num_particles,
                         max_new_tokens=max_new_tokens, twist_fn=twist_fn, potential=potential,
                         resampler="multinomial" if conditional else "systematic",
                         conditional=conditional)
